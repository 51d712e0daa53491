#!/usr/bin/env bash
# The whole of ferry on this machine, as a user runs it:
#   hack/local-up.sh        set up from nothing, start a local control plane, the operator,
#                           three agents (sim driver), the metadata endpoint; create the
#                           example hosts and droplet; run a live migration you watch to the end
#   hack/local-up.sh up     the same without the migration (leaves everything running)
#   hack/local-up.sh down   stop all of it (processes, VM processes, control plane, state)
# Everything lives under FERRY_LOCAL_DIR (default ${FERRY_CACHE:-~/.cache/ferry}/local).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FERRY_CACHE:-${HOME}/.cache/ferry}"
LOCAL="${FERRY_LOCAL_DIR:-${CACHE}/local}"
export FERRY_CLUSTER_DIR="${FERRY_CLUSTER_DIR:-${LOCAL}/cluster}"
HOSTS=(host-a host-b host-c)
FERRY="${ROOT}/.venv/bin/ferry"

log() { echo "local: $*" >&2; }

start_proc() {  # start_proc NAME ARGS...: a ferry program, detached, logging to LOCAL/logs/NAME.log
  local name="$1"; shift
  if [ -f "${LOCAL}/run/${name}.pid" ] && kill -0 "$(cat "${LOCAL}/run/${name}.pid")" 2>/dev/null; then
    return 0
  fi
  setsid "${FERRY}" "$@" >"${LOCAL}/logs/${name}.log" 2>&1 < /dev/null &
  echo $! > "${LOCAL}/run/${name}.pid"
}

cmd_up() {
  bash "${ROOT}/hack/setup.sh"
  mkdir -p "${LOCAL}/run" "${LOCAL}/logs" "${LOCAL}/agents"
  eval "$(bash "${ROOT}/hack/cluster.sh" up)"
  export KUBECONFIG
  export PATH="${CACHE}/bin:${PATH}"
  # A short notice period so the demo does not wait 10 minutes; production default is 600 s.
  export FERRY_NOTICE_SECONDS="${FERRY_NOTICE_SECONDS:-5}"
  export FERRY_SIZE_SCALE="${FERRY_SIZE_SCALE:-0.002}"
  export FERRY_HEARTBEAT_SECONDS="${FERRY_HEARTBEAT_SECONDS:-2}"
  export FERRY_HEARTBEAT_TIMEOUT_SECONDS="${FERRY_HEARTBEAT_TIMEOUT_SECONDS:-10}"
  export FERRY_METRICS_PORT="${FERRY_METRICS_PORT:-0}"
  export FERRY_AGENT_METRICS_PORT="${FERRY_AGENT_METRICS_PORT:-0}"
  kubectl apply -f "${ROOT}/examples/hosts.yaml" >/dev/null
  start_proc operator operator --standalone
  for h in "${HOSTS[@]}"; do
    start_proc "agent-${h}" agent --host "${h}" --data-dir "${LOCAL}/agents/${h}" --address 127.0.0.1
  done
  start_proc metadata metadata --listen "${FERRY_METADATA_LISTEN:-127.0.0.1:8169}"
  log "waiting for the hosts' agents"
  local deadline=$((SECONDS + 60))
  until [ "$(kubectl get hosts "${HOSTS[@]}" -o jsonpath='{.items[*].status.phase}')" = "Ready Ready Ready" ]; do
    [ "${SECONDS}" -lt "${deadline}" ] || { log "hosts not Ready; see ${LOCAL}/logs/"; exit 1; }
    sleep 0.5
  done
  log "ready: operator, agents on ${HOSTS[*]}, metadata endpoint. Logs: ${LOCAL}/logs"
  echo "export KUBECONFIG=${KUBECONFIG}"
  echo "export PATH=${CACHE}/bin:${ROOT}/.venv/bin:\${PATH}"
}

place_example() {
  kubectl apply -f "${ROOT}/examples/droplet.yaml" >/dev/null
  log "waiting for the example droplet to be placed and running"
  local deadline=$((SECONDS + 120)) host=""
  while [ "${SECONDS}" -lt "${deadline}" ]; do
    host="$(kubectl get droplet web-1 -o jsonpath='{.status.host}' 2>/dev/null || true)"
    if [ -n "${host}" ] && kubectl get host "${host}" -o jsonpath='{.status.agent.vms[*].name}' | grep -qw web-1; then
      break
    fi
    sleep 0.5
  done
  [ -n "${host}" ] || { log "the droplet was not placed; see ${LOCAL}/logs/"; exit 1; }
  log "web-1 runs on ${host}"
}

cmd_demo() {
  cmd_up >/dev/null
  eval "$(bash "${ROOT}/hack/cluster.sh" env)"
  export KUBECONFIG PATH="${CACHE}/bin:${PATH}"
  place_example
  kubectl get hosts
  kubectl get droplets
  log "migrating web-1 (the droplet is told first: notice ${FERRY_NOTICE_SECONDS:-5}s)"
  local rc=0
  # A bandwidth limit so the copy takes long enough to watch (and the guest's writes make it throttle).
  "${FERRY}" migrate web-1 --wait --bandwidth "${FERRY_DEMO_BANDWIDTH_MIBPS:-2}" || rc=$?
  kubectl get droplets
  kubectl get livemigrations
  echo
  echo "Everything is still running. Try:"
  echo "  export KUBECONFIG=${KUBECONFIG} PATH=${CACHE}/bin:${ROOT}/.venv/bin:\$PATH"
  echo "  ferry status; ferry migrate web-1 --wait; ferry drain host-a --wait"
  echo "  curl --interface 127.0.0.11 http://127.0.0.1:8169/v1/maintenance_event"
  echo "Stop it all with: hack/local-up.sh down"
  return "${rc}"
}

cmd_down() {
  local f pid
  for f in "${LOCAL}"/run/*.pid; do
    [ -f "${f}" ] || continue
    pid="$(cat "${f}")"
    kill -TERM "${pid}" 2>/dev/null || true
  done
  for f in "${LOCAL}"/run/*.pid; do
    [ -f "${f}" ] || continue
    pid="$(cat "${f}")"
    for _ in $(seq 1 100); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${pid}" 2>/dev/null || true
    rm -f "${f}"
  done
  # VM processes outlive agents by design: stop them too.
  for f in "${LOCAL}"/agents/*/vms/*/pid; do
    [ -f "${f}" ] || continue
    kill -KILL "$(cat "${f}")" 2>/dev/null || true
  done
  bash "${ROOT}/hack/cluster.sh" down
  rm -rf "${LOCAL}"
  log "stopped everything; removed ${LOCAL}"
}

case "${1:-demo}" in
  demo) cmd_demo ;;
  up) cmd_up ;;
  down) cmd_down ;;
  *) echo "usage: $0 [demo|up|down]" >&2; exit 2 ;;
esac
