#!/usr/bin/env bash
# Real Kubernetes nodes on this machine: the control plane of hack/cluster.sh (bound to a
# bridge address the pods route to, with kube-scheduler and the node-lifecycle controller)
# and one node per example host (host-a, host-b, host-c), each with
#   - its own network namespace (ferry-NODE) with one address on the bridge ferrybr0: the
#     agents' host-network data channels cross real interfaces, ports never collide, and the
#     metadata endpoint sees a droplet's real source address; and a VM bridge ferryvm (no
#     address) with a second uplink to ferrybr0, for the qemu guests' taps (the chart's
#     agent.network.vmBridge): guests' NICs on the same L2 segment as the nodes;
#   - its own mount namespace in which /run, /var/lib and /var/log are the node's own
#     directories (a node's hostPath /var/lib/ferry is its own; the pods' mounts live and die
#     with the node);
#   - its own containerd, kubelet (cgroup root /ferry-NODE), kube-proxy (iptables, in the
#     node's namespace) and bridge CNI (pod range 10.251.N.0/24).
#
#   hack/nodes.sh up              start everything (a no-op when it runs), wait until Ready
#   hack/nodes.sh down            stop everything and undo what `up` changed on the machine
#   hack/nodes.sh status          what runs
#   hack/nodes.sh env             print `export KUBECONFIG=...`
#   hack/nodes.sh load ARCHIVE    import an image archive (docker or OCI) into every node
#   hack/nodes.sh exec NODE CMD.. run a command in NODE's network namespace (as on the host)
#
# State lives under FERRY_NODES_DIR (default ${FERRY_CACHE:-~/.cache/ferry}/nodes). Addresses:
# nodes 10.250.0.11.. on ferrybr0 (10.250.0.1, kube-apiserver), pods 10.251.N.0/24, Services
# 10.252.0.0/24; `up` refuses to start if the machine routes any of them already. The node
# namespaces have no default route: pods and host-network pods reach the API server, Services
# and the other nodes, nothing else. Only one such cluster runs on a machine at a time.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${FERRY_CACHE:-${HOME}/.cache/ferry}"
BIN="${CACHE}/bin"
DIR="${FERRY_NODES_DIR:-${CACHE}/nodes}"
read -r -a NODE_NAMES <<< "${FERRY_NODE_NAMES:-host-a host-b host-c}"
BRIDGE=ferrybr0
VM_BRIDGE=ferryvm     # in each node's namespace: the qemu guests' taps
NET=10.250.0          # nodes: .1 the bridge (control plane), .11 .12 ... the nodes
POD_NET=10.251        # node i: 10.251.i.0/24
SERVICE_CIDR=10.252.0.0/24
CLUSTER_DIR="${DIR}/cluster"
PAUSE_IMAGE=localhost/pause:ferry
# What kubelet sets on the machine (kernel tunables) and `down` puts back.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
# Machine paths the node programs create outside their own directories; `down` removes the
# ones that did not exist before `up`.
MACHINE_PATHS=(/run/netns)

log() { echo "nodes: $*" >&2; }
die() { echo "nodes: $*" >&2; exit 1; }

node_ip() { echo "${NET}.$((11 + $1))"; }
pod_cidr() { echo "${POD_NET}.$(($1 + 1)).0/24"; }
ndir() { echo "${DIR}/nodes/$1"; }

pid_alive() {  # pid_alive PIDFILE [PATTERN]: the process runs (and its command line has PATTERN)
  local pid
  [ -f "$1" ] || return 1
  pid="$(cat "$1")"
  [ -n "${pid}" ] && [ -d "/proc/${pid}" ] || return 1
  [ -z "${2:-}" ] || tr '\0' ' ' < "/proc/${pid}/cmdline" 2>/dev/null | grep -qF -- "$2"
}

holder_pid() { cat "$(ndir "$1")/run/holder.pid"; }

start_in_node() {  # start_in_node NODE NAME CMD...: detached, logs and pid under the node dir
  local node="$1" name="$2" d; shift 2
  d="$(ndir "${node}")"
  setsid nsenter -t "$(holder_pid "${node}")" -m -n -- "$@" > "${d}/logs/${name}.log" 2>&1 < /dev/null &
  echo $! > "${d}/run/${name}.pid"
}

check_addresses() {
  local r
  for r in "${NET}.0/24" "${POD_NET}.0.0/16" "${SERVICE_CIDR}"; do
    if ip route show to match "${r%/*}" | grep -v '^default' | grep -q .; then
      die "the machine routes ${r} already ($(ip route show to match "${r%/*}" | head -1)); not starting"
    fi
  done
  ip link show "${BRIDGE}" >/dev/null 2>&1 && die "${BRIDGE} exists already (another nodes cluster? hack/nodes.sh down)"
  return 0
}

save_machine_state() {  # once per `up` from a clean machine: what `down` must put back
  [ -f "${DIR}/machine.env" ] && return 0
  {
    local s p
    for s in "${SYSCTLS[@]}"; do echo "sysctl ${s} $(sysctl -n "${s}")"; done
    for p in "${MACHINE_PATHS[@]}"; do
      if [ -e "${p}" ]; then echo "existed ${p}"; else echo "created ${p}"; fi
    done
  } > "${DIR}/machine.env.tmp"
  mv "${DIR}/machine.env.tmp" "${DIR}/machine.env"
}

issue_cert() {  # issue_cert OUT-PREFIX SUBJECT [SAN]: a client (and serving) cert of the cluster CA
  local pki="${CLUSTER_DIR}/pki" ext
  ext="$(mktemp)"
  if [ -n "${3:-}" ]; then
    printf 'subjectAltName=%s\nextendedKeyUsage=clientAuth,serverAuth\n' "$3" > "${ext}"
  else
    printf 'extendedKeyUsage=clientAuth\n' > "${ext}"
  fi
  openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" >/dev/null 2>&1
  openssl x509 -req -in "$1.csr" -CA "${pki}/ca.crt" -CAkey "${pki}/ca.key" -CAcreateserial \
    -out "$1.crt" -days 365 -extfile "${ext}" >/dev/null 2>&1
  rm -f "$1.csr" "${ext}"
}

kubeconfig_for() {  # kubeconfig_for FILE CERT-PREFIX
  # shellcheck source=/dev/null
  source "${CLUSTER_DIR}/ports.env"
  cat > "$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: ferry-nodes
  cluster:
    server: https://${NET}.1:${APISERVER_PORT}
    certificate-authority: ${CLUSTER_DIR}/pki/ca.crt
users:
- name: user
  user:
    client-certificate: $2.crt
    client-key: $2.key
contexts:
- name: ferry-nodes
  context: {cluster: ferry-nodes, user: user}
current-context: ferry-nodes
EOF
}

setup_network() {
  ip link add "${BRIDGE}" type bridge
  ip addr add "${NET}.1/24" dev "${BRIDGE}"
  ip link set "${BRIDGE}" up
  local i node ns veth j
  for i in "${!NODE_NAMES[@]}"; do
    node="${NODE_NAMES[$i]}"; ns="ferry-${node}"; veth="fv-${node:0:12}"
    ip netns add "${ns}"
    ip link add "${veth}" type veth peer name eth0 netns "${ns}"
    ip link set "${veth}" master "${BRIDGE}" up
    ip -n "${ns}" link set lo up
    ip -n "${ns}" addr add "$(node_ip "${i}")/24" dev eth0
    ip -n "${ns}" link set eth0 up
    # the VM bridge: a port of the L2 segment for the guests' taps (a host's VM bridge
    # enslaving its uplink, as in a data center, without moving the node's own address)
    ip link add "fm-${node:0:12}" type veth peer name vmlink netns "${ns}"
    ip link set "fm-${node:0:12}" master "${BRIDGE}" up
    ip -n "${ns}" link add "${VM_BRIDGE}" type bridge
    ip -n "${ns}" link set vmlink master "${VM_BRIDGE}" up
    ip -n "${ns}" link set "${VM_BRIDGE}" up
    # No default route: Services through the control plane's side (kube-proxy rewrites them
    # before they leave), the other nodes' pods through those nodes.
    ip -n "${ns}" route add "${SERVICE_CIDR}" via "${NET}.1"
    for j in "${!NODE_NAMES[@]}"; do
      [ "${j}" = "${i}" ] || ip -n "${ns}" route add "$(pod_cidr "${j}")" via "$(node_ip "${j}")"
    done
  done
}

make_cgroups() {  # make_cgroups NODE: the node's cgroup root in every v1 hierarchy
  local h
  for h in /sys/fs/cgroup/*/; do
    [ -d "${h}" ] || continue
    mkdir -p "${h}ferry-$1"
    if [ -f "${h}cpuset.cpus" ]; then
      cat "${h}cpuset.cpus" > "${h}ferry-$1/cpuset.cpus"
      cat "${h}cpuset.mems" > "${h}ferry-$1/cpuset.mems"
    fi
  done
}

write_node_config() {  # write_node_config INDEX
  local i="$1" node="${NODE_NAMES[$1]}" d
  d="$(ndir "${node}")"
  mkdir -p "${d}/fs/run" "${d}/fs/var/lib" "${d}/fs/var/log" "${d}/run" "${d}/logs" "${d}/pki" "${d}/etc/cni/net.d"
  cat > "${d}/etc/containerd.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${PAUSE_IMAGE}"
  # Processes here lack CAP_SYS_RESOURCE: no negative oom_score_adj for the sandboxes.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "${d}/etc/cni/net.d"
    max_conf_num = 1
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"
EOF
  cat > "${d}/etc/cni/net.d/10-ferry.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "ferry-pods",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$(pod_cidr "${i}")"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat > "${d}/etc/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroup v1 hierarchies; kubelet 1.37 only warns with this.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /ferry-${node}
# No CAP_SYS_RESOURCE here: kubelet must not lower its own oom_score_adj.
oomScoreAdj: 0
failSwapOn: false
containerRuntimeEndpoint: unix://${d}/fs/run/containerd/containerd.sock
imageServiceEndpoint: unix://${d}/fs/run/containerd/containerd.sock
address: $(node_ip "${i}")
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: ${CLUSTER_DIR}/pki/ca.crt}
authorization:
  mode: Webhook
tlsCertFile: ${d}/pki/kubelet-serving.crt
tlsPrivateKeyFile: ${d}/pki/kubelet-serving.key
# No cluster DNS and none of the machine's resolvers: nothing here needs names.
resolvConf: ""
clusterDomain: cluster.local
evictionHard: {memory.available: 100Mi, nodefs.available: "2%", imagefs.available: "2%", nodefs.inodesFree: "2%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
maxPods: 50
EOF
  cat > "${d}/etc/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: ${d}/kube-proxy.kubeconfig}
hostnameOverride: ${node}
mode: iptables
clusterCIDR: ${POD_NET}.0.0/16
bindAddress: $(node_ip "${i}")
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# Leave the machine-wide conntrack table size and timeouts alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  issue_cert "${d}/pki/kubelet-client" "/O=system:nodes/CN=system:node:${node}"
  issue_cert "${d}/pki/kubelet-serving" "/O=system:nodes/CN=system:node:${node}" "IP:$(node_ip "${i}"),DNS:${node}"
  kubeconfig_for "${d}/kubelet.kubeconfig" "${d}/pki/kubelet-client"
  kubeconfig_for "${d}/kube-proxy.kubeconfig" "${CLUSTER_DIR}/pki/kube-proxy"
}

start_holder() {  # the node's mount namespace, held by one sleeping process
  local node="$1" d
  d="$(ndir "${node}")"
  # /run, /var/lib and /var/log become the node's own (its containerd, kubelet, pods and
  # hostPath volumes write there); nothing mounted inside propagates back to the machine.
  setsid nsenter --net="/run/netns/ferry-${node}" -- unshare --mount --propagation private -- \
    /bin/sh -ec "
      mount --bind '${d}/fs/run' /run
      mount --bind '${d}/fs/var/lib' /var/lib
      mount --bind '${d}/fs/var/log' /var/log
      echo ready > '${d}/run/holder.ready'
      exec sleep infinity" > "${d}/logs/holder.log" 2>&1 < /dev/null &
  echo $! > "${d}/run/holder.pid"
  local deadline=$((SECONDS + 10))
  until [ -f "${d}/run/holder.ready" ]; do
    [ "${SECONDS}" -lt "${deadline}" ] || die "the mount namespace of ${node} did not come up: $(cat "${d}/logs/holder.log")"
    sleep 0.1
  done
  # The sleeping process, not the unshare/sh wrapper, is what holds the namespaces.
  local pid
  pid="$(cat "${d}/run/holder.pid")"
  echo "${pid}" > "${d}/run/holder.pid"
}

wait_socket() {  # wait_socket NODE
  local sock
  sock="$(ndir "$1")/fs/run/containerd/containerd.sock"
  local deadline=$((SECONDS + 30))
  until ctr -a "${sock}" version >/dev/null 2>&1; do
    pid_alive "$(ndir "$1")/run/containerd.pid" || die "containerd of $1 exited: $(tail -n 20 "$(ndir "$1")/logs/containerd.log")"
    [ "${SECONDS}" -lt "${deadline}" ] || die "containerd of $1 did not answer in 30s"
    sleep 0.2
  done
}

pause_archive() {  # the sandbox image: ferry's static pause program, FROM scratch
  local out="${CACHE}/images/pause-ferry.tar" work
  if [ ! -f "${out}" ] || [ "${BIN}/pause" -nt "${out}" ]; then
    mkdir -p "${CACHE}/images"
    work="$(mktemp -d)"
    cp "$(readlink -f "${BIN}/pause")" "${work}/pause"
    printf 'FROM scratch\nCOPY pause /pause\nENTRYPOINT ["/pause"]\n' > "${work}/Containerfile"
    buildah --storage-driver vfs --root "${CACHE}/images/storage" --runroot "${CACHE}/images/runroot" \
      bud --isolation chroot -f "${work}/Containerfile" -t "${PAUSE_IMAGE}" "${work}" >/dev/null 2>&1
    rm -f "${out}"
    buildah --storage-driver vfs --root "${CACHE}/images/storage" --runroot "${CACHE}/images/runroot" \
      push "${PAUSE_IMAGE}" "docker-archive:${out}:${PAUSE_IMAGE}" >/dev/null 2>&1
    rm -rf "${work}"
  fi
  echo "${out}"
}

import_archive() {  # import_archive NODE ARCHIVE
  ctr -a "$(ndir "$1")/fs/run/containerd/containerd.sock" -n k8s.io images import "$2" >/dev/null
}

cmd_up() {
  [ "$(id -u)" -eq 0 ] || die "run as root (network namespaces, cgroups, mounts)"
  if [ -f "${DIR}/up.done" ] && cmd_status >/dev/null 2>&1; then
    log "already running (state in ${DIR})"
    echo "export KUBECONFIG=${CLUSTER_DIR}/kubeconfig"
    return 0
  fi
  if [ -d "${DIR}" ]; then cmd_down >/dev/null 2>&1 || true; fi
  local b
  for b in kubelet kube-proxy kube-scheduler pause kube-apiserver kubectl; do
    [ -x "${BIN}/${b}" ] || { bash "${HERE}/build-binaries.sh" nodes >/dev/null || die "could not build the binaries"; break; }
  done
  for b in containerd containerd-shim-runc-v2 runc ctr iptables nsenter unshare buildah; do
    command -v "${b}" >/dev/null || die "${b} not found (hack/setup.sh nodes installs it)"
  done
  [ -x /usr/lib/cni/bridge ] || die "no CNI plugins in /usr/lib/cni (apt-get install containernetworking-plugins)"
  check_addresses
  local t0=${SECONDS} i node d
  mkdir -p "${DIR}"
  save_machine_state
  setup_network
  FERRY_CLUSTER_DIR="${CLUSTER_DIR}" FERRY_CLUSTER_ADDRESS="${NET}.1" FERRY_CLUSTER_NODES=1 \
    FERRY_SERVICE_CIDR="${SERVICE_CIDR}" bash "${HERE}/cluster.sh" up >/dev/null
  local pause
  pause="$(pause_archive)"
  for i in "${!NODE_NAMES[@]}"; do
    node="${NODE_NAMES[$i]}"; d="$(ndir "${node}")"
    write_node_config "${i}"
    make_cgroups "${node}"
    start_holder "${node}"
    start_in_node "${node}" containerd containerd --config "${d}/etc/containerd.toml"
  done
  for i in "${!NODE_NAMES[@]}"; do
    node="${NODE_NAMES[$i]}"; d="$(ndir "${node}")"
    wait_socket "${node}"
    import_archive "${node}" "${pause}"
    start_in_node "${node}" kubelet "${BIN}/kubelet" --config "${d}/etc/kubelet.yaml" \
      --kubeconfig "${d}/kubelet.kubeconfig" --hostname-override "${node}" \
      --node-ip "$(node_ip "${i}")" --root-dir /var/lib/kubelet --cert-dir "${d}/pki" --v 1
    start_in_node "${node}" kube-proxy "${BIN}/kube-proxy" --config "${d}/etc/kube-proxy.yaml" --v 1
  done
  local k=("${BIN}/kubectl" --kubeconfig "${CLUSTER_DIR}/kubeconfig")
  local deadline=$((SECONDS + 120))
  until [ "$("${k[@]}" get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{" "}{.spec.taints}{"\n"}{end}' 2>/dev/null | grep -c '^True $')" -eq "${#NODE_NAMES[@]}" ]; do
    for node in "${NODE_NAMES[@]}"; do
      for b in containerd kubelet kube-proxy; do
        pid_alive "$(ndir "${node}")/run/${b}.pid" || die "${b} of ${node} exited: $(tail -n 20 "$(ndir "${node}")/logs/${b}.log")"
      done
    done
    [ "${SECONDS}" -lt "${deadline}" ] || die "nodes not Ready and untainted after 120s: $("${k[@]}" get nodes 2>&1)"
    sleep 1
  done
  touch "${DIR}/up.done"
  log "${#NODE_NAMES[@]} nodes Ready in $((SECONDS - t0))s: ${NODE_NAMES[*]} (state in ${DIR})"
  echo "export KUBECONFIG=${CLUSTER_DIR}/kubeconfig"
}

kill_pids() {  # kill_pids SIGNAL PID...
  local sig="$1"; shift
  [ "$#" -gt 0 ] || return 0
  kill "-${sig}" "$@" 2>/dev/null || true
}

procs_in_ns() {  # procs_in_ns NSFILE-INODE: processes whose mount namespace is that one
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "${p}/ns/mnt" 2>/dev/null)" = "$1" ] && echo "${p#/proc/}"
  done
  return 0
}

procs_in_cgroups() {  # procs_in_cgroups NODE: processes in the node's cgroups (its pods)
  local f
  for f in /sys/fs/cgroup/*/ferry-"$1"; do
    [ -d "${f}" ] || continue
    find "${f}" -name cgroup.procs -exec cat {} + 2>/dev/null
  done | sort -u
}

stop_node() {
  local node="$1" d mntns pids deadline
  d="$(ndir "${node}")"
  mntns=""
  if pid_alive "${d}/run/holder.pid" sleep; then mntns="$(readlink "/proc/$(cat "${d}/run/holder.pid")/ns/mnt")"; fi
  # kubelet and kube-proxy first (nothing restarts the pods), then the pods, then containerd
  # and its shims, then the namespace's holder.
  for b in kubelet kube-proxy; do
    pid_alive "${d}/run/${b}.pid" && kill_pids TERM "$(cat "${d}/run/${b}.pid")"
  done
  deadline=$((SECONDS + 10))
  while pid_alive "${d}/run/kubelet.pid" || pid_alive "${d}/run/kube-proxy.pid"; do
    [ "${SECONDS}" -lt "${deadline}" ] || { kill_pids KILL "$(cat "${d}/run/kubelet.pid")" "$(cat "${d}/run/kube-proxy.pid")"; sleep 0.2; break; }
    sleep 0.1
  done
  deadline=$((SECONDS + 20))
  while :; do
    mapfile -t pids < <(procs_in_cgroups "${node}")
    [ "${#pids[@]}" -gt 0 ] || break
    kill_pids KILL "${pids[@]}"
    [ "${SECONDS}" -lt "${deadline}" ] || { log "processes of ${node}'s pods would not die: ${pids[*]}"; break; }
    sleep 0.2
  done
  if [ -n "${mntns}" ]; then
    deadline=$((SECONDS + 20))
    while :; do
      mapfile -t pids < <(procs_in_ns "${mntns}")
      [ "${#pids[@]}" -gt 0 ] || break
      kill_pids TERM "${pids[@]}"
      sleep 0.5
      mapfile -t pids < <(procs_in_ns "${mntns}")
      kill_pids KILL "${pids[@]}"
      [ "${SECONDS}" -lt "${deadline}" ] || { log "processes of ${node} would not die: ${pids[*]}"; break; }
    done
  fi
  local f
  for f in "${d}"/run/*.pid; do
    [ -f "${f}" ] && pid_alive "${f}" "${d}" && kill_pids KILL "$(cat "${f}")"
  done
  # The node's cgroups, deepest first (a cgroup goes once its processes are gone).
  for f in /sys/fs/cgroup/*/ferry-"${node}"; do
    [ -d "${f}" ] || continue
    deadline=$((SECONDS + 10))
    until find "${f}" -depth -type d -exec rmdir {} + 2>/dev/null; [ ! -d "${f}" ]; do
      [ "${SECONDS}" -lt "${deadline}" ] || { log "could not remove ${f}"; break; }
      sleep 0.2
    done
  done
}

remove_node_network() {  # after every node's processes are gone
  local node="$1" veth="fv-${1:0:12}" deadline
  # Connections the killed processes left (FIN sent, not yet acknowledged) keep the
  # namespace alive after `ip netns del`; they finish while the other nodes still answer.
  deadline=$((SECONDS + 15))
  while ip netns exec "ferry-${node}" ss -Htan 2>/dev/null | grep -Evq '^(LISTEN|TIME-WAIT)'; do
    [ "${SECONDS}" -lt "${deadline}" ] || break
    sleep 0.2
  done
  ip netns del "ferry-${node}" 2>/dev/null || true
  # A namespace still held by the kernel (lingering sockets) keeps its veth: delete it here.
  deadline=$((SECONDS + 5))
  while ip link show "${veth}" >/dev/null 2>&1 || ip link show "fm-${node:0:12}" >/dev/null 2>&1; do
    if [ "${SECONDS}" -ge "${deadline}" ]; then
      ip link del "${veth}" 2>/dev/null || true
      ip link del "fm-${node:0:12}" 2>/dev/null || true
      break
    fi
    sleep 0.1
  done
}

cmd_down() {
  [ -d "${DIR}" ] || { log "not running (no ${DIR})"; return 0; }
  local node
  local t0=${SECONDS}
  for node in "${NODE_NAMES[@]}"; do stop_node "${node}" & done
  wait
  log "node processes stopped in $((SECONDS - t0))s"
  # The control plane before the network: its connections to the nodes can still close.
  FERRY_CLUSTER_DIR="${CLUSTER_DIR}" bash "${HERE}/cluster.sh" down >/dev/null 2>&1 || true
  log "control plane stopped at $((SECONDS - t0))s"
  for node in "${NODE_NAMES[@]}"; do remove_node_network "${node}"; done
  ip link del "${BRIDGE}" 2>/dev/null || true
  log "node networks removed at $((SECONDS - t0))s"
  if [ -f "${DIR}/machine.env" ]; then
    local what key value
    while read -r what key value; do
      case "${what}" in
        sysctl) [ "$(sysctl -n "${key}")" = "${value}" ] || sysctl -q -w "${key}=${value}" ;;
        # `ip netns add` bind-mounts /run/netns onto itself (shared) when it makes it.
        created) if [ -d "${key}" ] && [ -z "$(ls -A "${key}")" ]; then
                   while mountpoint -q "${key}"; do umount "${key}" || break; done
                   rmdir "${key}" 2>/dev/null || true
                 fi ;;
      esac
    done < "${DIR}/machine.env"
  fi
  # Mounts left under the state directory (none expected: they lived in the nodes' namespaces).
  local m
  while read -r m; do umount -l "${m}" 2>/dev/null || true; done < <(awk -v d="${DIR}" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
  rm -rf "${DIR}"
  log "stopped; removed ${DIR}"
}

cmd_status() {
  local rc=0 node b
  FERRY_CLUSTER_DIR="${CLUSTER_DIR}" bash "${HERE}/cluster.sh" status || rc=1
  for node in "${NODE_NAMES[@]}"; do
    for b in containerd kubelet kube-proxy; do
      if pid_alive "$(ndir "${node}")/run/${b}.pid"; then
        echo "${node} ${b}: running (pid $(cat "$(ndir "${node}")/run/${b}.pid"))"
      else
        echo "${node} ${b}: stopped"; rc=1
      fi
    done
  done
  return "${rc}"
}

cmd_load() {
  [ -f "${1:-}" ] || die "usage: hack/nodes.sh load ARCHIVE (a docker or OCI image archive)"
  local node t0=${SECONDS}
  for node in "${NODE_NAMES[@]}"; do import_archive "${node}" "$1" & done
  wait
  log "imported $(basename "$1") into ${NODE_NAMES[*]} in $((SECONDS - t0))s"
}

cmd_exec() {
  local node="${1:-}"; shift || true
  if [ -z "${node}" ] || [ "$#" -eq 0 ]; then die "usage: hack/nodes.sh exec NODE CMD..."; fi
  exec ip netns exec "ferry-${node}" "$@"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  env) [ -f "${DIR}/up.done" ] || die "not running; start with: hack/nodes.sh up"; echo "export KUBECONFIG=${CLUSTER_DIR}/kubeconfig" ;;
  load) shift; cmd_load "$@" ;;
  exec) shift; cmd_exec "$@" ;;
  *) echo "usage: $0 up|down|status|env|load ARCHIVE|exec NODE CMD..." >&2; exit 2 ;;
esac
