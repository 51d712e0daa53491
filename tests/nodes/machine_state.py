"""What `hack/nodes.sh up` could leave on the machine, read from the kernel and the file system.

``python tests/nodes/machine_state.py > before.json`` records it before ``up``;
``tests/nodes/test_down.py`` compares the machine after ``down`` with that record, one
kind of leftover at a time: processes, mounts, network namespaces, links (veths, bridges),
iptables chains and rules, cgroups, sysctls and the paths the node programs would create.
Only the machine's own (root) namespaces are read: everything inside a node's namespaces
goes with them, and a leftover namespace is itself reported.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

# Programs only a node runs: none may outlive `down`. (The control plane's etcd and
# kube-apiserver are recognised by the state directory in their command line: other control
# planes, e.g. of concurrent integration tests, may run on the machine.)
NODE_PROGRAMS = ("kubelet", "kube-proxy", "kube-scheduler", "containerd", "containerd-shim-runc-v2",
                 "runc", "pause")
# Paths a kubelet, containerd or CNI plugin creates when not told otherwise.
MACHINE_PATHS = ("/run/netns", "/run/containerd", "/var/lib/cni", "/var/log/containers", "/var/log/pods",
                 "/var/lib/kubelet", "/var/lib/containerd", "/etc/cni/net.d", "/opt/cni", "/var/lib/ferry")
# Counters and other values the kernel changes by itself.
VOLATILE_SYSCTL_PREFIXES = ("fs.dentry-state", "fs.file-nr", "fs.inode-", "kernel.random.", "kernel.ns_last_pid",
                            "net.netfilter.nf_conntrack_count", "kernel.pty.nr", "fs.quota.", "kernel.tainted",
                            "fs.aio-nr", "vm.stat", "kernel.sched_", "net.ipv4.tcp_mem", "net.ipv4.udp_mem",
                            "net.ipv4.route.", "net.ipv6.route.", "fs.binfmt_misc", "fs.fanotify", "fs.inotify",
                            "kernel.perf_event", "vm.nr_", "fs.pipe", "user.", "kernel.keys.persistent")


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout


def processes() -> dict[str, str]:
    """The node and control-plane programs, and anything naming the nodes' state directory."""
    state_dir = os.environ.get("FERRY_NODES_DIR") or "/nonexistent/ferry-nodes"
    own_netns = os.readlink("/proc/self/ns/net")
    out = {}
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) in (os.getpid(), os.getppid()):
            continue
        try:
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        prog = os.path.basename(cmdline.split(" ", 1)[0]) if cmdline else ""
        try:
            # A process in another network namespace: a node's (its holder, a pod), unless the
            # kernel's own (kernel threads have no command line).
            elsewhere = bool(cmdline) and os.readlink(p / "ns" / "net") != own_netns
        except OSError:
            elsewhere = False
        if prog in NODE_PROGRAMS or state_dir in cmdline or elsewhere:
            out[p.name] = cmdline
    return out


def mounts() -> list[str]:
    lines = pathlib.Path("/proc/self/mountinfo").read_text().splitlines()
    return sorted({f"{line.split()[4]} {line.split(' - ')[1].split()[0]}" for line in lines})


def netns() -> list[str]:
    return sorted(line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip())


def links() -> list[str]:
    return sorted(line.split(":")[1].strip().split("@")[0] for line in _run("ip", "-o", "link").splitlines())


def addresses() -> list[str]:
    return sorted(" ".join(line.split()[1:4]) for line in _run("ip", "-o", "addr").splitlines())


def routes() -> list[str]:
    return sorted(_run("ip", "route", "show", "table", "all").splitlines())


def iptables() -> list[str]:
    rules = []
    for tool in ("iptables-save", "ip6tables-save"):
        for line in _run(tool).splitlines():
            if line.startswith("#"):
                continue
            if line.startswith(":"):  # chain with its counters: keep the name and policy
                line = " ".join(line.split()[:2])
            rules.append(f"{tool} {line}")
    return sorted(rules)


def cgroups() -> list[str]:
    root = pathlib.Path("/sys/fs/cgroup")
    out = []
    for hierarchy in sorted(root.iterdir()):
        if not hierarchy.is_dir():
            continue
        for top in hierarchy.iterdir():
            if top.is_dir():
                out.append(str(top))
                out.extend(str(d) for d in top.iterdir() if d.is_dir())
    return sorted(out)


def sysctls() -> dict[str, str]:
    out = {}
    for line in _run("sysctl", "-a").splitlines():
        key, sep, value = line.partition(" = ")
        if sep and not key.startswith(VOLATILE_SYSCTL_PREFIXES):
            out[key] = value
    return out


def paths() -> dict[str, bool]:
    return {p: os.path.lexists(p) for p in MACHINE_PATHS}


def snapshot() -> dict:
    return {"processes": processes(), "mounts": mounts(), "netns": netns(), "links": links(),
            "addresses": addresses(), "routes": routes(), "iptables": iptables(), "cgroups": cgroups(),
            "sysctls": sysctls(), "paths": paths()}


if __name__ == "__main__":
    json.dump(snapshot(), sys.stdout, indent=1, sort_keys=True)
