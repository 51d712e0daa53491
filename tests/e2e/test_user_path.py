"""What a user does: apply the examples, wait, look, use the ferry command."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.e2e


def test_apply_the_examples_and_watch_a_live_migration(e2e, ns):
    if not e2e.hosts or e2e.hosts == ["host-a", "host-b", "host-c"]:
        e2e.kubectl("apply", "-f", "examples/hosts.yaml")
    e2e.kubectl("apply", "-n", ns, "-f", "examples/droplet.yaml")
    e2e.kubectl("wait", "-n", ns, "droplet/web-1", "--for=jsonpath={.status.phase}=Placed", "--timeout=60s")
    before = e2e.kubectl("get", "-n", ns, "droplet", "web-1", "-o", "jsonpath={.status.host}").stdout
    assert before in e2e.hosts

    e2e.kubectl("apply", "-n", ns, "-f", "examples/livemigration.yaml")
    e2e.kubectl("wait", "-n", ns, "livemigration/web-1-move", "--for=jsonpath={.status.phase}=Completed",
                "--timeout=180s", timeout=200)

    after = e2e.kubectl("get", "-n", ns, "droplet", "web-1", "-o", "jsonpath={.status.host}").stdout
    assert after != before and after in e2e.hosts
    table = e2e.kubectl("get", "-n", ns, "livemigrations").stdout
    assert "Completed" in table and before in table and after in table and "100%" in table
    droplets = e2e.kubectl("get", "-n", ns, "droplets", "--show-labels").stdout
    assert f"ferry.dev/host={after}" in droplets
    lm = json.loads(e2e.kubectl("get", "-n", ns, "lm", "web-1-move", "-o", "json").stdout)
    assert lm["status"]["transfer"]["digest"] == lm["status"]["target"]["digest"]

    status = e2e.ferry("-n", ns, "status").stdout
    assert "web-1" in status and after in status
    explain = e2e.ferry("-n", ns, "explain", "web-1").stdout
    assert after in explain


def test_ferry_migrate_wait_shows_progress_and_exits_zero(e2e, ns):
    if not e2e.hosts or e2e.hosts == ["host-a", "host-b", "host-c"]:
        e2e.kubectl("apply", "-f", "examples/hosts.yaml")
    e2e.kubectl("apply", "-n", ns, "-f", "examples/droplet.yaml")
    e2e.kubectl("wait", "-n", ns, "droplet/web-1", "--for=jsonpath={.status.phase}=Placed", "--timeout=60s")
    before = e2e.kubectl("get", "-n", ns, "droplet", "web-1", "-o", "jsonpath={.status.host}").stdout
    proc = e2e.ferry("-n", ns, "migrate", "web-1", "--wait", timeout=240)
    assert "Completed" in proc.stdout, proc.stdout
    after = e2e.kubectl("get", "-n", ns, "droplet", "web-1", "-o", "jsonpath={.status.host}").stdout
    assert after != before


def test_errors_are_one_line(e2e, ns):
    proc = e2e.ferry("-n", ns, "migrate", "no-such-droplet", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
