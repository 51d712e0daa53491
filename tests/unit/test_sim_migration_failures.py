"""Failure paths of migration between two SimDrivers: every failed or cancelled attempt
leaves the source running with exactly the data its guest wrote (checked against the
write log), and nothing of the target runs.
"""

import os
import signal

import pytest
from support import wait_until

from ferry.drivers.base import MigrationOptions, MigrationState, VMState
from test_sim_migration import (  # noqa: F401 - fixtures and helpers
    KEY,
    MiB,
    assert_source_intact,
    hosts,
    images,
    replay_source,
    spec,
    start_with_data,
    wait_terminal,
)


def test_killing_the_target_mid_copy_leaves_the_source_running_and_intact(hosts, tmp_path):
    src, dst = hosts
    s = spec("hotspot", rate=1024)
    start_with_data(src, s)
    secret = os.urandom(32)
    addr = dst.prepare_incoming(s, "127.0.0.1", secret, "lm-kill")
    src.start_migration(KEY, addr, secret, "lm-kill", MigrationOptions(downtime_budget_ms=50, bandwidth_bps=256 << 10))
    wait_until(lambda: src.query_migration(KEY).bytes_sent > 64 << 10, what="copy under way")
    os.kill(dst.list_vms()[0].pid, signal.SIGKILL)
    st = wait_terminal(src, KEY)
    assert st.state is MigrationState.FAILED
    assert "target" in st.error or "connection" in st.error
    assert st.digest is None
    assert_source_intact(src, tmp_path)
    # the target's partial data is deleted by destroy; nothing of it runs
    dst.destroy(KEY)
    assert dst.list_vms() == [] and not os.path.exists(dst.vm_dir(KEY))


def test_corrupt_frame_fails_the_attempt_never_the_data(hosts, tmp_path):
    src, dst = hosts
    s = spec("uniform", rate=1024)
    start_with_data(src, s)
    secret = os.urandom(32)
    addr = dst.prepare_incoming(s, "127.0.0.1", secret, "lm-corrupt")
    src.execute(KEY, "x-debug-corrupt", {"frame": 3})
    src.start_migration(KEY, addr, secret, "lm-corrupt", MigrationOptions(downtime_budget_ms=50))
    st = wait_terminal(src, KEY)
    assert st.state is MigrationState.FAILED
    assert "checksum mismatch" in st.error and st.error.startswith("target:")
    t = wait_until(lambda: (x := dst.query_migration(KEY)).state is MigrationState.FAILED and x, what="target failed")
    assert "checksum mismatch" in t.error and t.digest is None
    assert dst.list_vms()[0].state is VMState.INCOMING  # never runs
    with pytest.raises(Exception, match="not received"):
        dst.resume(KEY)
    assert_source_intact(src, tmp_path)
    dst.destroy(KEY)
    assert not os.path.exists(dst.vm_dir(KEY))


def test_wrong_secret_is_refused_and_the_target_keeps_waiting(hosts, tmp_path):
    src, dst = hosts
    s = spec("uniform", rate=512)
    start_with_data(src, s, min_writes=20)
    secret = os.urandom(32)
    addr = dst.prepare_incoming(s, "127.0.0.1", secret, "lm-auth")
    src.start_migration(KEY, addr, os.urandom(32), "lm-auth", MigrationOptions())
    st = wait_terminal(src, KEY)
    assert st.state is MigrationState.FAILED and "authentication" in st.error
    t = dst.execute(KEY, "query-migrate")
    assert t["auth_failures"] == 1 and t["state"] == "None"
    assert "refused data connection" in open(os.path.join(dst.vm_dir(KEY), "log")).read()
    assert_source_intact(src, tmp_path)
    # the legitimate source still gets through
    src.resume(KEY)
    src.start_migration(KEY, addr, secret, "lm-auth", MigrationOptions(downtime_budget_ms=100))
    assert wait_terminal(src, KEY).state is MigrationState.COMPLETED


def test_cancel_aborts_and_resumes_the_source(hosts, tmp_path):
    src, dst = hosts
    s = spec("uniform", rate=2048)
    start_with_data(src, s)
    secret = os.urandom(32)
    addr = dst.prepare_incoming(s, "127.0.0.1", secret, "lm-cancel")
    src.start_migration(KEY, addr, secret, "lm-cancel", MigrationOptions(bandwidth_bps=256 << 10))
    wait_until(lambda: src.query_migration(KEY).bytes_sent > 0, what="copy under way")
    src.cancel_migration(KEY)
    st = src.query_migration(KEY)
    assert st.state is MigrationState.ABORTED and st.error == "cancelled"
    # the target learns it by an ABORT frame or by the closed connection
    t = wait_until(lambda: (x := dst.query_migration(KEY)).state in (MigrationState.FAILED, MigrationState.ABORTED) and x,
                   what="target noticed")
    assert t.error and t.digest is None
    assert_source_intact(src, tmp_path)


def test_cancel_after_completion_resumes_the_source(hosts, tmp_path):
    src, dst = hosts
    s = spec("uniform", rate=1024)
    start_with_data(src, s)
    secret = os.urandom(32)
    addr = dst.prepare_incoming(s, "127.0.0.1", secret, "lm-late")
    src.start_migration(KEY, addr, secret, "lm-late", MigrationOptions(downtime_budget_ms=200))
    assert wait_terminal(src, KEY).state is MigrationState.COMPLETED
    assert src.status(KEY)["status"] == "postmigrate"
    with pytest.raises(Exception, match="cancel"):
        src.resume(KEY)  # a completed source does not run again by accident
    src.cancel_migration(KEY)
    assert src.query_migration(KEY).state is MigrationState.ABORTED
    assert_source_intact(src, tmp_path)


def test_offline_copy_of_a_stopped_vm(hosts, tmp_path):
    src, dst = hosts
    s = spec("sequential", rate=4096)
    start_with_data(src, s, min_writes=300)
    src.stop(KEY)
    assert src.list_vms()[0].state is VMState.STOPPED
    secret = os.urandom(32)
    addr = dst.prepare_incoming(s, "127.0.0.1", secret, "lm-off")
    src.start_migration(KEY, addr, secret, "lm-off", MigrationOptions(offline=True, bandwidth_bps=64 * MiB))
    st = wait_terminal(src, KEY)
    assert st.state is MigrationState.COMPLETED, st.error
    assert st.round == 1 and st.max_throttle_percent == 0 and st.throttled_ms == 0
    n, rdisk, rmem = replay_source(src, tmp_path)
    assert images(dst) == (rdisk, rmem)
    assert n == src.status(KEY)["seq"]  # nothing written during the copy
    assert dst.query_migration(KEY).digest == st.digest == src.digest(KEY)
    dst.resume(KEY)
    assert dst.list_vms()[0].state is VMState.RUNNING
    # the source's last migration stays queryable after its VM process is gone
    src.stop(KEY)
    after = src.query_migration(KEY)
    assert after.state is MigrationState.COMPLETED and after.digest == st.digest


def test_geometry_mismatch_fails_cleanly(hosts, tmp_path):
    src, dst = hosts
    s = spec("uniform", rate=256)
    start_with_data(src, s, min_writes=5)
    secret = os.urandom(32)
    addr = dst.prepare_incoming(spec(disk_gib=2), "127.0.0.1", secret, "lm-geo")
    src.start_migration(KEY, addr, secret, "lm-geo", MigrationOptions())
    st = wait_terminal(src, KEY)
    assert st.state is MigrationState.FAILED and "geometry" in st.error
    assert_source_intact(src, tmp_path)


def test_killing_the_source_mid_copy_fails_the_target_which_never_runs(hosts):
    src, dst = hosts
    s = spec("uniform", rate=1024)
    start_with_data(src, s)
    secret = os.urandom(32)
    addr = dst.prepare_incoming(s, "127.0.0.1", secret, "lm-srcdie")
    src.start_migration(KEY, addr, secret, "lm-srcdie", MigrationOptions(bandwidth_bps=256 << 10))
    wait_until(lambda: src.query_migration(KEY).bytes_sent > 64 << 10, what="copy under way")
    seq_before = src.status(KEY)["seq"]
    os.kill(src.list_vms()[0].pid, signal.SIGKILL)
    t = wait_until(lambda: (x := dst.query_migration(KEY)).state is MigrationState.FAILED and x, what="target failed")
    assert "closed" in t.error or "Connection" in t.error
    assert dst.list_vms()[0].state is VMState.INCOMING
    with pytest.raises(Exception, match="not received"):
        dst.resume(KEY)
    # the source host restarts its VM from its own images; sequence numbers never repeat
    assert src.list_vms()[0].state is VMState.STOPPED
    src.start(s)
    assert src.status(KEY)["seq"] >= seq_before
