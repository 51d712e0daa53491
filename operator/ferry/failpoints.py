"""Named failpoints: crash or stop a ferry process at one exact step (etcd's gofail, pingcap's
failpoint). Off unless ``FERRY_FAILPOINTS`` names them, e.g.::

    FERRY_FAILPOINTS=operator.after-record-write=crash,target-agent.before-resume=stop

Actions: ``crash`` (``os._exit(CRASH_EXIT_CODE)``: no cleanup, no flush, like SIGKILL) and
``stop`` (the calling thread hangs until the process is killed; in the operator that is the
event loop, so the whole process stops making progress). A point fires each time it is
reached; tests restart the crashed process without the variable.

Cost when off: the environment is read once at import; with nothing named, ``hit`` is a
function that returns at once (one call, no lookup).

Every point is listed in ``POINTS`` (name -> where it sits) and documented in
docs/failpoints.md; ``hit`` refuses a name not listed there, so a renamed point cannot leave a
test crashing nothing.
"""

from __future__ import annotations

import os
import sys
import threading

ENV = "FERRY_FAILPOINTS"
FIRED_ENV = "FERRY_FAILPOINTS_FIRED"  # optional: a file each firing is appended to
CRASH_EXIT_CODE = 86  # distinct from a signal's 128+n and from a Python error's 1
ACTIONS = ("crash", "stop")

#: every failpoint: name -> the step it sits at (docs/failpoints.md has the same table)
POINTS: dict[str, str] = {
    # the operator (ferry.controller.effects / migration_reconciler)
    "operator.before-record-write": "the flip of Droplet.status.host is about to be written",
    "operator.after-record-write": "the record names the target; the ferry.dev/host label is not written yet",
    "operator.after-label-write": "record and label moved; the migration's status (CutOver) is not written yet",
    "operator.before-secret-delete": "a finished attempt's transfer Secret is about to be deleted",
    "operator.before-release": "a terminal status (Completed/Failed/Cancelled: the reservation's release) is about to be written",
    "operator.before-record-return": "the record is about to be moved back to the source (the target died before running)",
    # the source agent (ferry.agent.execute)
    "source-agent.before-start-migration": "the source VM is about to be told to migrate",
    "source-agent.before-report-completed": "the source's Completed transfer report with its digest is about to be written",
    "source-agent.before-report-verified": "qemu: the digest of the paused source, hashed after the switchover, is about to be reported",
    "source-agent.before-destroy": "the source copy is about to be destroyed (the record moved, the target runs)",
    "source-agent.before-cancel": "the source is about to cancel its migration and resume the guest",
    # the target agent (ferry.agent.execute)
    "target-agent.before-report-received": "the target's Received report with its digest is about to be written",
    "target-agent.before-resume": "the target VM is about to be resumed (the record names the target)",
    "target-agent.after-resume": "the target VM runs; its Running report is not written yet",
    "target-agent.before-report-verified": "qemu: the digest of the frozen point, hashed after the resume, is about to be reported",
    # the qemu driver in the agent process (ferry.drivers.qemu.sequence)
    "qemu.source-before-hash": "the source completed (Completed persisted, guest paused for good); its disk is not hashed yet",
    "qemu.target-frozen": "the target froze its received disk (overlay in place, guest paused); Received is not reported yet",
    "qemu.target-before-commit": "the target hashed the frozen base after the resume; the overlay is not merged back yet",
    "target-agent.before-address": "the network cut-over: the target VM runs, its address is not on the target's node yet",
    "target-agent.after-address": "the address is on the target's node; status.target.network and Running not written yet",
    # the sim VM process (ferry.drivers.sim.vm)
    "vm.source-paused": "the source guest was paused for the final copy",
    "vm.source-completed": "the source sent everything and the target's verdict came back (postmigrate)",
    "vm.target-received": "the target received and verified the whole copy (still paused)",
    "vm.target-before-resume": "the target VM is about to run the received guest (cont)",
}


class FailpointError(ValueError):
    pass


def parse(value: str | None) -> dict[str, str]:
    """``"a=crash,b=stop"`` -> ``{"a": "crash", "b": "stop"}``; unknown names or actions raise."""
    out: dict[str, str] = {}
    for item in (value or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, action = item.partition("=")
        name, action = name.strip(), (action.strip() or "crash") if sep else "crash"
        if name not in POINTS:
            raise FailpointError(f"{ENV}: unknown failpoint {name!r} (known: {', '.join(sorted(POINTS))})")
        if action not in ACTIONS:
            raise FailpointError(f"{ENV}: failpoint {name}: unknown action {action!r} (one of {', '.join(ACTIONS)})")
        out[name] = action
    return out


def _fire(name: str, action: str) -> None:
    line = f"ferry failpoint {name}: {action} (pid {os.getpid()})\n"
    sys.stderr.write(line)
    sys.stderr.flush()
    fired = os.environ.get(FIRED_ENV)
    if fired:  # a record that outlives the process and its directory (a test's witness)
        try:
            with open(fired, "a") as f:
                f.write(line)
        except OSError:
            pass
    if action == "crash":
        os._exit(CRASH_EXIT_CODE)
    threading.Event().wait()  # stop: hang here until the process is killed


def _off(name: str) -> None:
    """No failpoint is enabled: return at once."""


def _on(name: str) -> None:
    action = ACTIVE.get(name)
    if action is not None:
        _fire(name, action)
    elif name not in POINTS:
        raise FailpointError(f"failpoint {name!r} is not listed in ferry.failpoints.POINTS")


ACTIVE: dict[str, str] = parse(os.environ.get(ENV))

#: ``hit(name)``: crash or stop here if ``name`` is enabled; nothing otherwise.
hit = _on if ACTIVE else _off
