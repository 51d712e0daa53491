"""``ferry agent``: one process per host, until SIGTERM/SIGINT (VM processes keep running)."""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any

from ferry import logs
from ferry.agent.loop import Agent
from ferry.drivers.base import Driver
from ferry.drivers.launcher import Launcher, ProcessLauncher
from ferry.drivers.network import Taps, make_fabric, make_taps
from ferry.drivers.pod_launcher import PodLauncher, parse_device_resources, parse_groups
from ferry.settings import Settings
from ferry.storage import Kube

log = logging.getLogger("ferry.agent")

DRIVERS = ("sim", "qemu")
NETWORK_SOCKET = "/run/ferry-net/net.sock"  # the chart's agent pod: the net container's socket


def make_launcher(host: str, data_dir: str, kube: Kube | None, environ: Mapping[str, str]) -> Launcher:
    """Where VM processes (sim VMs or QEMU) run: ``FERRY_LAUNCHER=process`` (default: plain
    processes, local development and tests) or ``pod`` (one pod per VM on this node; the chart's
    default; ``FERRY_LAUNCHER_DEVICE_RESOURCES``/``_SUPPLEMENTAL_GROUPS``: e.g. /dev/kvm for QEMU)."""
    kind = environ.get("FERRY_LAUNCHER", "process")
    if kind == "process":
        return ProcessLauncher()
    if kind == "pod":
        if kube is None:
            raise ValueError("FERRY_LAUNCHER=pod needs the API")
        image = environ.get("FERRY_LAUNCHER_IMAGE", "")
        if not image:
            raise ValueError("FERRY_LAUNCHER=pod needs FERRY_LAUNCHER_IMAGE (the image of the VM pods)")
        return PodLauncher(kube, environ.get("FERRY_LAUNCHER_NODE") or host, image=image,
                           pull_policy=environ.get("FERRY_LAUNCHER_PULL_POLICY", "IfNotPresent"),
                           host_data_dir=environ.get("FERRY_LAUNCHER_HOST_DATA_DIR") or data_dir,
                           data_dir=os.path.realpath(data_dir),
                           device_resources=parse_device_resources(environ.get("FERRY_LAUNCHER_DEVICE_RESOURCES", "")),
                           supplemental_groups=parse_groups(environ.get("FERRY_LAUNCHER_SUPPLEMENTAL_GROUPS", "")),
                           runtime_class=environ.get("FERRY_LAUNCHER_RUNTIME_CLASS", ""))
    raise ValueError(f"unknown FERRY_LAUNCHER {kind!r} (process or pod)")


def make_driver(name: str, data_dir: str, settings: Settings, environ: Mapping[str, str] | None = None,
                launcher: Launcher | None = None, host: str = "", taps: Taps | None = None) -> Driver:
    env = os.environ if environ is None else environ
    if name == "sim":
        from ferry.drivers.sim import SimDriver

        pods = launcher is not None and launcher.name == "pod"
        return SimDriver(data_dir, size_scale=settings.size_scale, write_log=env.get("FERRY_SIM_WRITE_LOG") == "1",
                         channel=settings.sim_channel, launcher=launcher, start_timeout=120.0 if pods else 15.0,
                         service_port=settings.sim_service_port, host=host)
    if name == "qemu":
        from ferry.drivers.qemu import QemuDriver  # heavy and optional: only when asked for

        pods = launcher is not None and launcher.name == "pod"
        return QemuDriver.from_settings(settings, data_dir, env, launcher=launcher, taps=taps,
                                        launch_timeout=120.0 if pods else None)
    raise ValueError(f"unknown driver {name!r} (choose one of {', '.join(DRIVERS)})")


AGENT_LOCK = "agent.lock"


def wait_for_host_lock(data_dir: str, host: str, stop: threading.Event) -> int | None:
    """Hold the host's agent lock (a flock in its data directory) for this process's life.

    One agent orchestrates a host at a time. A rolling update surges: the new agent pod starts
    (imports, connects) while the old one still works, then waits here until the old one has
    exited, so the host goes without an agent only for the moment between them. Returns the
    lock's fd, or None if stopped while waiting."""
    fd = os.open(os.path.join(data_dir, AGENT_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if waited:
                log.info("agent of host %s: the previous agent exited; taking over", host)
            return fd
        except BlockingIOError:
            if not waited:
                log.info("agent of host %s: another agent of this host still runs; waiting for it to exit", host)
                waited = True
            if stop.wait(0.1):
                os.close(fd)
                return None


def run(host: str, data_dir: str, driver: str, address: str, kubeconfig: str | None, settings: Settings) -> int:
    """Run the agent of ``host``; returns 0 after SIGTERM/SIGINT."""
    logs.for_server()
    os.makedirs(data_dir, exist_ok=True)
    stop = threading.Event()
    early = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    lock = wait_for_host_lock(data_dir, host, stop)
    for s, handler in early.items():
        signal.signal(s, handler)
    if lock is None:
        return 0
    kube = Kube.connect(kubeconfig)
    fabric = make_fabric(os.environ.get("FERRY_NETWORK", ""), os.environ.get("FERRY_NETWORK_SOCKET") or NETWORK_SOCKET)
    drv = make_driver(driver, data_dir, settings, launcher=make_launcher(host, data_dir, kube, os.environ), host=host,
                      taps=make_taps(fabric, os.environ))
    agent = Agent(host, drv, kube, settings, address=address, connect=lambda: Kube.connect(kubeconfig), fabric=fabric)
    if settings.agent_metrics_port > 0:
        agent.metrics.serve(settings.agent_metrics_port, log)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("agent of host %s stopping (%s); VM processes keep running", host, signal.Signals(signum).name)
        stop.set()
        agent.wake.put(None)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("agent of host %s starting: driver %s, launcher %s, network %s, data dir %s, address %s", host, drv.name,
             getattr(getattr(drv, "launcher", None), "name", "process"), fabric.name, data_dir, address)
    try:
        agent.run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        close = getattr(drv, "close", None)
        if callable(close):
            close()
    return 0
