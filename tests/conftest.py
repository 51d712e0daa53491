"""Fixtures shared by the integration and e2e layers.

The control plane is session-scoped: either the one named by ``FERRY_TEST_KUBECONFIG``
(reused, never stopped) or a fresh one that ``hack/cluster.sh`` starts in a temporary
directory and stops at the end. Nothing here starts unless a test asks for it, so unit
tests stay free of it.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import kubeconfig_for_token, stop_all, wait_until  # noqa: F401  (re-exported for tests)

ROOT = pathlib.Path(__file__).resolve().parent.parent
HACK = ROOT / "hack"


@pytest.fixture(scope="session")
def bin_dir() -> pathlib.Path:
    out = subprocess.run(
        ["bash", str(HACK / "build-binaries.sh")], check=True, capture_output=True, text=True
    ).stdout.strip()
    return pathlib.Path(out.splitlines()[-1])


@pytest.fixture(scope="session")
def kubeconfig(bin_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    reuse = os.environ.get("FERRY_TEST_KUBECONFIG")
    if reuse:
        subprocess.run(
            [str(bin_dir / "kubectl"), "--kubeconfig", reuse, "apply", "--server-side", "--force-conflicts",
             "-f", str(ROOT / "crds")],
            check=True, capture_output=True,
        )
        yield reuse
        return
    cluster_dir = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "FERRY_CLUSTER_DIR": str(cluster_dir)}
    subprocess.run(["bash", str(HACK / "cluster.sh"), "up"], check=True, env=env, stdout=subprocess.DEVNULL)
    try:
        yield str(cluster_dir / "kubeconfig")
    finally:
        subprocess.run(["bash", str(HACK / "cluster.sh"), "down"], env=env, check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Kubectl:
    """The real kubectl against the test cluster."""

    def __init__(self, binary: pathlib.Path, kubeconfig: str):
        self.binary = str(binary)
        self.kubeconfig = kubeconfig

    def __call__(self, *args: str, input: str | None = None, check: bool = True,
                 kubeconfig: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [self.binary, "--kubeconfig", kubeconfig or self.kubeconfig, *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def json(self, *args: str, **kwargs: Any) -> Any:
        import json

        return json.loads(self(*args, "-o", "json", **kwargs).stdout)


@pytest.fixture(scope="session")
def kubectl(bin_dir: pathlib.Path, kubeconfig: str) -> Kubectl:
    return Kubectl(bin_dir / "kubectl", kubeconfig)


@pytest.fixture
def namespace(kubectl: Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{uuid.uuid4().hex[:5]}"
    kubectl("create", "namespace", name)
    yield name
    kubectl("delete", "namespace", name, "--wait=false", check=False)


class FerryProcess:
    """A `ferry` subcommand running as its own process, as it runs in production."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: pathlib.Path):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferry.cli.main", *args],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30.0) -> re.Match:
        rx = re.compile(pattern)

        def found() -> re.Match | None:
            if self.proc.poll() is not None and not rx.search(self.log):
                raise AssertionError(f"ferry {' '.join(self.args)} exited {self.proc.returncode}:\n{self.log[-3000:]}")
            return rx.search(self.log)

        return wait_until(found, timeout, what=f"/{pattern}/ in the log of ferry {self.args[0]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig) if sig == signal.SIGKILL else self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM) without waiting: stop_all signals every process
        first, so their graceful shutdowns overlap instead of adding up in each teardown."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def ferry_process(kubeconfig: str, tmp_path: pathlib.Path) -> Iterator[Callable[..., FerryProcess]]:
    started: list[FerryProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, kubeconfig_path: str | None = None) -> FerryProcess:
        full_env = {**os.environ, "KUBECONFIG": kubeconfig_path or kubeconfig, "PYTHONUNBUFFERED": "1",
                    **(env or {})}
        log = tmp_path / f"ferry-{args[0]}-{len(started)}.log"
        p = FerryProcess(list(args), full_env, log)
        started.append(p)
        return p

    yield start
    stop_all(reversed(started))



# CI runs hypothesis derandomized (the same examples every run) with no per-example deadline:
# a shared 2-core machine makes timings noisy; local runs keep exploring new examples.
try:
    from hypothesis import HealthCheck, settings as _hsettings

    _hsettings.register_profile("ci", derandomize=True, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
    if os.environ.get("CI"):
        _hsettings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
