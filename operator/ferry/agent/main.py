"""``ferry agent``: one process per host, until SIGTERM/SIGINT (VM processes keep running)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ferry import logs
from ferry.agent.loop import Agent
from ferry.drivers.base import Driver
from ferry.settings import Settings
from ferry.storage import Kube

log = logging.getLogger("ferry.agent")

DRIVERS = ("sim", "qemu")


def make_driver(name: str, data_dir: str, settings: Settings, environ: dict[str, str] | None = None) -> Driver:
    env = os.environ if environ is None else environ
    if name == "sim":
        from ferry.drivers.sim import SimDriver

        return SimDriver(data_dir, size_scale=settings.size_scale, write_log=env.get("FERRY_SIM_WRITE_LOG") == "1",
                         channel=settings.sim_channel)
    if name == "qemu":
        from ferry.drivers.qemu import QemuDriver  # heavy and optional: only when asked for

        return QemuDriver.from_settings(settings, data_dir)
    raise ValueError(f"unknown driver {name!r} (choose one of {', '.join(DRIVERS)})")


def run(host: str, data_dir: str, driver: str, address: str, kubeconfig: str | None, settings: Settings) -> int:
    """Run the agent of ``host``; returns 0 after SIGTERM/SIGINT."""
    logs.for_server()
    os.makedirs(data_dir, exist_ok=True)
    drv = make_driver(driver, data_dir, settings)
    kube = Kube.connect(kubeconfig)
    agent = Agent(host, drv, kube, settings, address=address, connect=lambda: Kube.connect(kubeconfig))
    if settings.agent_metrics_port > 0:
        agent.metrics.serve(settings.agent_metrics_port, log)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("agent of host %s stopping (%s); VM processes keep running", host, signal.Signals(signum).name)
        stop.set()
        agent.wake.put(None)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log.info("agent of host %s starting: driver %s, data dir %s, address %s", host, drv.name, data_dir, address)
    try:
        agent.run(stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        close = getattr(drv, "close", None)
        if callable(close):
            close()
    return 0
