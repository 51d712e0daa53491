"""What a user does, step by step, shared by the e2e tests (kubectl and examples/ only)."""

from __future__ import annotations

import json
import pathlib

from support import wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]


def example_droplet(name: str, ip: str | None = None) -> str:
    """examples/droplet.yaml under another name (and address), as a user copies it."""
    import yaml

    body = yaml.safe_load((ROOT / "examples" / "droplet.yaml").read_text())
    body["metadata"]["name"] = name
    if ip:
        body["spec"]["ip"] = ip
    return yaml.safe_dump(body)


def apply_example_hosts(e2e) -> None:
    """The example Hosts, unless the cluster's hosts are other nodes (then they exist already)."""
    if not e2e.hosts or e2e.hosts == ["host-a", "host-b", "host-c"]:
        e2e.kubectl("apply", "-f", "examples/hosts.yaml")


def place(e2e, ns: str, name: str, ip: str | None = None) -> str:
    """Create a droplet from the example, wait until it runs on a host, return the host."""
    e2e.kubectl("apply", "-n", ns, "-f", "-", input=example_droplet(name, ip))
    e2e.kubectl("wait", "-n", ns, f"droplet/{name}", "--for=jsonpath={.status.phase}=Placed", "--timeout=60s")
    host = e2e.kubectl("get", "-n", ns, "droplet", name, "-o", "jsonpath={.status.host}").stdout
    assert host in e2e.hosts
    wait_until(lambda: name in vms_on(e2e, host, ns), 60, what=f"{ns}/{name} running on {host}")
    return host


def vms_on(e2e, host: str, ns: str) -> list[str]:
    """Names of the VM processes of namespace NS that HOST's agent reports."""
    status = json.loads(e2e.kubectl("get", "host", host, "-o", "json").stdout).get("status") or {}
    return [vm["name"] for vm in (status.get("agent") or {}).get("vms") or [] if vm.get("namespace") == ns]


def migration(e2e, ns: str, name: str) -> dict:
    return json.loads(e2e.kubectl("get", "-n", ns, "livemigration", name, "-o", "json").stdout)
