#!/usr/bin/env bash
# Build the control-plane programs ferry's tests and local runs need, from their Go modules,
# into a cache outside the work tree keyed by version. A second run is a no-op.
#
#   hack/build-binaries.sh            build what is missing, print the bin directory
#   hack/build-binaries.sh nodes      also kubelet, kube-scheduler, kube-proxy and the pause
#                                     program that hack/nodes.sh needs
#   FERRY_CACHE=/somewhere hack/...   choose the cache (default ~/.cache/ferry)
#
# Versions are pinned here and nowhere else; hack/versions.env is sourced by every script.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=hack/versions.env
source "${HERE}/versions.env"

CACHE="${FERRY_CACHE:-${HOME}/.cache/ferry}"
BIN="${CACHE}/bin"
mkdir -p "${BIN}"

die() { echo "build-binaries: $*" >&2; exit 1; }

need_go() {
  if ! command -v go >/dev/null 2>&1; then
    die "no Go toolchain found. Install Go >= ${GO_MIN} (Debian: 'apt-get install golang-go' is too old; use the distribution from go.dev or your package manager) and re-run."
  fi
  local have
  have="$(go env GOVERSION | sed 's/^go//')"
  if [ "$(printf '%s\n%s\n' "${GO_MIN}" "${have}" | sort -V | head -1)" != "${GO_MIN}" ]; then
    die "Go ${have} is too old: kubernetes ${K8S_VERSION} needs Go >= ${GO_MIN}."
  fi
}

# build NAME VERSION-DIR COMMAND...: run the build only when the versioned output is missing.
stamp_ok() { [ -x "$1" ]; }

link() {  # link the versioned binary to bin/NAME
  ln -sfn "$1" "${BIN}/$2"
}

# Programs of k8s.io/kubernetes, built from the Go module proxy: a throwaway module that
# requires k8s.io/kubernetes at K8S_VERSION, with each staging module (which it refers to as
# ./staging/src/k8s.io/X v0.0.0) pinned to the published release of the same minor version.
#   build_k8s SET "what it says while building" CMD...   (into ${CACHE}/SET, linked into bin/)
build_k8s() {
  local set="$1" what="$2"; shift 2
  local out="${CACHE}/${set}" cmd ok=1
  for cmd in "$@"; do stamp_ok "${out}/${cmd}" || ok=0; done
  if [ "${ok}" = 0 ]; then
    need_go
    echo "build-binaries: building $* ${K8S_VERSION} (${what})" >&2
    local mod="${CACHE}/src/${set}"
    rm -rf "${mod}"; mkdir -p "${mod}"
    (
      cd "${mod}"
      printf 'module ferry.dev/k8sbuild\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes %s\n' "${K8S_VERSION}" > go.mod
      { printf '//go:build tools\n\npackage tools\n\nimport (\n'
        for cmd in "$@"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "${cmd}"; done
        printf ')\n'; } > tools.go
      local gomod
      gomod="$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')"
      [ -f "${gomod}" ] || die "could not download k8s.io/kubernetes@${K8S_VERSION} from the Go module proxy"
      grep -E '^\s*k8s.io/[a-z0-9-]+ => \./staging/src/' "${gomod}" | awk '{print $1}' | while read -r m; do
        echo "replace ${m} => ${m} ${K8S_STAGING_VERSION}" >> go.mod
      done
      go mod tidy -e >/dev/null 2>&1 || true
      go mod download >/dev/null
      local pkg=k8s.io/component-base/version
      local ldflags="-s -w -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=${K8S_MAJOR} -X ${pkg}.gitMinor=${K8S_MINOR} -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
      local pkgs=()
      for cmd in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/${cmd}"); done
      mkdir -p "${out}.tmp"
      CGO_ENABLED=0 go build -trimpath -ldflags "${ldflags}" -o "${out}.tmp/" "${pkgs[@]}"
    ) || die "building $* ${K8S_VERSION} failed (see the go output above)"
    rm -rf "${out}"; mv "${out}.tmp" "${out}"
  fi
  for cmd in "$@"; do link "${out}/${cmd}" "${cmd}"; done
}

build_kubernetes() {
  build_k8s "kubernetes-${K8S_VERSION}" "cold: about 7 min on 2 cores" kube-apiserver kube-controller-manager kubectl
}

build_etcd() {
  local out="${CACHE}/etcd-${ETCD_VERSION}"
  if ! stamp_ok "${out}/etcd"; then
    need_go
    echo "build-binaries: building etcd ${ETCD_VERSION}" >&2
    local mod="${CACHE}/src/etcd-${ETCD_VERSION}"
    rm -rf "${mod}"; mkdir -p "${mod}"
    (
      cd "${mod}"
      cat > go.mod <<GOMOD
module ferry.dev/etcdbuild

go 1.26.0

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}
GOMOD
      cat > main.go <<'GOSRC'
// etcd's own main package lives in the root module, which cannot be built with `go install`
// (it uses replace directives); etcdmain.Main is what that main calls.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GOSRC
      go mod tidy >/dev/null
      mkdir -p "${out}.tmp"
      CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "${out}.tmp/etcd" .
    ) || die "building etcd ${ETCD_VERSION} failed (see the go output above)"
    rm -rf "${out}"; mv "${out}.tmp" "${out}"
  fi
  link "${out}/etcd" etcd
}

build_helm() {
  local out="${CACHE}/helm-${HELM_VERSION}"
  if ! stamp_ok "${out}/helm"; then
    need_go
    echo "build-binaries: building helm ${HELM_VERSION}" >&2
    mkdir -p "${out}.tmp"
    GOBIN="${out}.tmp" CGO_ENABLED=0 go install -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
      "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}" || die "building helm ${HELM_VERSION} failed"
    rm -rf "${out}"; mv "${out}.tmp" "${out}"
  fi
  link "${out}/helm" helm
}

build_kubernetes_nodes() {  # kubelet, kube-scheduler, kube-proxy: the same module technique
  build_k8s "kubernetes-node-${K8S_VERSION}" "cold: about 5 min on 2 cores with the control plane's Go cache" \
    kubelet kube-scheduler kube-proxy
}

# The pod sandbox program (what registry.k8s.io/pause is): a static binary that waits for a
# signal. hack/nodes.sh packs it into the local image its containerds use as sandbox_image.
build_pause() {
  local out="${CACHE}/pause-${PAUSE_VERSION}"
  if ! stamp_ok "${out}/pause"; then
    need_go
    local mod="${CACHE}/src/pause-${PAUSE_VERSION}"
    rm -rf "${mod}"; mkdir -p "${mod}"
    (
      cd "${mod}"
      printf 'module ferry.dev/pause\n\ngo 1.26.0\n' > go.mod
      cat > main.go <<'GOSRC'
// A pod's sandbox process: holds the pod's namespaces until told to stop.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGINT, syscall.SIGTERM)
	<-c
}
GOSRC
      mkdir -p "${out}.tmp"
      CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "${out}.tmp/pause" .
    ) || die "building pause failed"
    rm -rf "${out}"; mv "${out}.tmp" "${out}"
  fi
  link "${out}/pause" pause
}

start=$(date +%s)
build_etcd
build_helm
build_kubernetes
if [ "${1:-}" = nodes ]; then
  build_kubernetes_nodes
  build_pause
fi
echo "build-binaries: ready in $(( $(date +%s) - start ))s: ${BIN}" >&2
echo "${BIN}"
