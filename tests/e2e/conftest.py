"""The cluster the e2e tests run against, named by the environment.

- ``FERRY_E2E_EXTERNAL=1`` with ``KUBECONFIG``/``FERRY_TEST_KUBECONFIG``: ferry already runs
  there, installed with the chart and ``tests/e2e/values.yaml``: by ``hack/nodes-e2e.sh`` (real
  kubelet nodes on this machine) or ``hack/kind-e2e.sh`` (kind). ``FERRY_E2E_HOSTS`` names its
  Ready hosts; ``FERRY_E2E_NODE_EXEC`` says how to run a command on a node (``{node}`` is
  replaced: ``ip netns exec ferry-{node}`` or ``docker exec {node}``); the rest of the contract
  is in hack/kind-e2e.sh's header.
- otherwise (CI): ``hack/local-up.sh up`` starts the local control plane, the operator, three
  agents and the metadata endpoint in a temporary directory, exactly as the README's main
  command does, and ``hack/local-up.sh down`` stops all of it afterwards.

The tests only do what a user does: ``kubectl`` with the files in ``examples/`` and the
``ferry`` command. They import nothing from the product.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


class E2E:
    def __init__(self, kubeconfig: str, env: dict[str, str], hosts: list[str], external: bool = False):
        self.kubeconfig = kubeconfig
        self.env = {**env, "KUBECONFIG": kubeconfig}
        self.hosts = hosts
        # ferry runs in the cluster from its chart (not as local processes started here).
        self.external = external
        self.namespace = os.environ.get("FERRY_E2E_NAMESPACE", "ferry-system")
        self.release = os.environ.get("FERRY_E2E_RELEASE", "ferry")
        self.metadata_url = os.environ.get("FERRY_E2E_METADATA_URL", "")
        self.node_exec = os.environ.get("FERRY_E2E_NODE_EXEC", "")
        self.notice_seconds = float(os.environ.get("FERRY_E2E_NOTICE_SECONDS", "2"))

    def require_cluster(self, what: str) -> None:
        """Tests of the chart's pods need ferry installed by the chart (the nodes or kind path)."""
        if not self.external:
            pytest.skip(f"{what} needs ferry installed with its chart: hack/nodes-e2e.sh runs it "
                        "(hack/test.sh does), or hack/kind-e2e.sh")

    def on_node(self, node: str, *cmd: str, check: bool = True, timeout: float = 30):
        """Run CMD on NODE as its host would (its network namespace or its container)."""
        assert self.node_exec, "FERRY_E2E_NODE_EXEC is not set"
        prefix = [part.replace("{node}", node) for part in shlex.split(self.node_exec)]
        return self.run(*prefix, *cmd, check=check, timeout=timeout)

    def run(self, *cmd: str, check: bool = True, timeout: float = 180, input: str | None = None):
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def kubectl(self, *args: str, **kw):
        return self.run("kubectl", *args, **kw)

    def ferry(self, *args: str, **kw):
        return self.run(str(ROOT / ".venv" / "bin" / "ferry"), *args, **kw)


@pytest.fixture(scope="session")
def e2e(bin_dir, tmp_path_factory) -> E2E:
    env = {**os.environ, "PATH": f"{bin_dir}:{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    if os.environ.get("FERRY_E2E_EXTERNAL") == "1":
        kubeconfig = os.environ.get("FERRY_TEST_KUBECONFIG") or os.environ["KUBECONFIG"]
        hosts = [h for h in os.environ.get("FERRY_E2E_HOSTS", "").split(",") if h]
        yield E2E(kubeconfig, env, hosts, external=True)
        return
    local = tmp_path_factory.mktemp("local")
    env.update({"FERRY_LOCAL_DIR": str(local), "FERRY_CLUSTER_DIR": str(local / "cluster"),
                "FERRY_NOTICE_SECONDS": "2", "FERRY_METADATA_LISTEN": "127.0.0.1:0"})
    up = subprocess.run(["bash", str(ROOT / "hack" / "local-up.sh"), "up"], env=env, capture_output=True,
                        text=True, timeout=600)
    if up.returncode != 0:
        subprocess.run(["bash", str(ROOT / "hack" / "local-up.sh"), "down"], env=env, capture_output=True)
        pytest.fail(f"hack/local-up.sh up failed:\n{up.stdout}\n{up.stderr}")
    kubeconfig = re.search(r"export KUBECONFIG=(\S+)", up.stdout).group(1)
    try:
        yield E2E(kubeconfig, env, ["host-a", "host-b", "host-c"])
    finally:
        subprocess.run(["bash", str(ROOT / "hack" / "local-up.sh"), "down"], env=env, capture_output=True,
                       timeout=120)


@pytest.fixture
def ns(e2e: E2E):
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    e2e.kubectl("create", "namespace", name)
    yield name
    e2e.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pytest_collection_modifyitems(items):
    """Tests marked ``last`` (uninstalling the release) run after every other test. The qemu
    guests' tests rerun once on exactly QEMU 7.2 TCG's own guest crash after a live migration
    (``guest_console.GuestKernelCrashed``, as tests/qemu do)."""
    for item in items:
        if item.module.__name__.startswith("test_qemu_"):
            item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=["GuestKernelCrashed"]))
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)

