#!/usr/bin/env bash
# The end-to-end suite (tests/e2e) through ferry's pods on real kubelet nodes of this machine,
# as hack/kind-e2e.sh runs it on kind, with the same chart values (tests/e2e/values.yaml):
#
#   1. record the machine (tests/nodes/machine_state.py), then hack/nodes.sh up: a control
#      plane and the nodes host-a, host-b, host-c;
#   2. build the image from operator/Dockerfile (hack/image.sh) and load it into the nodes;
#   3. label the nodes ferry.dev/host=true, helm install charts/ferry, wait for every pod;
#   4. kubectl apply -f examples/hosts.yaml (the nodes are named like the example hosts) and
#      wait until each Host is Ready (its agent pod's heartbeat);
#   5. pytest tests/e2e with the kind contract's FERRY_E2E_* variables (hack/kind-e2e.sh);
#   6. save logs to FERRY_NODES_ARTIFACTS, hack/nodes.sh down (FERRY_NODES_KEEP=1 keeps it),
#      then pytest tests/nodes: nothing of the nodes is left on the machine.
#
#   hack/nodes-e2e.sh [PYTEST ARGS...]       (as root; hack/setup.sh nodes installs what it needs)
#   FERRY_NODES_QEMU=1 hack/nodes-e2e.sh     the qemu driver instead: the qemu image
#       (FERRY_IMAGE_QEMU=1, default localhost/ferry:dev-qemu; cold 6.5 min), the test guest
#       (hack/build-test-guest.sh) in each node's /var/lib/ferry/guest, the chart with
#       tests/e2e/values-qemu.yaml added, and only tests/e2e/test_qemu_pods.py (a booted guest
#       migrates between two nodes in its launcher pods); not part of the default run.
#
# Environment: FERRY_NODES_DIR (hack/nodes.sh's state), FERRY_NODES_KEEP [0],
# FERRY_NODES_ARTIFACTS [.ferry/nodes-artifacts], FERRY_NODES_HELM_ARGS [] (extra helm args),
# FERRY_NODES_QEMU [0].
# Prints the time of each step; the failover test adds its figure to ARTIFACTS/figures.txt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FERRY_CACHE:-${HOME}/.cache/ferry}"
export FERRY_NODES_DIR="${FERRY_NODES_DIR:-${CACHE}/nodes}"
ARTIFACTS="${FERRY_NODES_ARTIFACTS:-${ROOT}/.ferry/nodes-artifacts}"
NAMESPACE=ferry-system
RELEASE=ferry
DATACENTER=nyc3
QEMU="${FERRY_NODES_QEMU:-0}"
if [ "${QEMU}" = 1 ]; then IMAGE="${FERRY_IMAGE:-localhost/ferry:dev-qemu}"; else IMAGE="${FERRY_IMAGE:-localhost/ferry:dev}"; fi
VALUES="${ROOT}/tests/e2e/values.yaml"
QEMU_VALUES="${ROOT}/tests/e2e/values-qemu.yaml"
E2E_TESTS=(tests/e2e)
BIN="${CACHE}/bin"
PYTHON="${ROOT}/.venv/bin/python"
NODES=(host-a host-b host-c)
# Droplet addresses of the network tests (tests/e2e/test_network_cutover.py): .200 and up on the
# nodes' shared segment ferrybr0 (10.250.0.1 is this machine, the nodes .11 ...; hack/nodes.sh).
DROPLET_SUBNET=10.250.0

log() { printf 'nodes-e2e: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
[ -x "${PYTHON}" ] || die "no .venv: run hack/setup.sh nodes first"
export PATH="${BIN}:${ROOT}/.venv/bin:${PATH}"

value() {  # value DOTTED.KEY: from the shared values file
  "${PYTHON}" -c 'import functools,sys,yaml; v=yaml.safe_load(open(sys.argv[1])); print(functools.reduce(lambda d,k: d[k], sys.argv[2].split("."), v))' "${VALUES}" "$1"
}
NOTICE_SECONDS="$(value settings.noticeSeconds)"
SIZE_SCALE="$(value settings.sizeScale)"
HEARTBEAT_TIMEOUT_SECONDS="$(value settings.heartbeatTimeoutSeconds)"
METADATA_URL="http://$(value metadata.address):$(value metadata.port)"

mkdir -p "${ARTIFACTS}"
rm -f "${ARTIFACTS}/figures.txt"
figure() { log "$*"; echo "$*" >> "${ARTIFACTS}/figures.txt"; }
BEFORE="${ARTIFACTS}/machine-before.json"
KUBECONFIG_FILE="${FERRY_NODES_DIR}/cluster/kubeconfig"
export KUBECONFIG="${KUBECONFIG_FILE}"
k() { kubectl --kubeconfig "${KUBECONFIG_FILE}" "$@"; }

# shellcheck disable=SC2317  # collect and cleanup run from the EXIT trap
collect() {
  log "saving cluster state and logs to ${ARTIFACTS}"
  k get nodes -o wide > "${ARTIFACTS}/nodes.txt" 2>&1 || true
  k get hosts,droplets,livemigrations -A -o wide > "${ARTIFACTS}/ferry-objects.txt" 2>&1 || true
  k get all -n "${NAMESPACE}" -o wide > "${ARTIFACTS}/workloads.txt" 2>&1 || true
  k get events -A --sort-by=.lastTimestamp > "${ARTIFACTS}/events.txt" 2>&1 || true
  local pod
  for pod in $(k get pods -n "${NAMESPACE}" -o name 2>/dev/null); do
    k logs -n "${NAMESPACE}" "${pod}" --all-containers --prefix --timestamps \
      > "${ARTIFACTS}/$(basename "${pod}").log" 2>&1 || true
  done
  mkdir -p "${ARTIFACTS}/node-logs"
  cp -r "${FERRY_NODES_DIR}/nodes/"*/logs "${ARTIFACTS}/node-logs/" 2>/dev/null || true
}

# shellcheck disable=SC2317
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -d "${FERRY_NODES_DIR}" ]; then
    collect
    if [ "${FERRY_NODES_KEEP:-0}" = 1 ]; then
      log "keeping the nodes: export KUBECONFIG=${KUBECONFIG_FILE}; stop with: hack/nodes.sh down"
      exit "${rc}"
    fi
    local t0=${SECONDS}
    bash "${ROOT}/hack/nodes.sh" down || rc=1
    figure "down: $((SECONDS - t0))s"
    log "checking that the nodes left nothing behind (tests/nodes)"
    (cd "${ROOT}" && FERRY_NODES_BEFORE="${BEFORE}" "${PYTHON}" -m pytest -p no:cacheprovider -q tests/nodes) || rc=1
  fi
  [ ! -f "${ARTIFACTS}/figures.txt" ] || { log "figures:"; cat "${ARTIFACTS}/figures.txt" >&2; }
  exit "${rc}"
}

[ -d "${FERRY_NODES_DIR}" ] && die "${FERRY_NODES_DIR} exists: nodes run already (hack/nodes.sh down, or set FERRY_NODES_DIR)"
trap cleanup EXIT
trap 'exit 130' INT TERM

# -- 1. nodes -------------------------------------------------------------------------------------
FERRY_NODES_DIR=/nonexistent "${PYTHON}" "${ROOT}/tests/nodes/machine_state.py" > "${BEFORE}"
t0=${SECONDS}
bash "${ROOT}/hack/nodes.sh" up >/dev/null
figure "nodes up to Ready: $((SECONDS - t0))s"

# -- 2. image -------------------------------------------------------------------------------------
t0=${SECONDS}
archive="$(FERRY_IMAGE="${IMAGE}" FERRY_IMAGE_QEMU="${QEMU}" bash "${ROOT}/hack/image.sh")"
figure "image build: $((SECONDS - t0))s"
t0=${SECONDS}
bash "${ROOT}/hack/nodes.sh" load "${archive}"
figure "image import into ${#NODES[@]} nodes: $((SECONDS - t0))s"

# -- 2b. qemu: the test guest in each node's data directory (a hostPath of the agent and the
# launcher pods; readable by their user 10001: the files are 0644 in a 0755 directory)
extra_helm_args=()
if [ "${QEMU}" = 1 ]; then
  t0=${SECONDS}
  guest="${CACHE}/guest-e2e"
  bash "${ROOT}/hack/build-test-guest.sh" "${guest}" >/dev/null
  for node in "${NODES[@]}"; do
    dest="${FERRY_NODES_DIR}/nodes/${node}/fs/var/lib/ferry/guest"
    install -d -m 0755 "${dest}"
    install -m 0644 "${guest}/vmlinuz" "${guest}/initrd.img" "${dest}/"
  done
  figure "test guest into ${#NODES[@]} nodes: $((SECONDS - t0))s"
  extra_helm_args+=(-f "${QEMU_VALUES}")
  E2E_TESTS=(tests/e2e/test_qemu_pods.py tests/e2e/test_qemu_network.py)
fi

# -- 3. chart -------------------------------------------------------------------------------------
t0=${SECONDS}
k label node "${NODES[@]}" ferry.dev/host=true --overwrite >/dev/null
if [ -n "${FERRY_NODES_HELM_ARGS:-}" ]; then read -r -a more <<< "${FERRY_NODES_HELM_ARGS}"; extra_helm_args+=("${more[@]}"); fi
helm --kubeconfig "${KUBECONFIG_FILE}" install "${RELEASE}" "${ROOT}/charts/ferry" \
  --namespace "${NAMESPACE}" --create-namespace -f "${VALUES}" \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" \
  "${extra_helm_args[@]}" --wait --timeout 5m >/dev/null
k -n "${NAMESPACE}" rollout status deployment/"${RELEASE}-operator" --timeout 180s >/dev/null
k -n "${NAMESPACE}" rollout status daemonset/"${RELEASE}-metadata" --timeout 180s >/dev/null
for component in agent metadata operator; do
  want=${#NODES[@]}; [ "${component}" = operator ] && want=2
  deadline=$((SECONDS + 180))
  until [ "$(k -n "${NAMESPACE}" get pods -l "app.kubernetes.io/instance=${RELEASE},app.kubernetes.io/component=${component}" \
      -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c '^True$')" -ge "${want}" ]; do
    [ "${SECONDS}" -lt "${deadline}" ] || die "fewer than ${want} ${component} pods Ready after 180s: $(k -n "${NAMESPACE}" get pods -o wide)"
    sleep 1
  done
done
figure "helm install to every pod Ready: $((SECONDS - t0))s"

# -- 4. hosts -------------------------------------------------------------------------------------
t0=${SECONDS}
k apply -f "${ROOT}/examples/hosts.yaml" >/dev/null
for host in "${NODES[@]}"; do
  k wait "host/${host}" --for=jsonpath='{.status.phase}'=Ready --timeout 180s >/dev/null
done
figure "Hosts Ready: $((SECONDS - t0))s"

# -- 5. tests -------------------------------------------------------------------------------------
hosts_csv="$(IFS=,; echo "${NODES[*]}")"
log "running ${E2E_TESTS[*]} against ${hosts_csv}"
t0=${SECONDS}
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
  FERRY_E2E_METADATA_URL="${METADATA_URL}" \
  FERRY_E2E_NODE_EXEC="ip netns exec ferry-{node}" \
  FERRY_E2E_DROPLET_SUBNET="${DROPLET_SUBNET}" \
  FERRY_E2E_VALUES="${VALUES}" \
  FERRY_E2E_IMAGE="${IMAGE}" \
  FERRY_E2E_FIGURES="${ARTIFACTS}/figures.txt" \
  FERRY_E2E_DRIVER="$([ "${QEMU}" = 1 ] && echo qemu || echo sim)" \
    "${PYTHON}" -m pytest -p no:cacheprovider "${E2E_TESTS[@]}" "$@"
)
rc=$?
set -e
figure "${E2E_TESTS[*]} wall time: $((SECONDS - t0))s"
if [ "${rc}" -eq 0 ]; then log "tests/e2e passed"; else log "tests/e2e failed (exit ${rc})"; fi
exit "${rc}"
