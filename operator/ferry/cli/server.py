"""The long-running programs: `ferry operator`, `ferry metadata`, and `ferry dev` helpers."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import click

REPO = pathlib.Path(__file__).resolve().parents[3]


@click.command()
@click.option("--standalone/--peering", "standalone", default=True, show_default=True,
              help="--peering: several replicas, exactly one active (kopf peering).")
@click.option("--peering-name", default="ferry", show_default=True, help="Name of the KopfPeering object.")
@click.option("--liveness", "liveness", default=None, metavar="URL",
              help="Serve the liveness probe, e.g. http://0.0.0.0:8081/healthz.")
@click.option("--priority", type=int, default=0, show_default=True,
              help="Peering priority; replicas need distinct values (the chart derives one from the pod UID).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (default FERRY_METRICS_PORT, 8080; 0 = off).")
@click.pass_context
def operator(ctx: click.Context, standalone: bool, peering_name: str, liveness: str | None, priority: int,
             metrics_port: int | None) -> None:
    """Run the ferry operator (reconciles Hosts, Droplets and LiveMigrations)."""
    from ferry.controller.main import run

    run(kubeconfig=ctx.obj["kubeconfig"], namespace=ctx.obj["namespace"], standalone=standalone,
        peering_name=peering_name, liveness=liveness, metrics_port=metrics_port, priority=priority)


@click.command()
@click.option("--listen", default="127.0.0.1:8169", show_default=True, help="ADDR:PORT to serve on.")
@click.option("--watch-timeout", type=int, default=300, show_default=True, help="Seconds per watch request.")
@click.pass_context
def metadata(ctx: click.Context, listen: str, watch_timeout: int) -> None:
    """Serve GET /v1/maintenance_event to droplets (identified by their source address)."""
    from ferry.metadata.server import run

    run(listen, kubeconfig=ctx.obj["kubeconfig"], namespace=ctx.obj["namespace"],
        watch_timeout_seconds=watch_timeout)


@click.group()
def dev() -> None:
    """Developer helpers: a local control plane and the whole local stack."""


def _hack(script: str, *args: str) -> None:
    path = REPO / "hack" / script
    if not path.exists():
        raise click.ClickException(f"{path} not found: `ferry dev` needs a source checkout of ferry")
    sys.exit(subprocess.call(["bash", str(path), *args]))


@dev.command("cluster")
@click.argument("action", type=click.Choice(["up", "down", "env", "status"]))
def dev_cluster(action: str) -> None:
    """Start/stop the local control plane (etcd, kube-apiserver, kube-controller-manager)."""
    _hack("cluster.sh", action)


@dev.command("up")
def dev_up() -> None:
    """Control plane, operator, three agents, metadata endpoint and a watched migration."""
    _hack("local-up.sh", "up")


@dev.command("down")
def dev_down() -> None:
    """Stop everything `ferry dev up` started."""
    _hack("local-up.sh", "down")
