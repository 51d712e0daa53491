#!/usr/bin/env bash
# Install everything ferry's local runs and tests need, from nothing, idempotently:
# Debian packages, the Python environment (.venv) and the control-plane binaries.
# Sourced or run by hack/test.sh and hack/local-up.sh.
#   hack/setup.sh nodes   also what real nodes need (hack/nodes.sh, hack/image.sh): containerd,
#                         runc, CNI plugins, iptables, buildah, debootstrap; kubelet,
#                         kube-scheduler, kube-proxy and the pause program
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

APT_PACKAGES=(openssl curl rsync qemu-system-x86 qemu-utils busybox-static cpio linux-image-amd64 shellcheck prometheus librsvg2-bin iptables)
NODES="${1:-}"
if [ "${NODES}" = nodes ]; then
  APT_PACKAGES+=(containerd runc containernetworking-plugins conntrack buildah debootstrap util-linux iproute2)
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "${p}" 2>/dev/null | grep -q "install ok installed" || missing+=("${p}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  ${SUDO} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${SUDO} apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
command -v "${PY}" >/dev/null || { echo "setup: Python 3.11+ is required (python3 not found)" >&2; exit 1; }
"${PY}" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "setup: Python 3.11+ is required" >&2; exit 1; }
if [ ! -x "${ROOT}/.venv/bin/python" ]; then
  "${PY}" -m venv "${ROOT}/.venv"
fi
stamp="${ROOT}/.venv/.ferry-installed"
if [ ! -f "${stamp}" ] || [ "${ROOT}/pyproject.toml" -nt "${stamp}" ]; then
  echo "setup: installing the Python environment in .venv" >&2
  "${ROOT}/.venv/bin/pip" install -q --upgrade pip >/dev/null
  "${ROOT}/.venv/bin/pip" install -q -e "${ROOT}[test]"
  touch "${stamp}"
fi

bash "${ROOT}/hack/build-binaries.sh" ${NODES:+"${NODES}"} >/dev/null
