"""Fixtures for the qemu driver tests: the test guest and two "hosts" on loopback.

Each host is a QemuDriver with its own data directory; no Kubernetes. The guest
(Debian kernel + busybox initramfs) is built once by hack/build-test-guest.sh and
cached in ${FERRY_CACHE:-~/.cache/ferry}/guest.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from qemu_support import QEMU, make_driver

from ferry.drivers.base import VMKey, VMSpec
from ferry.drivers.qemu import QemuDriver

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: measurements too long for every suite run (test_qemu_verify.py's 512 MiB clean run, the
#: second amount of written data for the downtime comparison) run with FERRY_QEMU_LONG=1; by
#: default they are deselected, not skipped
LONG = os.environ.get("FERRY_QEMU_LONG", "") == "1"
LONG_CASES = ("clean-512MiB",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # QEMU 7.2's TCG sometimes crashes the guest's kernel right after a live migration, without
    # ferry (guest_console.GuestKernelCrashed): a test that meets exactly that runs once more
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=["GuestKernelCrashed"]))
    long_items = [i for i in items if any(c in i.nodeid for c in LONG_CASES)]
    if long_items and not LONG:
        config.hook.pytest_deselected(items=long_items)
        items[:] = [i for i in items if i not in long_items]
    if shutil.which(QEMU):
        return
    skip = pytest.mark.skip(reason=f"{QEMU} is not installed (apt-get install qemu-system-x86 qemu-utils)")
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("guest")
    subprocess.run(["bash", str(ROOT / "hack" / "build-test-guest.sh"), str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return {"kernel": str(out / "vmlinuz"), "initrd": str(out / "initrd.img")}


@pytest.fixture
def hosts(guest: dict[str, str], tmp_path: pathlib.Path) -> Iterator[tuple[QemuDriver, QemuDriver]]:
    a = make_driver(guest, tmp_path / "host-a")
    b = make_driver(guest, tmp_path / "host-b")
    yield a, b
    for d in (a, b):
        for vm in d.list_vms():
            d.destroy(vm.key)
        d.close()


@pytest.fixture
def spec(request: pytest.FixtureRequest) -> VMSpec:
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return VMSpec(key=VMKey("t", name), cpu=1, memory_mib=1024, disk_gib=25)
