"""The network fabric (ferry.drivers.network): the loopback fabric, the gratuitous ARP frame, and
the node fabric for real: the helper (`ferry agent-net`'s code) serving the agent's client in a
private network namespace (``unshare -n``, a veth pair), with the ARP frames read on the peer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from ferry.drivers.network import FabricError, LoopbackFabric, NodeFabric, check_address, garp_frame, make_fabric


def test_loopback_fabric_remembers_and_moves_nothing():
    f = make_fabric("", "/nonexistent")
    assert isinstance(f, LoopbackFabric) and f.held() == set()
    f.claim("127.0.0.11")
    f.claim("127.0.0.11")
    assert f.held() == {"127.0.0.11"}
    f.release("127.0.0.11")
    f.release("127.0.0.11")
    assert f.held() == set()
    with pytest.raises(ValueError, match="FERRY_NETWORK"):
        make_fabric("bgp", "/x")


def test_gratuitous_arp_frame():
    mac = bytes.fromhex("020000000001")
    f = garp_frame(mac, "10.250.0.200")
    assert len(f) == 42
    assert f[:6] == b"\xff" * 6 and f[6:12] == mac and f[12:14] == b"\x08\x06"
    assert f[14:22] == bytes.fromhex("0001080006040001")  # Ethernet/IPv4, request
    assert f[22:28] == mac and f[28:32] == bytes([10, 250, 0, 200])  # sender = the address
    assert f[38:42] == bytes([10, 250, 0, 200])  # target = the same address: gratuitous


@pytest.mark.parametrize("bad", ["127.0.0.11", "0.0.0.0", "224.0.0.1", "::1", "2001:db8::1", "nope", None])
def test_the_helper_takes_droplet_ipv4_addresses_only(bad):
    with pytest.raises(FabricError):
        check_address(bad)
    assert check_address("10.250.0.200") == "10.250.0.200"


def test_node_fabric_without_its_helper_says_so(tmp_path):
    f = NodeFabric(str(tmp_path / "net.sock"), timeout=1)
    with pytest.raises(FabricError, match="does not answer"):
        f.claim("10.250.0.200")
    f.claim("127.0.0.11")  # a loopback address is every node's own: nothing to ask
    assert "127.0.0.11" in f._loopback


NETNS_PRELUDE = textwrap.dedent("""
    import json, socket, subprocess, sys, threading, time
    from ferry.drivers.network import NodeFabric, FabricError, serve, tap_owner
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)

    def helper(**kw):
        # the node's network helper on eth0, serving sys.argv[1]; its client once it answers
        threading.Thread(target=serve, args=(sys.argv[1], "eth0", threading.Event()), kwargs=kw,
                         daemon=True).start()
        fabric = NodeFabric(sys.argv[1])
        for _ in range(100):
            try:
                fabric.held()
                break
            except FabricError:
                time.sleep(0.05)
        return fabric
""")


def run_in_netns(script: str, tmp_path) -> dict:
    """SCRIPT (after NETNS_PRELUDE) as root in a private network namespace: the JSON it printed last."""
    import json

    proc = subprocess.run(["unshare", "-n", sys.executable, "-c", NETNS_PRELUDE + script, str(tmp_path / "net.sock")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


SCRIPT = textwrap.dedent("""
    run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
    run("ip", "link", "set", "eth0", "up"); run("ip", "link", "set", "peer0", "up")
    run("ip", "addr", "add", "10.250.0.11/24", "dev", "eth0")
    rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    rx.bind(("peer0", 0)); rx.settimeout(2)
    fabric = helper()
    out = {"held0": sorted(fabric.held())}
    fabric.claim("10.250.0.200"); fabric.claim("10.250.0.200")
    out["held1"] = sorted(fabric.held())
    frames = []
    try:
        while len(frames) < 6:
            frames.append(rx.recv(100).hex())
    except socket.timeout:
        pass
    out["garps"] = [f for f in frames if f[56:64] == "0afa00c8" and f[76:84] == "0afa00c8"]
    addrs = json.loads(run("ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout)[0]["addr_info"]
    out["labels"] = sorted((a["local"], a.get("label")) for a in addrs)
    try:
        fabric.claim("10.250.0.11")
    except FabricError as e:
        out["own"] = str(e)
    fabric.release("10.250.0.200"); fabric.release("10.250.0.200")
    out["held2"] = sorted(fabric.held())
    addrs = json.loads(run("ip", "-j", "-4", "addr", "show", "dev", "eth0").stdout)[0]["addr_info"]
    out["left"] = sorted(a["local"] for a in addrs)
    print(json.dumps(out))
""")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and iproute2 (a private network namespace)")
def test_node_fabric_claims_announces_and_releases_in_a_network_namespace(tmp_path):
    out = run_in_netns(SCRIPT, tmp_path)
    assert out["held0"] == [] and out["held1"] == ["10.250.0.200"] and out["held2"] == []
    # two claims (idempotent): one address, labelled as ferry's; each claim announced
    assert out["labels"] == [["10.250.0.11", "eth0"], ["10.250.0.200", "eth0:ferry"]]
    assert len(out["garps"]) >= 3, out
    assert "own address" in out["own"]  # the node's own address is never a droplet's
    assert out["left"] == ["10.250.0.11"]


def test_tap_names_and_macs_are_derived():
    from ferry.drivers.network import check_tap, guest_mac, tap_name

    a, b = tap_name("/var/lib/ferry/vms/ns__web-1"), tap_name("/srv/host-b/vms/ns__web-1")
    assert a != b and len(a) <= 15 and a.startswith("ft") and check_tap(a) == a
    assert tap_name("/var/lib/ferry/vms/ns__web-1") == a  # the same after a restart
    mac = guest_mac("ns", "web-1")
    assert mac == guest_mac("ns", "web-1") != guest_mac("ns", "web-2")  # the droplet's, on every host
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    for bad in ("eth0", "ft0123", "ftXYZXYZXYZXYZ", "ferrybr0", "ft0123456789abc"):
        with pytest.raises(FabricError):
            check_tap(bad)


TAP_SCRIPT = textwrap.dedent("""
    run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"); run("ip", "link", "set", "eth0", "up")
    run("ip", "link", "add", "ferryvm", "type", "bridge"); run("ip", "link", "set", "ferryvm", "up")
    fabric = helper(vm_bridge="ferryvm", tap_uid=10001)
    out = {}
    fabric.add_tap("ft0123456789ab"); fabric.add_tap("ft0123456789ab")
    link = json.loads(run("ip", "-j", "-d", "link", "show", "dev", "ft0123456789ab").stdout)[0]
    out["master"], out["owner"], out["up"] = link.get("master"), tap_owner("ft0123456789ab"), "UP" in link["flags"]
    for bad in ("eth0", "ferryvm"):
        try:
            fabric.add_tap(bad)
        except FabricError as e:
            out["refused_" + bad] = str(e)
    run("ip", "tuntap", "add", "dev", "ft00000000000b", "mode", "tap", "user", "4242")
    try:
        fabric.add_tap("ft00000000000b")
    except FabricError as e:
        out["other_user"] = str(e)
    fabric.del_tap("ft0123456789ab"); fabric.del_tap("ft0123456789ab")
    out["left"] = sorted(l["ifname"] for l in json.loads(run("ip", "-j", "link", "show").stdout))
    print(json.dumps(out))
""")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip")
                    or not os.path.exists("/dev/net/tun"),
                    reason="needs root, unshare, iproute2 and /dev/net/tun (a private network namespace)")
def test_the_helper_makes_only_ferrys_taps_on_its_bridge_for_its_user(tmp_path):
    out = run_in_netns(TAP_SCRIPT, tmp_path)
    assert out["master"] == "ferryvm" and out["owner"] == 10001 and out["up"], out
    assert "not one of ferry's tap devices" in out["refused_eth0"] and "refused_ferryvm" in out
    assert "not a tap of user 10001" in out["other_user"]  # never takes over someone else's tap
    assert "ft0123456789ab" not in out["left"] and "eth0" in out["left"] and "ferryvm" in out["left"]
