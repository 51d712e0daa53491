"""A node's cordon as its Host's maintenance: only the cordon's own maintenance is undone."""

import pytest

from ferry.hosts.cordon import CORDON_REASON, cordon_patch

MINE = {"maintenance": {"reason": CORDON_REASON}}
USERS = {"maintenance": {"reason": "rack r1 power work"}}


@pytest.mark.parametrize("unschedulable,spec,patch", [
    (True, {}, {"spec": {"maintenance": {"reason": CORDON_REASON, "start": None}}}),
    (True, {"maintenance": None}, {"spec": {"maintenance": {"reason": CORDON_REASON, "start": None}}}),
    (True, MINE, None),                                   # already in maintenance: nothing to do
    (True, USERS, None),                                  # the user's drain stays as it is
    (False, MINE, {"spec": {"maintenance": None}}),       # uncordon ends the cordon's maintenance
    (False, USERS, None),                                 # ...never the user's
    (False, {}, None),
])
def test_cordon_patch(unschedulable, spec, patch):
    assert cordon_patch(unschedulable, spec) == patch
