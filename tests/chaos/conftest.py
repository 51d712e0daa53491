"""The crash matrix (issue 13) over the real stack: the fixtures of tests/integration (a real
kube-apiserver + etcd, the operator and the agents as processes, sim VM processes).

`pytest tests/chaos` runs the core set (a few cases, part of the normal suite);
`FERRY_CHAOS=full pytest tests/chaos` runs every case. The other cases are deselected, not
skipped. At the end the session prints the table of what ran: one row per case with the
component, the outcome, the final host and each invariant's result, and the wall time.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "integration"))  # stack.py: the whole of ferry for one test
sys.path.insert(0, str(HERE))

FULL = os.environ.get("FERRY_CHAOS", "").lower() == "full"


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        if "/chaos/" not in str(item.fspath):
            keep.append(item)
            continue
        item.add_marker(pytest.mark.integration)
        item.add_marker(pytest.mark.chaos)
        core = item.get_closest_marker("core") is not None
        (keep if FULL or core else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter):
    from checks import ROWS, format_table

    if not ROWS:
        return

    terminalreporter.write_sep("=", f"crash matrix ({'full' if FULL else 'core set'})")
    terminalreporter.write_line(format_table(ROWS))
