"""One agent per host: a second agent waits on the host's agent lock until the first exits;
the launcher is chosen by FERRY_LAUNCHER."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from ferry.agent.main import make_launcher, wait_for_host_lock
from ferry.drivers.launcher import ProcessLauncher
from ferry.drivers.pod_launcher import PodLauncher


def test_a_second_agent_waits_until_the_first_exits(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl,os,sys;fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);fcntl.flock(fd,fcntl.LOCK_EX);"
        "print('held',flush=True);sys.stdin.read()"), str(tmp_path / "agent.lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        stop, got = threading.Event(), []
        t = threading.Thread(target=lambda: got.append(wait_for_host_lock(str(tmp_path), "host-a", stop)))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not got  # still waiting: the first agent runs
        holder.stdin.close()  # the first agent exits
        t.join(10)
        assert got and got[0] is not None
    finally:
        holder.kill()
        holder.wait()


def test_stopped_while_waiting_returns_none(tmp_path):
    first = wait_for_host_lock(str(tmp_path), "host-a", threading.Event())
    assert first is not None
    stop = threading.Event()
    stop.set()
    # the same process holds it through another open file: flock is per open file, so this waits
    assert wait_for_host_lock(str(tmp_path), "host-a", stop) is None


def test_launcher_choice(tmp_path):
    assert isinstance(make_launcher("host-a", str(tmp_path), None, {}), ProcessLauncher)
    pod = make_launcher("host-a", str(tmp_path), object(), {"FERRY_LAUNCHER": "pod", "FERRY_LAUNCHER_IMAGE": "ferry:1",
                                                            "FERRY_LAUNCHER_HOST_DATA_DIR": "/srv/ferry"})
    assert isinstance(pod, PodLauncher) and (pod.node, pod.image, pod.host_data_dir) == ("host-a", "ferry:1", "/srv/ferry")
    with pytest.raises(ValueError, match="FERRY_LAUNCHER_IMAGE"):
        make_launcher("host-a", str(tmp_path), object(), {"FERRY_LAUNCHER": "pod"})
    with pytest.raises(ValueError, match="unknown"):
        make_launcher("host-a", str(tmp_path), None, {"FERRY_LAUNCHER": "vm"})
