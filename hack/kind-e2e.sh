#!/usr/bin/env bash
# The end-to-end suite (tests/e2e) against a kind cluster running ferry from its Helm chart,
# as a user installs it:
#
#   1. create a kind cluster: one control plane and FERRY_KIND_WORKERS workers, the workers
#      labelled ferry.dev/host=true (each runs an agent and the metadata endpoint);
#   2. build the image (operator/Dockerfile) and load it into the nodes;
#   3. helm install charts/ferry with tests/e2e/values.yaml (sim driver, scaled-down sizes, short
#      notice), the same values hack/nodes-e2e.sh installs on this machine's real nodes;
#   4. create one Host per worker, named like its node, and wait until each is Ready;
#   5. run pytest tests/e2e with the kind cluster's KUBECONFIG and FERRY_E2E_* (below);
#   6. save logs to FERRY_KIND_ARTIFACTS and delete the cluster (FERRY_KIND_KEEP=1 keeps it).
#
#   hack/kind-e2e.sh [PYTEST ARGS...]
#
# Needs docker and kind (>= 0.20, a node image with Kubernetes >= 1.30); kubectl and helm from
# $PATH or hack/build-binaries.sh. Environment (defaults in brackets):
#   FERRY_KIND_CLUSTER [ferry-e2e]   FERRY_KIND_WORKERS [3]   FERRY_KIND_NODE_IMAGE [kind's default]
#   FERRY_KIND_IMAGE [ferry:e2e]     FERRY_KIND_KEEP [0]      FERRY_KIND_ARTIFACTS [.ferry/kind-artifacts]
#   FERRY_KIND_NAMESPACE [ferry-system]  FERRY_E2E_DATACENTER [nyc3]
#   FERRY_KIND_HELM_ARGS [] extra arguments for helm install (e.g. "--set settings.maxParallel=2")
#
# What tests/e2e receives (its contract with this script):
#   KUBECONFIG, FERRY_TEST_KUBECONFIG  the kind cluster's kubeconfig (tests reuse it, start nothing)
#   FERRY_E2E_EXTERNAL=1               operator, agents and metadata endpoint already run in the
#                                      cluster; tests must not start ferry processes themselves
#   FERRY_E2E_HOSTS                    comma-separated Host names (= worker node names), all Ready
#   FERRY_E2E_DATACENTER               the Hosts' datacenter
#   FERRY_E2E_NAMESPACE                namespace of the ferry components (logs, metrics Service)
#   FERRY_E2E_RELEASE                  Helm release name
#   FERRY_E2E_NOTICE_SECONDS, FERRY_E2E_SIZE_SCALE, FERRY_E2E_HEARTBEAT_TIMEOUT_SECONDS
#                                      the settings the chart was installed with
#   FERRY_E2E_METADATA_URL             http://169.254.169.254:80, reachable only inside a host node:
#                                      docker exec <node> curl --interface <droplet ip> URL
#   FERRY_E2E_NODE_EXEC                how to run a command on a node, {node} replaced by its name:
#                                      "docker exec {node}" (hack/nodes-e2e.sh: "ip netns exec ferry-{node}")
#   FERRY_E2E_VALUES, FERRY_E2E_IMAGE  the values file and the image the release was installed with
#   FERRY_E2E_FIGURES                  a file tests append measured figures to (failover time)
#   FERRY_E2E_KIND_CLUSTER             the kind cluster's name (its nodes are docker containers)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${FERRY_KIND_CLUSTER:-ferry-e2e}"
WORKERS="${FERRY_KIND_WORKERS:-3}"
IMAGE="${FERRY_KIND_IMAGE:-ferry:e2e}"
NAMESPACE="${FERRY_KIND_NAMESPACE:-ferry-system}"
RELEASE="ferry"
DATACENTER="${FERRY_E2E_DATACENTER:-nyc3}"
ARTIFACTS="${FERRY_KIND_ARTIFACTS:-${ROOT}/.ferry/kind-artifacts}"
VALUES="${ROOT}/tests/e2e/values.yaml"

log() { printf 'kind-e2e: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found: $2"; }
need docker "install Docker (https://docs.docker.com/engine/install/)"
need kind "install kind >= 0.20 (https://kind.sigs.k8s.io/docs/user/quick-start/#installation)"
docker info >/dev/null 2>&1 || die "docker is installed but the daemon does not answer (docker info)"
[[ "${WORKERS}" =~ ^[1-9][0-9]*$ ]] || die "FERRY_KIND_WORKERS must be a positive number, not '${WORKERS}'"

# kubectl and helm: $PATH first, else the pinned builds of hack/build-binaries.sh.
if command -v kubectl >/dev/null 2>&1 && command -v helm >/dev/null 2>&1; then
  KUBECTL="$(command -v kubectl)"
  HELM="$(command -v helm)"
else
  BIN="$("${ROOT}/hack/build-binaries.sh")"
  KUBECTL="${BIN}/kubectl"
  HELM="${BIN}/helm"
fi
if [ -x "${ROOT}/.venv/bin/python" ]; then PYTHON="${ROOT}/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
value() {  # value DOTTED.KEY: from the shared values file (needs PyYAML: hack/setup.sh's .venv)
  "${PYTHON}" -c 'import functools,sys,yaml; v=yaml.safe_load(open(sys.argv[1])); print(functools.reduce(lambda d,k: d[k], sys.argv[2].split("."), v))' "${VALUES}" "$1"
}
NOTICE_SECONDS="$(value settings.noticeSeconds)"
SIZE_SCALE="$(value settings.sizeScale)"
HEARTBEAT_TIMEOUT_SECONDS="$(value settings.heartbeatTimeoutSeconds)"
METADATA_ADDRESS="$(value metadata.address)"
METADATA_PORT="$(value metadata.port)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ferry-kind.XXXXXX")"
KUBECONFIG_FILE="${WORK}/kubeconfig"
export KUBECONFIG="${KUBECONFIG_FILE}"
k() { "${KUBECTL}" --kubeconfig "${KUBECONFIG_FILE}" "$@"; }

# shellcheck disable=SC2317  # collect and cleanup run from the EXIT trap
collect() {
  mkdir -p "${ARTIFACTS}"
  log "saving cluster state and logs to ${ARTIFACTS}"
  k get nodes -o wide > "${ARTIFACTS}/nodes.txt" 2>&1 || true
  k get hosts,droplets,livemigrations -A -o wide > "${ARTIFACTS}/ferry-objects.txt" 2>&1 || true
  k get hosts,droplets,livemigrations -A -o yaml > "${ARTIFACTS}/ferry-objects.yaml" 2>&1 || true
  k get all -n "${NAMESPACE}" -o wide > "${ARTIFACTS}/workloads.txt" 2>&1 || true
  k get events -A --sort-by=.lastTimestamp > "${ARTIFACTS}/events.txt" 2>&1 || true
  local pod
  for pod in $(k get pods -n "${NAMESPACE}" -o name 2>/dev/null); do
    k logs -n "${NAMESPACE}" "${pod}" --all-containers --prefix --timestamps \
      > "${ARTIFACTS}/$(basename "${pod}").log" 2>&1 || true
    k logs -n "${NAMESPACE}" "${pod}" --all-containers --prefix --timestamps --previous \
      > "${ARTIFACTS}/$(basename "${pod}").previous.log" 2>/dev/null || true
  done
  kind export logs "${ARTIFACTS}/kind" --name "${CLUSTER}" >/dev/null 2>&1 || true
}

# shellcheck disable=SC2317
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
    collect
    if [ "${FERRY_KIND_KEEP:-0}" = 1 ]; then
      log "keeping cluster ${CLUSTER}: export KUBECONFIG=${KUBECONFIG_FILE}; delete with: kind delete cluster --name ${CLUSTER}"
    else
      log "deleting cluster ${CLUSTER}"
      kind delete cluster --name "${CLUSTER}" >/dev/null 2>&1 || log "could not delete cluster ${CLUSTER}"
      rm -rf "${WORK}"
    fi
  else
    rm -rf "${WORK}"
  fi
  exit "${rc}"
}

if kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; then
  die "a kind cluster named ${CLUSTER} exists already; delete it (kind delete cluster --name ${CLUSTER}) or set FERRY_KIND_CLUSTER"
fi
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 1. cluster -----------------------------------------------------------------------------------
{
  echo "kind: Cluster"
  echo "apiVersion: kind.x-k8s.io/v1alpha4"
  echo "nodes:"
  echo "  - role: control-plane"
  for _ in $(seq 1 "${WORKERS}"); do
    echo "  - role: worker"
    echo "    labels:"
    echo "      ferry.dev/host: \"true\""
  done
} > "${WORK}/kind.yaml"

log "creating kind cluster ${CLUSTER} (1 control plane, ${WORKERS} host workers)"
create_args=(create cluster --name "${CLUSTER}" --config "${WORK}/kind.yaml" --kubeconfig "${KUBECONFIG_FILE}" --wait 180s)
if [ -n "${FERRY_KIND_NODE_IMAGE:-}" ]; then create_args+=(--image "${FERRY_KIND_NODE_IMAGE}"); fi
kind "${create_args[@]}"

server_minor="$(k version -o json | "${PYTHON}" -c 'import json,sys; v=json.load(sys.stdin)["serverVersion"]; print(int(v["minor"].rstrip("+")))')"
[ "${server_minor}" -ge 30 ] || die "the kind node runs Kubernetes 1.${server_minor}; the chart needs >= 1.30 (set FERRY_KIND_NODE_IMAGE)"

# -- 2. image -------------------------------------------------------------------------------------
log "building ${IMAGE} from operator/Dockerfile"
docker build -f "${ROOT}/operator/Dockerfile" -t "${IMAGE}" "${ROOT}"
log "loading ${IMAGE} into the nodes"
kind load docker-image "${IMAGE}" --name "${CLUSTER}"

# -- 3. chart -------------------------------------------------------------------------------------
repo="${IMAGE%:*}"
tag="${IMAGE##*:}"
[ "${repo}" != "${IMAGE}" ] || tag=latest
extra_helm_args=()
if [ -n "${FERRY_KIND_HELM_ARGS:-}" ]; then
  read -r -a extra_helm_args <<< "${FERRY_KIND_HELM_ARGS}"
fi
log "installing the chart (release ${RELEASE} in ${NAMESPACE})"
"${HELM}" --kubeconfig "${KUBECONFIG_FILE}" install "${RELEASE}" "${ROOT}/charts/ferry" \
  --namespace "${NAMESPACE}" --create-namespace -f "${VALUES}" \
  --set image.repository="${repo}" --set image.tag="${tag}" \
  "${extra_helm_args[@]}" \
  --wait --timeout 5m

wait_for_pods() {  # wait_for_pods COMPONENT COUNT: COUNT pods exist and are Ready
  local selector="app.kubernetes.io/instance=${RELEASE},app.kubernetes.io/component=$1"
  local deadline=$((SECONDS + 180)) n
  while :; do
    n="$(k -n "${NAMESPACE}" get pods -l "${selector}" -o name | wc -l)"
    [ "${n}" -ge "$2" ] && break
    [ "${SECONDS}" -lt "${deadline}" ] || die "only ${n} of $2 $1 pods after 180s"
    sleep 2
  done
  k -n "${NAMESPACE}" wait pod -l "${selector}" --for condition=Ready --timeout 180s
}
k -n "${NAMESPACE}" rollout status deployment/"${RELEASE}-operator" --timeout 180s
k -n "${NAMESPACE}" rollout status daemonset/"${RELEASE}-metadata" --timeout 180s
# Wait for the pods themselves (also right for an agent DaemonSet set to OnDelete).
wait_for_pods agent "${WORKERS}"
wait_for_pods metadata "${WORKERS}"

# -- 4. hosts -------------------------------------------------------------------------------------
mapfile -t HOSTS < <(k get nodes -l ferry.dev/host=true -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
[ "${#HOSTS[@]}" -eq "${WORKERS}" ] || die "expected ${WORKERS} host nodes, found ${#HOSTS[@]}: ${HOSTS[*]}"
for host in "${HOSTS[@]}"; do
  k apply -f - <<YAML
apiVersion: ferry.dev/v1alpha1
kind: Host
metadata:
  name: ${host}
spec:
  datacenter: ${DATACENTER}
  capacity: {cpu: 16, memoryMiB: 65536, diskGiB: 1000}
YAML
done
for host in "${HOSTS[@]}"; do
  log "waiting for Host ${host} to be Ready (its agent's heartbeat)"
  k wait "host/${host}" --for=jsonpath='{.status.phase}'=Ready --timeout 180s
done

# -- 5. tests -------------------------------------------------------------------------------------
hosts_csv="$(IFS=,; echo "${HOSTS[*]}")"
log "running tests/e2e against ${hosts_csv}"
set +e
(
  cd "${ROOT}"
  FERRY_TEST_KUBECONFIG="${KUBECONFIG_FILE}" \
  FERRY_E2E_EXTERNAL=1 \
  FERRY_E2E_HOSTS="${hosts_csv}" \
  FERRY_E2E_DATACENTER="${DATACENTER}" \
  FERRY_E2E_NAMESPACE="${NAMESPACE}" \
  FERRY_E2E_RELEASE="${RELEASE}" \
  FERRY_E2E_NOTICE_SECONDS="${NOTICE_SECONDS}" \
  FERRY_E2E_SIZE_SCALE="${SIZE_SCALE}" \
  FERRY_E2E_HEARTBEAT_TIMEOUT_SECONDS="${HEARTBEAT_TIMEOUT_SECONDS}" \
  FERRY_E2E_METADATA_URL="http://${METADATA_ADDRESS}:${METADATA_PORT}" \
  FERRY_E2E_NODE_EXEC="docker exec {node}" \
  FERRY_E2E_VALUES="${VALUES}" \
  FERRY_E2E_IMAGE="${IMAGE}" \
  FERRY_E2E_FIGURES="${ARTIFACTS}/figures.txt" \
  FERRY_E2E_KIND_CLUSTER="${CLUSTER}" \
    "${PYTHON}" -m pytest tests/e2e "$@"
)
rc=$?
set -e
if [ "${rc}" -eq 0 ]; then log "tests/e2e passed"; else log "tests/e2e failed (exit ${rc})"; fi
exit "${rc}"
