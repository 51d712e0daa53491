#!/usr/bin/env bash
# A real Kubernetes control plane on loopback: etcd, kube-apiserver and
# kube-controller-manager, with client-certificate authentication, RBAC + Node
# authorization, service-account signing keys and the TokenRequest API.
#
#   hack/cluster.sh up      start (a no-op that prints where it is when already running)
#   hack/cluster.sh down    stop exactly the processes `up` started and remove their state
#   hack/cluster.sh env     print `export KUBECONFIG=...` for the running cluster
#   hack/cluster.sh status  say whether it runs
#
# Everything lives under one directory, FERRY_CLUSTER_DIR (default
# ${FERRY_CACHE:-~/.cache/ferry}/cluster). Ports are chosen free at `up` and recorded there,
# so the cluster never collides with other services on the machine.
# FERRY_CRDS=1 (default) also applies crds/ and waits until they are established.
#
# For real nodes (hack/nodes.sh) three more settings:
#   FERRY_CLUSTER_ADDRESS    the address kube-apiserver binds and advertises (default 127.0.0.1);
#                            pods reach it there through the `kubernetes` Service
#   FERRY_CLUSTER_NODES=1    also run kube-scheduler, the node-lifecycle controller (it removes
#                            the not-ready taint), the endpoint reconciler, and give
#                            kube-apiserver a client certificate for the kubelets (logs/exec)
#   FERRY_SERVICE_CIDR       the Services' range (default 10.0.0.0/24)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "${HERE}/.." && pwd)"
CACHE="${FERRY_CACHE:-${HOME}/.cache/ferry}"
DIR="${FERRY_CLUSTER_DIR:-${CACHE}/cluster}"
BIN="${CACHE}/bin"
ADDRESS="${FERRY_CLUSTER_ADDRESS:-127.0.0.1}"
NODES="${FERRY_CLUSTER_NODES:-0}"
SERVICE_CIDR="${FERRY_SERVICE_CIDR:-10.0.0.0/24}"
# The `kubernetes` Service's ClusterIP: the first address of the range (a /24 or larger here).
SERVICE_IP="$(echo "${SERVICE_CIDR%/*}" | awk -F. '{print $1"."$2"."$3"."$4+1}')"

log() { echo "cluster: $*" >&2; }
die() { echo "cluster: $*" >&2; exit 1; }

alive() {  # alive NAME: the recorded process runs and is ours (its command line names our state dir)
  local pidf="${DIR}/run/$1.pid" pid
  [ -f "${pidf}" ] || return 1
  pid="$(cat "${pidf}")"
  [ -d "/proc/${pid}" ] || return 1
  tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null | grep -qF -- "${DIR}"
}

free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

gen_certs() {
  local pki="${DIR}/pki"
  mkdir -p "${pki}"
  (
    cd "${pki}"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 365 \
      -subj "/CN=ferry-local-ca" >/dev/null 2>&1
    cat > server.ext <<EOF
subjectAltName=IP:127.0.0.1,IP:${ADDRESS},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:${SERVICE_IP}
extendedKeyUsage=serverAuth
EOF
    cat > client.ext <<EOF
extendedKeyUsage=clientAuth
EOF
    issue() {  # issue NAME SUBJECT EXTFILE
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" >/dev/null 2>&1
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" \
        -days 365 -extfile "$3" >/dev/null 2>&1
      rm -f "$1.csr"
    }
    issue apiserver "/CN=kube-apiserver" server.ext
    issue admin "/O=system:masters/CN=ferry-admin" client.ext
    issue controller-manager "/CN=system:kube-controller-manager" client.ext
    if [ "${NODES}" = 1 ]; then
      issue scheduler "/CN=system:kube-scheduler" client.ext
      issue kube-proxy "/CN=system:kube-proxy" client.ext
      # kube-apiserver's identity towards the kubelets (logs, exec, port-forward).
      issue apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client.ext
    fi
    openssl genrsa -out sa.key 2048 >/dev/null 2>&1
    openssl rsa -in sa.key -pubout -out sa.pub >/dev/null 2>&1
  )
}

write_kubeconfig() {  # write_kubeconfig FILE USER
  local pki="${DIR}/pki"
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferry-local
  cluster:
    server: https://${ADDRESS}:${APISERVER_PORT}
    certificate-authority: ${pki}/ca.crt
users:
- name: $2
  user:
    client-certificate: ${pki}/$2.crt
    client-key: ${pki}/$2.key
contexts:
- name: ferry-local
  context:
    cluster: ferry-local
    user: $2
current-context: ferry-local
EOF
}

wait_ready() {
  local deadline=$((SECONDS + ${1:-90}))
  while [ "${SECONDS}" -lt "${deadline}" ]; do
    if curl -fsS --max-time 2 --cacert "${DIR}/pki/ca.crt" --cert "${DIR}/pki/admin.crt" \
        --key "${DIR}/pki/admin.key" "https://${ADDRESS}:${APISERVER_PORT}/readyz" >/dev/null 2>&1; then
      return 0
    fi
    for p in etcd kube-apiserver; do
      alive "${p}" || die "${p} exited during start; last lines of ${DIR}/logs/${p}.log:
$(tail -n 20 "${DIR}/logs/${p}.log")"
    done
    sleep 0.3
  done
  die "kube-apiserver not ready after ${1:-90}s; see ${DIR}/logs/kube-apiserver.log"
}

start() {  # start NAME CMD...: detached, own session, logs and pid under DIR
  local name="$1"; shift
  setsid "$@" >"${DIR}/logs/${name}.log" 2>&1 < /dev/null &
  echo $! > "${DIR}/run/${name}.pid"
}

apply_crds() {  # idempotent: server-side apply of crds/, then wait until established
  [ "${FERRY_CRDS:-1}" = 1 ] || return 0
  "${BIN}/kubectl" --kubeconfig "${DIR}/kubeconfig" apply --server-side --force-conflicts -f "${ROOT}/crds/" >/dev/null
  "${BIN}/kubectl" --kubeconfig "${DIR}/kubeconfig" wait --for condition=established --timeout 60s \
    -f "${ROOT}/crds/" >/dev/null
}

cmd_up() {
  if alive kube-apiserver && alive etcd; then
    # shellcheck source=/dev/null
    source "${DIR}/ports.env"
    apply_crds
    log "already running: https://${ADDRESS}:${APISERVER_PORT} (state in ${DIR})"
    echo "export KUBECONFIG=${DIR}/kubeconfig"
    return 0
  fi
  # A half-started or crashed previous cluster: clean it up first.
  if [ -d "${DIR}" ]; then cmd_down >/dev/null 2>&1 || true; fi
  for b in etcd kube-apiserver kube-controller-manager kubectl; do
    [ -x "${BIN}/${b}" ] || "${HERE}/build-binaries.sh" >/dev/null || die "could not build the control-plane binaries"
  done
  local t0=${SECONDS}
  mkdir -p "${DIR}/run" "${DIR}/logs" "${DIR}/etcd"
  ETCD_PORT="$(free_port)"; ETCD_PEER_PORT="$(free_port)"; APISERVER_PORT="$(free_port)"
  CM_PORT="$(free_port)"; SCHED_PORT="$(free_port)"
  cat > "${DIR}/ports.env" <<EOF
ETCD_PORT=${ETCD_PORT}
ETCD_PEER_PORT=${ETCD_PEER_PORT}
APISERVER_PORT=${APISERVER_PORT}
CM_PORT=${CM_PORT}
SCHED_PORT=${SCHED_PORT}
ADDRESS=${ADDRESS}
EOF
  gen_certs
  write_kubeconfig "${DIR}/kubeconfig" admin
  write_kubeconfig "${DIR}/controller-manager.kubeconfig" controller-manager

  start etcd "${BIN}/etcd" --name ferry --data-dir "${DIR}/etcd" \
    --listen-client-urls "http://127.0.0.1:${ETCD_PORT}" \
    --advertise-client-urls "http://127.0.0.1:${ETCD_PORT}" \
    --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster "ferry=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --listen-metrics-urls "" --log-level warn \
    --quota-backend-bytes 2147483648 --unsafe-no-fsync

  local node_args=(--endpoint-reconciler-type none)
  local disabled="-node-ipam-controller,-node-lifecycle-controller,"
  if [ "${NODES}" = 1 ]; then
    node_args=(--endpoint-reconciler-type lease
      --kubelet-client-certificate "${DIR}/pki/apiserver-kubelet-client.crt"
      --kubelet-client-key "${DIR}/pki/apiserver-kubelet-client.key"
      --kubelet-preferred-address-types InternalIP)
    disabled="-node-ipam-controller,"
  fi
  start kube-apiserver "${BIN}/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:${ETCD_PORT}" \
    --etcd-prefix "/registry-${APISERVER_PORT}" \
    --bind-address "${ADDRESS}" --advertise-address "${ADDRESS}" --secure-port "${APISERVER_PORT}" \
    --tls-cert-file "${DIR}/pki/apiserver.crt" --tls-private-key-file "${DIR}/pki/apiserver.key" \
    --client-ca-file "${DIR}/pki/ca.crt" \
    --authorization-mode Node,RBAC \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "${DIR}/pki/sa.pub" \
    --service-account-signing-key-file "${DIR}/pki/sa.key" \
    --api-audiences "https://kubernetes.default.svc.cluster.local" \
    --service-cluster-ip-range "${SERVICE_CIDR}" "${node_args[@]}" \
    --enable-admission-plugins NodeRestriction \
    --allow-privileged=true --profiling=false --enable-priority-and-fairness=false \
    --v 1 "--cert-dir=${DIR}/pki"

  wait_ready 90

  start kube-controller-manager "${BIN}/kube-controller-manager" \
    --kubeconfig "${DIR}/controller-manager.kubeconfig" \
    --authentication-kubeconfig "${DIR}/controller-manager.kubeconfig" \
    --authorization-kubeconfig "${DIR}/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "${CM_PORT}" \
    --service-account-private-key-file "${DIR}/pki/sa.key" \
    --root-ca-file "${DIR}/pki/ca.crt" \
    --use-service-account-credentials=true \
    --leader-elect=false \
    --controllers "*,${disabled}-persistentvolume-binder-controller,-persistentvolume-attach-detach-controller,-persistentvolume-expander-controller,-ttl-controller" \
    --concurrent-gc-syncs 5 --v 1 "--cert-dir=${DIR}/pki/cm"

  if [ "${NODES}" = 1 ]; then
    write_kubeconfig "${DIR}/scheduler.kubeconfig" scheduler
    start kube-scheduler "${BIN}/kube-scheduler" \
      --kubeconfig "${DIR}/scheduler.kubeconfig" \
      --authentication-kubeconfig "${DIR}/scheduler.kubeconfig" \
      --authorization-kubeconfig "${DIR}/scheduler.kubeconfig" \
      --bind-address 127.0.0.1 --secure-port "${SCHED_PORT}" --leader-elect=false \
      --v 1 "--cert-dir=${DIR}/pki/scheduler"
  fi

  apply_crds
  log "ready in $((SECONDS - t0))s: https://${ADDRESS}:${APISERVER_PORT} (state in ${DIR})"
  echo "export KUBECONFIG=${DIR}/kubeconfig"
}

cmd_down() {
  [ -d "${DIR}" ] || { log "not running (no ${DIR})"; return 0; }
  # One after the other, etcd last: kube-apiserver removes its endpoint lease on the way out
  # and waits for etcd to do it.
  local names=(kube-scheduler kube-controller-manager kube-apiserver etcd) n deadline
  for n in "${names[@]}"; do
    alive "${n}" || continue
    kill -TERM "$(cat "${DIR}/run/${n}.pid")" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while alive "${n}"; do
      if [ "${SECONDS}" -ge "${deadline}" ]; then
        kill -KILL "$(cat "${DIR}/run/${n}.pid")" 2>/dev/null || true
        sleep 0.2
        continue
      fi
      sleep 0.1
    done
  done
  rm -rf "${DIR}"
  log "stopped; removed ${DIR}"
}

cmd_env() {
  alive kube-apiserver || die "not running; start it with: hack/cluster.sh up"
  echo "export KUBECONFIG=${DIR}/kubeconfig"
}

cmd_status() {
  local n ok=0
  local names=(etcd kube-apiserver kube-controller-manager)
  [ ! -f "${DIR}/run/kube-scheduler.pid" ] || names+=(kube-scheduler)
  for n in "${names[@]}"; do
    if alive "${n}"; then echo "${n}: running (pid $(cat "${DIR}/run/${n}.pid"))"; else echo "${n}: stopped"; ok=1; fi
  done
  return "${ok}"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|env|status" >&2; exit 2 ;;
esac
