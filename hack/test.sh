#!/usr/bin/env bash
# Set up from nothing and run every test: unit, integration (a real kube-apiserver + etcd
# started for the session), e2e (the user's path) and the qemu driver tests.
#   hack/test.sh [pytest args...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "${ROOT}/hack/setup.sh"
cd "${ROOT}"
export PATH="${FERRY_CACHE:-${HOME}/.cache/ferry}/bin:${PATH}"
exec .venv/bin/pytest -p no:cacheprovider "${@:-tests}"
