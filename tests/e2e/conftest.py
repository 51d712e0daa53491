"""The cluster the e2e tests run against, named by the environment.

- ``FERRY_E2E_EXTERNAL=1`` with ``KUBECONFIG``/``FERRY_TEST_KUBECONFIG``: ferry already runs
  there (the kind path, ``hack/kind-e2e.sh``, installs it with the chart); ``FERRY_E2E_HOSTS``
  names its Ready hosts.
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
import subprocess
import uuid

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


class E2E:
    def __init__(self, kubeconfig: str, env: dict[str, str], hosts: list[str]):
        self.kubeconfig = kubeconfig
        self.env = {**env, "KUBECONFIG": kubeconfig}
        self.hosts = hosts

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
        yield E2E(kubeconfig, env, hosts)
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
