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

import ipaddress
import json
import logging
import os
import socket
import socketserver
import struct
import subprocess
import threading
import time
from typing import Protocol

log = logging.getLogger("ferry.network")

LABEL_SUFFIX = "ferry"
GARP_COUNT = 3  # announcements per claim: the first before the claim returns, the rest GARP_INTERVAL apart
GARP_INTERVAL = 0.05


class FabricError(Exception):
    pass


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

    def _call(self, op: str, ip: str | None = None) -> dict:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(self.socket_path)
                s.sendall(json.dumps({"op": op, "ip": ip}).encode() + b"\n")
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
            raise FabricError(f"{op} {ip or ''}: {answer.get('error') or 'refused'}".replace("  ", " "))
        return answer

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
    """Adds and removes droplet addresses on ``device`` with ``ip`` (iproute2) and announces them."""

    def __init__(self, device: str, ip_command: str = "ip"):
        self.device = device
        self.label = f"{device}:{LABEL_SUFFIX}"[:15]
        self.ip_command = ip_command
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


def serve(socket_path: str, device: str, stop: threading.Event) -> None:
    """``ferry agent-net``: serve the node's network helper on ``socket_path`` until ``stop``."""
    helper = NetHelper(device)
    helper._addresses()  # the device exists and iproute2 works, or fail at start
    os.makedirs(os.path.dirname(socket_path) or ".", exist_ok=True)
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    server = _Server(socket_path, _Handler)
    os.chmod(socket_path, 0o666)  # the agent runs as another user; the directory is the pod's own
    server.helper = helper  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    log.info("network helper on %s: droplet addresses on %s (label %s), held now: %s", socket_path, device,
             helper.label, ", ".join(sorted(helper.held())) or "none")
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
