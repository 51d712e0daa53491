"""ferry.failpoints: off unless FERRY_FAILPOINTS names them; crash exits at once, stop hangs;
every point is listed, documented and placed in the code."""

import pathlib
import re
import subprocess
import sys
import time

import pytest

from ferry import failpoints

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run(env_value: str | None, name: str, timeout: float = 20) -> subprocess.Popen:
    env = {"PYTHONPATH": str(ROOT / "operator"), "PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["FERRY_FAILPOINTS"] = env_value
    code = f"from ferry import failpoints; failpoints.hit({name!r}); print('after', flush=True)"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_off_by_default_and_costs_one_empty_call():
    p = run(None, "operator.after-record-write")
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0 and out.strip() == "after"
    assert failpoints.parse("") == {} and failpoints._off.__code__.co_code  # the no-op
    if not failpoints.ACTIVE:
        assert failpoints.hit is failpoints._off


def test_crash_exits_at_once_with_its_code():
    p = run("operator.after-record-write=crash", "operator.after-record-write")
    out, err = p.communicate(timeout=20)
    assert p.returncode == failpoints.CRASH_EXIT_CODE and "after" not in out
    assert "ferry failpoint operator.after-record-write: crash" in err


def test_another_point_does_not_fire():
    p = run("operator.after-record-write=crash", "operator.after-label-write")
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 0 and out.strip() == "after"


def test_stop_hangs_until_killed():
    p = run("vm.source-paused=stop", "vm.source-paused")
    deadline = time.monotonic() + 20
    while "stop" not in (line := p.stderr.readline()) and time.monotonic() < deadline:
        pass
    assert "vm.source-paused: stop" in line
    with pytest.raises(subprocess.TimeoutExpired):
        p.wait(timeout=1.0)
    p.kill()
    p.wait(10)


@pytest.mark.parametrize("value", ["no.such.point=crash", "vm.source-paused=explode"])
def test_a_wrong_name_or_action_fails_fast(value):
    with pytest.raises(failpoints.FailpointError):
        failpoints.parse(value)


def test_parse_defaults_to_crash():
    assert failpoints.parse("vm.source-paused, operator.before-release=stop") == {
        "vm.source-paused": "crash", "operator.before-release": "stop"}


def test_every_point_is_placed_in_the_code_and_documented():
    code = "\n".join(p.read_text() for p in (ROOT / "operator" / "ferry").rglob("*.py") if p.name != "failpoints.py")
    placed = {name for call in re.findall(r'failpoints\.hit\(([^)]*)\)', code) for name in re.findall(r'"([^"]+)"', call)}
    assert placed == set(failpoints.POINTS), (placed ^ set(failpoints.POINTS))
    doc = (ROOT / "docs" / "failpoints.md").read_text()
    for name in failpoints.POINTS:
        assert f"`{name}`" in doc, name
