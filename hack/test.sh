#!/usr/bin/env bash
# Set up from nothing and run every test:
#   1. pytest tests: unit, integration (a real kube-apiserver + etcd started for the session),
#      e2e against ferry's processes (hack/local-up.sh) and the qemu driver tests;
#   2. hack/nodes-e2e.sh: the e2e suite again through ferry's pods, installed with Helm on
#      real kubelet nodes of this machine (hack/nodes.sh), then the check that the nodes left
#      nothing behind (needs root).
#   hack/test.sh                   both
#   hack/test.sh [pytest args...]  only step 1, with these arguments
#   FERRY_NODES=0 hack/test.sh     only step 1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nodes="${FERRY_NODES:-1}"
[ "$#" -eq 0 ] || nodes=0
if [ "${nodes}" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "test: the nodes step needs root (network namespaces, cgroups); FERRY_NODES=0 skips it" >&2; exit 1; }
  bash "${ROOT}/hack/setup.sh" nodes
else
  bash "${ROOT}/hack/setup.sh"
fi
cd "${ROOT}"
export PATH="${FERRY_CACHE:-${HOME}/.cache/ferry}/bin:${PATH}"
start=${SECONDS}
rc=0
# tests/nodes checks the machine after hack/nodes-e2e.sh's `down`; it runs there.
args=("$@")
# --durations: where the time goes, printed at the end of every full run (CI must stay well
# under 30 minutes; the README lists the longer runs that are opt-in).
[ "$#" -gt 0 ] || args=(tests --ignore=tests/nodes --durations=25)
.venv/bin/pytest -p no:cacheprovider "${args[@]}" || rc=$?
echo "test: pytest ${args[*]}: exit ${rc} in $((SECONDS - start))s" >&2
if [ "${nodes}" = 1 ]; then
  t0=${SECONDS}
  nrc=0
  bash hack/nodes-e2e.sh || nrc=$?
  echo "test: hack/nodes-e2e.sh: exit ${nrc} in $((SECONDS - t0))s" >&2
  [ "${rc}" -ne 0 ] || rc=${nrc}
fi
echo "test: all done in $((SECONDS - start))s, exit ${rc}" >&2
exit "${rc}"
