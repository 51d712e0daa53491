"""After `hack/nodes.sh down` the machine is as it was before `up`, one kind at a time.

hack/nodes-e2e.sh records the machine (machine_state.py) before `up` into the file named by
FERRY_NODES_BEFORE, brings the nodes up, runs the end-to-end suite through them, runs `down`,
then these tests. Run alone they have nothing to compare with and say so.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import machine_state  # noqa: E402

pytestmark = pytest.mark.nodes


@pytest.fixture(scope="module")
def states():
    path = os.environ.get("FERRY_NODES_BEFORE")
    if not path:
        pytest.fail("FERRY_NODES_BEFORE is not set: run these through hack/nodes-e2e.sh "
                    "(it records the machine before `hack/nodes.sh up` and runs them after `down`)")
    before = json.loads(pathlib.Path(path).read_text())
    return before, machine_state.snapshot()


def _new(kind: str, states) -> list:
    before, after = states
    return sorted(set(after[kind]) - set(before[kind]))


def test_no_process_left(states):
    before, after = states
    left = {pid: cmd for pid, cmd in after["processes"].items() if pid not in before["processes"]}
    assert left == {}


def test_no_mount_left(states):
    assert _new("mounts", states) == []


def test_no_network_namespace_left(states):
    assert _new("netns", states) == []


def test_no_link_left(states):
    assert _new("links", states) == []
    assert _new("addresses", states) == []
    assert _new("routes", states) == []


def test_no_iptables_chain_or_rule_left(states):
    before, after = states
    assert _new("iptables", states) == []
    assert sorted(set(before["iptables"]) - set(after["iptables"])) == []


def test_no_cgroup_left(states):
    assert _new("cgroups", states) == []


def test_no_sysctl_changed(states):
    before, after = states
    changed = {k: (before["sysctls"][k], v) for k, v in after["sysctls"].items()
               if k in before["sysctls"] and before["sysctls"][k] != v}
    assert changed == {}
    assert sorted(set(after["sysctls"]) - set(before["sysctls"])) == []


def test_no_machine_path_created(states):
    before, after = states
    created = [p for p, exists in after["paths"].items() if exists and not before["paths"].get(p)]
    assert created == []


def test_state_directory_removed():
    state_dir = os.environ.get("FERRY_NODES_DIR")
    assert state_dir, "FERRY_NODES_DIR names the state directory hack/nodes-e2e.sh used"
    assert not pathlib.Path(state_dir).exists()
