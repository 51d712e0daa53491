"""`ferry agent`: the per-host agent (heartbeat, droplet VMs, migration source/target roles)."""

from __future__ import annotations

import click


@click.command()
@click.option("--host", "host", envvar="FERRY_HOST", required=True, help="Name of this agent's Host object.")
@click.option("--data-dir", envvar="FERRY_DATA_DIR", required=True, type=click.Path(file_okay=False),
              help="Directory of the VM images and processes of this host.")
@click.option("--driver", type=click.Choice(["sim", "qemu"]), default=None,
              help="Hypervisor driver (default FERRY_DRIVER, sim).")
@click.option("--address", envvar="FERRY_ADDRESS", default="127.0.0.1", show_default=True,
              help="IP the migration data channels bind to (in a cluster: the node IP).")
@click.pass_context
def agent(ctx: click.Context, host: str, data_dir: str, driver: str | None, address: str) -> None:
    """Run the agent of one host until SIGTERM (its VM processes keep running)."""
    from ferry.agent.main import run
    from ferry.settings import Settings

    settings = Settings.from_env()
    obj = ctx.obj or {}
    ctx.exit(run(host, data_dir, driver or settings.driver, address, obj.get("kubeconfig"), settings))


@click.command("agent-net")
@click.option("--socket", "socket_path", envvar="FERRY_NETWORK_SOCKET", default="/run/ferry-net/net.sock",
              show_default=True, help="Unix socket the agent asks on.")
@click.option("--device", envvar="FERRY_NETWORK_DEVICE", default="eth0", show_default=True,
              help="The node's uplink device: droplet addresses go on it as /32s labelled <device>:ferry.")
@click.option("--vm-bridge", envvar="FERRY_NETWORK_VM_BRIDGE", default="", show_default=True,
              help="The node's bridge for qemu guests' taps (empty: guests get no NIC).")
@click.option("--tap-uid", envvar="FERRY_NETWORK_TAP_UID", type=int, default=10001, show_default=True,
              help="The user owning the guests' taps: the launcher pods' user (QEMU attaches as it).")
def agent_net(socket_path: str, device: str, vm_bridge: str, tap_uid: int) -> None:
    """The node's network helper: puts droplet addresses on this node and announces them (gratuitous
    ARP) when the agent claims them, and makes the qemu guests' tap devices on --vm-bridge. Needs CAP_NET_ADMIN and CAP_NET_RAW (the chart's agent pod
    runs it as its `net` container)."""
    import signal
    import threading

    from ferry import logs
    from ferry.drivers.network import serve

    logs.for_server()
    stop = threading.Event()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: stop.set())
    serve(socket_path, device, stop, vm_bridge=vm_bridge, tap_uid=tap_uid)
