"""Where a droplet's address lives: the network fabric. One interface, two implementations.

A droplet keeps its address (``spec.ip``) when it moves. The agent of the host that runs the
droplet's guest *claims* the address on its node; at the network cut-over (after the target's
guest resumed, before the target reports Running) the target's agent claims it, and the source's
agent *releases* it when it destroys its paused copy (docs/architecture.md, "The droplet's
address").

- ``LoopbackFabric`` (local dev: ``hack/local-up.sh``, the integration tests): every VM process
  runs in one network namespace and droplet addresses are loopback addresses (``127.0.0.0/8``),
  reachable wherever the guest runs. Nothing moves; claims are remembered so the agent's code
  path is the same. A non-loopback address is not made reachable (said once in the log).
- ``NodeFabric`` (the chart, ``agent.network.fabric: node``): the nodes share one L2 segment
  (a bridge); a droplet's address is a /32 on the node's uplink device with the label
  ``<device>:ferry``, and a claim announces it with gratuitous ARP so that every neighbour's
  ARP cache (and the bridge) sends its traffic to the new node at once. Adding an address and
  sending raw ARP need ``CAP_NET_ADMIN`` and ``CAP_NET_RAW``, which the agent does not have: it
  asks the node's network helper (``ferry agent-net``, the agent pod's ``net`` container, root
  with those two capabilities only) over a unix socket in a directory only the pod shares.

The helper (``NetHelper`` + ``serve``) accepts only IPv4 unicast addresses outside loopback,
never one its device holds without ferry's label (the node's own address), and changes only
addresses with that label.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import pwd
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import Protocol

log = logging.getLogger("ferry.network")

LABEL_SUFFIX = "ferry"
GARP_COUNT = 3  # announcements per claim: the first before the claim returns, the rest GARP_INTERVAL apart
GARP_INTERVAL = 0.05


TAP_PREFIX = "ft"


class FabricError(Exception):
    pass


def tap_name(vm_dir: str) -> str:
    """The tap device of the VM whose directory is ``vm_dir``: ``ft`` + 12 hex digits (15 bytes
    at most, Linux's limit). Per VM directory, so a source and a target on one machine (local
    development) get two taps; the same after an agent restart."""
    return TAP_PREFIX + hashlib.sha256(os.path.abspath(vm_dir).encode()).hexdigest()[:12]


def guest_mac(namespace: str, name: str) -> str:
    """The MAC of a droplet's NIC, derived from the droplet: the same on source and target (it
    moves with the guest). ``52:`` (locally administered, unicast) + 5 bytes of a hash."""
    digest = hashlib.sha256(f"ferry-mac/{namespace}/{name}".encode()).digest()
    return ":".join(f"{b:02x}" for b in b"\x52" + digest[:5])


def check_tap(name: object) -> str:
    text = str(name)
    if not (text.startswith(TAP_PREFIX) and len(text) == len(TAP_PREFIX) + 12
            and all(c in "0123456789abcdef" for c in text[len(TAP_PREFIX):])):
        raise FabricError(f"{name!r} is not one of ferry's tap devices (ft + 12 hex digits)")
    return text


def tap_owner(name: str, ip_command: str = "ip") -> int | None:
    """The user a tap device belongs to (iproute2 prints the name when the user has one); None:
    no such tap, or no owner."""
    proc = subprocess.run([ip_command, "-j", "-d", "link", "show", "dev", name], capture_output=True, text=True,
                          timeout=10)
    if proc.returncode != 0:
        return None
    [link] = json.loads(proc.stdout)
    user = ((link.get("linkinfo") or {}).get("info_data") or {}).get("user")
    if user is None:
        return None
    try:
        return int(user)
    except ValueError:
        try:
            return pwd.getpwnam(str(user)).pw_uid
        except KeyError:
            return None


class Taps(Protocol):
    """Tap devices for the guests' NICs on the node's VM bridge."""

    def add_tap(self, name: str) -> None: ...   # exists, owned by the launcher's user, on the bridge, up (idempotent)
    def del_tap(self, name: str) -> None: ...   # gone (idempotent)


class Fabric(Protocol):
    name: str

    def held(self) -> set[str]: ...                 # droplet addresses this node holds now
    def claim(self, ip: str) -> None: ...           # the address on this node, announced (idempotent)
    def release(self, ip: str) -> None: ...         # off this node (idempotent)


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


class LoopbackFabric:
    """Local dev: nothing moves (see the module's docstring)."""

    name = "loopback"

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._warned: set[str] = set()

    def held(self) -> set[str]:
        return set(self._held)

    def claim(self, ip: str) -> None:
        if not is_loopback(ip) and ip not in self._warned:
            self._warned.add(ip)
            log.warning("droplet address %s is not a loopback address: the loopback fabric does not make it "
                        "reachable (a cluster uses agent.network.fabric: node)", ip)
        self._held.add(ip)

    def release(self, ip: str) -> None:
        self._held.discard(ip)


# --- the node fabric: the agent's side ------------------------------------------------------

class NodeFabric:
    """The agent's client of the node's network helper (``ferry agent-net``)."""

    name = "node"

    def __init__(self, socket_path: str, timeout: float = 5.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._loopback: set[str] = set()

    def _call(self, op: str, ip: str | None = None, **extra: str) -> dict:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.socket_path)
                s.sendall(json.dumps({"op": op, "ip": ip, **extra}).encode() + b"\n")
                data = b""
                while not data.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except OSError as e:
            raise FabricError(f"the node's network helper at {self.socket_path} does not answer: {e}") from None
        try:
            answer = json.loads(data)
        except ValueError:
            raise FabricError(f"the node's network helper answered {data[:200]!r}") from None
        if not answer.get("ok"):
            raise FabricError(f"{op} {ip or extra.get('name') or ''}: {answer.get('error') or 'refused'}".replace("  ", " "))
        return answer

    def add_tap(self, name: str) -> None:
        self._call("tap-add", name=name)

    def del_tap(self, name: str) -> None:
        self._call("tap-del", name=name)

    def held(self) -> set[str]:
        return set(self._call("held").get("ips") or []) | self._loopback

    def claim(self, ip: str) -> None:
        if is_loopback(ip):  # a loopback address is every node's own: nothing to move
            self._loopback.add(ip)
        else:
            self._call("claim", ip)

    def release(self, ip: str) -> None:
        if is_loopback(ip):
            self._loopback.discard(ip)
        else:
            self._call("release", ip)


# --- the node fabric: the helper (NET_ADMIN + NET_RAW) --------------------------------------

def garp_frame(mac: bytes, ip: str) -> bytes:
    """A gratuitous ARP request (sender = target = ip) from ``mac`` to the broadcast address."""
    addr = socket.inet_aton(ip)
    eth = b"\xff" * 6 + mac + struct.pack("!H", 0x0806)
    arp = struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + addr + b"\x00" * 6 + addr
    return eth + arp


def check_address(ip: object) -> str:
    """The helper takes only IPv4 unicast addresses a droplet may have."""
    try:
        addr = ipaddress.ip_address(str(ip))
    except ValueError:
        raise FabricError(f"not an IP address: {ip!r}") from None
    if not isinstance(addr, ipaddress.IPv4Address):
        raise FabricError(f"{addr}: the node fabric moves IPv4 addresses only")
    if addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise FabricError(f"{addr}: not a droplet address")
    return str(addr)


class NetHelper:
    """Adds and removes droplet addresses on ``device`` with ``ip`` (iproute2) and announces them;
    creates and deletes the guests' taps on ``vm_bridge`` (owned by ``tap_uid``)."""

    def __init__(self, device: str, ip_command: str = "ip", *, vm_bridge: str = "", tap_uid: int = 10001):
        self.device = device
        self.label = f"{device}:{LABEL_SUFFIX}"[:15]
        self.ip_command = ip_command
        self.vm_bridge = vm_bridge
        self.tap_uid = tap_uid
        self._lock = threading.Lock()

    def _ip(self, *args: str) -> str:
        proc = subprocess.run([self.ip_command, *args], capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            raise FabricError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
        return proc.stdout

    def _addresses(self) -> dict[str, str]:
        """IPv4 address -> label on the device."""
        out = json.loads(self._ip("-j", "-4", "addr", "show", "dev", self.device) or "[]")
        found: dict[str, str] = {}
        for link in out:
            for a in link.get("addr_info") or []:
                if a.get("local"):
                    found[a["local"]] = a.get("label") or self.device
        return found

    def held(self) -> set[str]:
        return {ip for ip, label in self._addresses().items() if label == self.label}

    def claim(self, ip: str) -> None:
        ip = check_address(ip)
        with self._lock:
            label = self._addresses().get(ip)
            if label is not None and label != self.label:
                raise FabricError(f"{ip} is {self.device}'s own address (label {label}), not a droplet's")
            if label is None:
                self._ip("addr", "add", f"{ip}/32", "dev", self.device, "label", self.label)
        self.announce(ip)

    def release(self, ip: str) -> None:
        ip = check_address(ip)
        with self._lock:
            if self._addresses().get(ip) == self.label:
                self._ip("addr", "del", f"{ip}/32", "dev", self.device)

    def _link(self, name: str) -> dict | None:
        proc = subprocess.run([self.ip_command, "-j", "-d", "link", "show", "dev", name], capture_output=True,
                              text=True, timeout=10)
        if proc.returncode != 0:
            return None
        [link] = json.loads(proc.stdout)
        return link

    def add_tap(self, name: str) -> None:
        """A persistent tap owned by ``tap_uid`` (QEMU attaches without CAP_NET_ADMIN), a port of
        ``vm_bridge``, up. An existing tap of that name is checked and kept (idempotent)."""
        name = check_tap(name)
        if not self.vm_bridge:
            raise FabricError("no VM bridge configured (agent.network.vmBridge): guests have no NIC here")
        with self._lock:
            link = self._link(name)
            if link is None:
                self._ip("tuntap", "add", "dev", name, "mode", "tap", "user", str(self.tap_uid), "vnet_hdr")
            elif (link.get("linkinfo") or {}).get("info_kind") != "tun" or tap_owner(name, self.ip_command) != self.tap_uid:
                raise FabricError(f"{name} exists and is not a tap of user {self.tap_uid}")
            self._ip("link", "set", "dev", name, "master", self.vm_bridge, "up")

    def del_tap(self, name: str) -> None:
        name = check_tap(name)
        with self._lock:
            if self._link(name) is not None:
                self._ip("link", "del", "dev", name)

    def announce(self, ip: str) -> None:
        """The first gratuitous ARP before it returns (the neighbours move their traffic on it), the
        repeats (for a frame lost on the way) GARP_INTERVAL apart in the background."""
        [link] = json.loads(self._ip("-j", "link", "show", "dev", self.device))
        mac = bytes.fromhex(str(link["address"]).replace(":", ""))
        frame = garp_frame(mac, ip)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        try:
            s.bind((self.device, 0))
            s.send(frame)
        except OSError:
            s.close()
            raise

        def repeat() -> None:
            try:
                for _ in range(GARP_COUNT - 1):
                    time.sleep(GARP_INTERVAL)
                    s.send(frame)
            except OSError as e:
                log.warning("gratuitous ARP for %s on %s: %s", ip, self.device, e)
            finally:
                s.close()

        threading.Thread(target=repeat, name=f"garp {ip}", daemon=True).start()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        helper: NetHelper = self.server.helper  # type: ignore[attr-defined]
        for line in self.rfile:
            t0 = time.monotonic()
            try:
                req = json.loads(line)
                op, ip = req.get("op"), req.get("ip")
                if op == "held":
                    answer = {"ok": True, "ips": sorted(helper.held())}
                elif op == "claim":
                    helper.claim(ip)
                    answer = {"ok": True}
                    log.info("claimed %s on %s (%.0f ms)", ip, helper.device, (time.monotonic() - t0) * 1000)
                elif op == "release":
                    helper.release(ip)
                    answer = {"ok": True}
                    log.info("released %s on %s", ip, helper.device)
                elif op == "tap-add":
                    helper.add_tap(req.get("name"))
                    answer = {"ok": True}
                    log.info("tap %s on %s (user %d)", req.get("name"), helper.vm_bridge, helper.tap_uid)
                elif op == "tap-del":
                    helper.del_tap(req.get("name"))
                    answer = {"ok": True}
                    log.info("tap %s deleted", req.get("name"))
                else:
                    answer = {"ok": False, "error": f"unknown op {op!r}"}
            except (FabricError, OSError, ValueError, subprocess.SubprocessError) as e:
                log.warning("%s", e)
                answer = {"ok": False, "error": str(e)}
            try:
                self.wfile.write(json.dumps(answer).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                return


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(socket_path: str, device: str, stop: threading.Event, *, vm_bridge: str = "", tap_uid: int = 10001) -> None:
    """``ferry agent-net``: serve the node's network helper on ``socket_path`` until ``stop``."""
    helper = NetHelper(device, vm_bridge=vm_bridge, tap_uid=tap_uid)
    helper._addresses()  # the device exists and iproute2 works, or fail at start
    if vm_bridge and helper._link(vm_bridge) is None:
        raise FabricError(f"the VM bridge {vm_bridge} does not exist in this network namespace")
    os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    server = _Server(socket_path, _Handler)
    os.chmod(socket_path, 0o666)  # the agent runs as another user; the directory is the pod's own
    server.helper = helper  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    log.info("network helper on %s: droplet addresses on %s (label %s), held now: %s; guests' taps on %s", socket_path,
             device, helper.label, ", ".join(sorted(helper.held())) or "none", vm_bridge or "(no VM bridge)")
    stop.wait()
    server.shutdown()
    server.server_close()


def make_fabric(kind: str, socket_path: str) -> Fabric:
    """``FERRY_NETWORK``: loopback (the default) or node (with ``FERRY_NETWORK_SOCKET``)."""
    if kind in ("", "loopback"):
        return LoopbackFabric()
    if kind == "node":
        return NodeFabric(socket_path)
    raise ValueError(f"unknown FERRY_NETWORK {kind!r} (loopback or node)")


class LocalTaps:
    """The guests' taps made in-process by the helper's own code (needs CAP_NET_ADMIN: root in
    ``tests/qemu`` and local development with ``FERRY_QEMU_BRIDGE``)."""

    def __init__(self, bridge: str, uid: int | None = None):
        self.helper = NetHelper(bridge, vm_bridge=bridge, tap_uid=os.getuid() if uid is None else uid)

    def add_tap(self, name: str) -> None:
        self.helper.add_tap(name)

    def del_tap(self, name: str) -> None:
        self.helper.del_tap(name)


def make_taps(fabric: Fabric, environ: Mapping[str, str]) -> Taps | None:
    """Who makes the qemu guests' taps: the node's helper when it has a VM bridge
    (``FERRY_NETWORK_VM_BRIDGE``, the chart's ``agent.network.vmBridge``), or this process on
    ``FERRY_QEMU_BRIDGE`` (local development, as root); None: guests get no NIC."""
    if isinstance(fabric, NodeFabric) and environ.get("FERRY_NETWORK_VM_BRIDGE"):
        return fabric
    if environ.get("FERRY_QEMU_BRIDGE"):
        return LocalTaps(environ["FERRY_QEMU_BRIDGE"])
    return None
