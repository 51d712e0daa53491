"""The sending end of a migration's pre-copy: runs in the source VM process.

Per attempt::

    round 1   take (clear) the dirty bitmaps, then send every block that holds data
              (holes skipped via SEEK_DATA/SEEK_HOLE, all-zero blocks skipped)
    round N   take the dirty bitmaps, send what the guest dirtied meanwhile
              (contiguous blocks coalesced into extents of up to 1 MiB)
    after each round ask ``policy.after_round``: pause / throttle harder / raise the
              allowed downtime one step / give up (NotConverging)
    force     ``force_complete()``: pause the guest at once (even mid-round), finish the
              round and the final round whatever the budget
    final     pause the guest, take the bitmaps, send the rest, then DONE with the
              digests of what was sent; the target compares them with the digests of
              what it holds and answers VERDICT. Downtime = pause -> verdict received.

Reading: each image is read through a read-only shared mapping of its file (``MMAP_READS``):
the plain channel hashes a block there and sends it straight from the mapping (sendmsg,
no copy in user space), the sealed one hashes it there and encrypts it from the mapping
into its record slot. While the guest runs, a guest write between the hash and the send
can tear a block; such frames carry ``framing.FLAG_LIVE`` and the target holds a block
that does not match as owed until it comes again (the write that tore it marked it dirty,
so a later round sends it): the resend rule, ``ferry.transfer.framing``. In a paused round
nothing can tear, and the flag is off. Where the mapping cannot be used (mmap refused, a
file shorter than the image) the source ``preadv``s into the channel's buffers as before;
``stats()["reads"]`` says which path ran, per image, in bytes.

Failure anywhere (socket error, checksum mismatch, digest mismatch, cancel) fails the
attempt with a reason; the source lifts the throttle and resumes its guest if it paused it.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ferry.api.reports import bounded_rounds
from ferry.transfer import auth, framing, session
from ferry.transfer.channel import AES_256_GCM, read_frame
from ferry.transfer.bitmap import DirtyBitmap, extents, popcount, split_extents
from ferry.transfer.digest import HASH_NAME, BlockHashes, block_hashes, combine, data_block_ranges, zero_hash
from ferry.transfer.framing import HASH_SIZE, Kind
from ferry.transfer.policy import RoundStep, KindSample, PolicyConfig, PolicyInput, after_round, expected_downtime_ms
from ferry.transfer.ratelimit import TokenBucket
from ferry.transfer.session import (
    ABORTED,
    COMPLETED,
    CONVERGING,
    COPYING,
    FAILED,
    MAX_EXTENT_BYTES,
    NONE,
    PAUSED,
    TERMINAL,
    Cancelled,
    MigrationFailed,
    failure_reason,
)

log = logging.getLogger(__name__)

ROUNDS_KEPT = 20

# Read the images through a mapping (False: preadv into the channel's buffers, as before).
MMAP_READS = True


def map_image(fd: int, size: int) -> tuple[mmap.mmap | None, str | None]:
    """A read-only shared mapping of the first ``size`` bytes of the file behind ``fd``,
    or (None, why not). A file shorter than ``size`` is not mapped: reading a mapping
    past the end of its file is SIGBUS, not zeros."""
    if not MMAP_READS:
        return None, "mmap reads off"
    try:
        have = os.fstat(fd).st_size
        if have < size:
            return None, f"file shorter than the image ({have} < {size} bytes)"
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    except (OSError, ValueError) as e:
        return None, f"mmap refused: {e}"
    try:
        m.madvise(mmap.MADV_SEQUENTIAL)
    except (OSError, AttributeError):
        pass
    return m, None


class SourceDevice(Protocol):
    """What the sender needs of an image: its file, geometry and dirty bitmap."""

    fd: int
    size: int
    block_size: int
    nblocks: int
    dirty: DirtyBitmap


class Guest(Protocol):
    """What the sender needs of the guest: pause, resume, throttle, and the state that travels."""

    def pause(self) -> bool:
        """Stop the guest's writes; return True if it was running. Returns only when no
        write is in flight."""

    def resume(self) -> None: ...

    def set_throttle(self, disk_percent: int, memory_percent: int) -> None: ...

    def export_state(self) -> dict:
        """Guest state that travels with the migration (like CPU state)."""


class _KindProgress:
    __slots__ = ("total", "sent", "queued")

    def __init__(self, total: int):
        self.total = total
        self.sent = 0
        self.queued = 0  # bytes of the current round not sent yet


class SourceEngine:
    """Sends one VM's images to a target VM. ``start()`` runs it in a thread."""

    def __init__(
        self,
        *,
        disk: SourceDevice,
        memory: SourceDevice,
        guest: Guest,
        target: str,
        secret: bytes,
        migration_id: str,
        downtime_budget_ms: int = 300,
        max_downtime_ms: int | None = None,
        force_complete: bool = False,
        bandwidth_bps: int | None = None,
        offline: bool = False,
        policy: PolicyConfig | None = None,
        io_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        before_round: Callable[[int], None] | None = None,
        after_hash: Callable[[str, int, int], None] | None = None,
        on_finish: Callable[["SourceEngine"], None] | None = None,
        channel: str = AES_256_GCM,
        reads: str = "mmap",
    ):
        self.disk, self.memory, self.guest = disk, memory, guest
        self.on_finish = on_finish  # called in the engine's thread once the attempt ended
        self.target = target
        self.secret = bytes(secret)
        self.migration_id = migration_id
        self.reads = reads  # "mmap" (where the mapping can be used) or "preadv" (a benchmark's baseline)
        self.channel = channel  # asked for: ferry.transfer.channel.AES_256_GCM (default) or PLAIN
        self.offline = offline
        self.bandwidth_limit = bandwidth_bps or 0
        self.policy = policy or PolicyConfig(downtime_budget_ms=downtime_budget_ms, max_downtime_ms=max_downtime_ms)
        self.io_timeout = io_timeout
        self.connect_timeout = connect_timeout
        self.before_round = before_round  # benchmark hook: before_round(n) just before round n >= 2 takes the bitmaps
        self.corrupt_data_frame: int | None = None  # test hook: corrupt the Nth data frame (sent without
        # FLAG_LIVE: a bad copy, which the target fails at once; a tear is a guest write, below)
        # test hook: after_hash(name, first, count) runs between hashing an extent in the
        # mapping and sending it (a guest write there tears a block)
        self.after_hash = after_hash

        self.state = NONE
        self.error: str | None = None
        self.round = 0
        self.rounds: list[dict] = []
        self.bandwidth_bps = 0.0
        self.dirty_rate_bps = 0.0
        self.expected_downtime_ms = 0.0
        self.allowed_downtime_ms = float(self.policy.downtime_budget_ms)  # raised by downtime steps
        self.downtime_steps = 0
        self.predicted_downtime_ms: int | None = None  # what the policy expected when it paused
        self.forced = False  # paused by force-complete, not by convergence
        self._rounds_at_limit = 0
        self._force = threading.Event()
        if force_complete:
            self._force.set()
        self.downtime_ms: int | None = None
        self.digest: str | None = None
        self.target_digest: str | None = None
        self.started_at = time.monotonic()
        self.finished_at: float | None = None
        self.disk_throttle = 0
        self.memory_throttle = 0
        self.max_throttle = 0
        self.throttled_ms = 0.0
        self._throttle_since: float | None = None
        self._progress = {"disk": _KindProgress(disk.size), "memory": _KindProgress(memory.size)}
        self._hashes = {"disk": BlockHashes(disk.size, disk.block_size), "memory": BlockHashes(memory.size, memory.block_size)}
        self._round_started = time.monotonic()
        self._round_bytes = 0
        self._bucket = TokenBucket(self.bandwidth_limit)
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._verdict_event = threading.Event()
        self._verdict: dict | None = None
        self._remote_error: str | None = None
        self._sock: socket.socket | None = None
        self._chan = None  # the channel frames go through, once the handshake agreed on it
        self._we_paused = False
        self._paused_at: float | None = None
        self._data_frames = 0
        self._buf = bytearray(MAX_EXTENT_BYTES)
        self._maps: dict[str, mmap.mmap] = {}
        self._views: dict[str, memoryview] = {}
        self._reads = {n: {"mode": None, "mmap_bytes": 0, "preadv_bytes": 0, "fallback": None}
                       for n in ("disk", "memory")}
        self._thread: threading.Thread | None = None

    # --- control ---------------------------------------------------------------

    def start(self) -> None:
        self.state = COPYING
        self._thread = threading.Thread(target=self.run, name=f"migrate-{self.migration_id}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def cancel(self) -> None:
        """Abort: the run thread resumes the guest and lifts the throttle."""
        self._cancel.set()
        self._bucket.interrupt()
        self._verdict_event.set()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def force_complete(self) -> None:
        """Pause the guest now and finish the copy, whatever the downtime budget.
        Idempotent; no effect once the guest is paused or the attempt ended."""
        self._force.set()

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    # --- main ------------------------------------------------------------------

    def run(self) -> None:
        self.state = COPYING
        outcome: tuple[str, str] | None = None
        try:
            self._run()
        except Cancelled:
            outcome = (ABORTED, "cancelled")
        except Exception as e:  # noqa: BLE001 - every error fails the attempt
            if self._cancel.is_set():
                outcome = (ABORTED, "cancelled")
            else:
                outcome = (FAILED, self._remote_error or failure_reason(e))
                log.warning("migration %s failed: %s", self.migration_id, outcome[1])
        finally:
            self._done.set()
            self._unmap()
            if outcome is not None and outcome[0] == ABORTED:
                self._send_abort(outcome[1])
            # the source is whole again before anyone can see the attempt as over
            self._lift_throttle()
            if outcome is not None and self._we_paused:
                self.guest.resume()
                self._we_paused = False
            sock, self._sock = self._sock, None
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
            self.finished_at = time.monotonic()
            if outcome is not None:
                self.error = outcome[1]
                self.state = outcome[0]
            if self.on_finish is not None:
                try:
                    self.on_finish(self)
                except Exception:  # noqa: BLE001
                    log.exception("on_finish hook failed")

    def _map_images(self) -> None:
        for name, dev in (("disk", self.disk), ("memory", self.memory)):
            m, why = map_image(dev.fd, dev.size) if self.reads != "preadv" else (None, "preadv asked for")
            r = self._reads[name]
            if m is None:
                r["mode"], r["fallback"] = "preadv", why
                log.info("migration %s: %s image read with preadv (%s)", self.migration_id, name, why)
            else:
                self._maps[name], self._views[name] = m, memoryview(m)
                r["mode"] = "mmap"

    def _unmap(self) -> None:
        views, maps = self._views, self._maps
        self._views, self._maps = {}, {}
        for v in views.values():
            try:
                v.release()
            except BufferError:
                pass
        for m in maps.values():
            try:
                m.close()
            except BufferError:  # a view still held somewhere: the mapping goes with it
                pass

    def _send_abort(self, reason: str) -> None:
        sock, chan = self._sock, self._chan
        if sock is not None and chan is not None:
            try:
                sock.settimeout(1.0)
                chan.send_parts([framing.control_frame(Kind.ABORT, {"reason": reason})])
            except OSError:
                pass

    def abort_completed(self) -> None:
        """Cancel after COMPLETED (the cut-over did not happen): resume the guest."""
        if self.state == COMPLETED:
            self.state = ABORTED
            self.error = "cancelled after completion"
            if self._we_paused:
                self._we_paused = False
                self.guest.resume()

    def _check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()
        if self._force.is_set() and self.state in (COPYING, CONVERGING) and not self.offline:
            self.forced = True
            predicted = self._expected_if_paused_now()
            self.predicted_downtime_ms = int(round(predicted)) if predicted != float("inf") else None
            log.info("migration %s: force-complete, pausing the guest now", self.migration_id)
            self._pause_guest()
        if self._remote_error:
            raise MigrationFailed(self._remote_error)

    def _connect(self) -> socket.socket:
        host, _, port = self.target.rpartition(":")
        if host.startswith("tcp:"):
            host = host[4:]
        host = host.strip("[]")
        try:
            sock = socket.create_connection((host, int(port)), timeout=self.connect_timeout)
        except (OSError, ValueError) as e:
            raise MigrationFailed(f"cannot connect to target {self.target}: {e}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        except OSError:
            pass
        return sock

    def _run(self) -> None:
        sock = self._connect()
        self._sock = sock
        if self._cancel.is_set():
            raise Cancelled()
        try:
            hs = auth.client_handshake(sock, self.secret, self.migration_id, timeout=self.connect_timeout,
                                       channel=self.channel)
        except auth.AuthError as e:
            raise MigrationFailed(f"authentication with target failed: {e}") from None
        self._chan = hs.open(sock, self.secret, self.migration_id, "source")
        if session.BLOCKING_IO:
            framing.set_kernel_timeouts(sock, self.io_timeout)
        else:
            sock.settimeout(self.io_timeout)
        self._map_images()
        reader = threading.Thread(target=self._reader, name="migrate-reader", daemon=True)
        reader.start()
        self._send(
            framing.control_frame(
                Kind.INFO,
                {
                    "migration_id": self.migration_id,
                    "offline": self.offline,
                    "hash": HASH_NAME,
                    "disk": {"size": self.disk.size, "block_size": self.disk.block_size},
                    "memory": {"size": self.memory.size, "block_size": self.memory.block_size},
                },
            )
        )
        if self.offline:
            self._pause_guest()
        # round 1: everything that holds data
        self._begin_round()
        plan = {}
        for name, dev in (("disk", self.disk), ("memory", self.memory)):
            dev.dirty.swap()  # from here on every write is caught by the bitmap
            plan[name] = data_block_ranges(dev.fd, dev.size, dev.block_size)
        self._send_round(plan, full=True)
        prev: dict[str, int | None] = {"disk": None, "memory": None}
        while not self.offline:
            self._check()
            dirty = {"disk": self.disk.dirty.count() * self.disk.block_size,
                     "memory": self.memory.dirty.count() * self.memory.block_size}
            decision = after_round(
                self.policy,
                PolicyInput(
                    round=self.round,
                    disk=KindSample(dirty["disk"], prev["disk"], self.disk_throttle),
                    memory=KindSample(dirty["memory"], prev["memory"], self.memory_throttle),
                    bandwidth_bps=self.bandwidth_bps,
                    allowed_downtime_ms=self.allowed_downtime_ms,
                    rounds_at_limit=self._rounds_at_limit,
                    force=self._force.is_set() or self.state == PAUSED,
                ),
            )
            self.expected_downtime_ms = decision.expected_downtime_ms
            self._rounds_at_limit = decision.rounds_at_limit
            if decision.allowed_downtime_ms > self.allowed_downtime_ms:
                self.downtime_steps += 1
                self.allowed_downtime_ms = decision.allowed_downtime_ms
                log.info("round %d: %s", self.round, decision.reason)
            if decision.action is RoundStep.PAUSE:
                if self.state != PAUSED:
                    self.forced = self._force.is_set()
                    e = decision.expected_downtime_ms
                    self.predicted_downtime_ms = int(round(e)) if e != float("inf") else None
                break
            if decision.action is RoundStep.FAIL:
                raise MigrationFailed(decision.reason)
            if (decision.disk_throttle_percent, decision.memory_throttle_percent) != (self.disk_throttle, self.memory_throttle):
                log.info("round %d: %s", self.round, decision.reason)
                self._set_throttle(decision.disk_throttle_percent, decision.memory_throttle_percent)
            prev = dirty
            self.state = CONVERGING
            self._begin_round()
            self._send_round(self._take_dirty(), full=False)
        if not self.offline:
            if self.state != PAUSED:
                self._pause_guest()
            self._begin_round()
            self._send_round(self._take_dirty(), full=False)
        # verification
        self._check()
        disk_root, mem_root = self._hashes["disk"].root(), self._hashes["memory"].root()
        self.digest = combine(disk_root, mem_root)
        self._send(
            framing.control_frame(
                Kind.DONE,
                {
                    "disk_root": disk_root.hex(),
                    "memory_root": mem_root.hex(),
                    "digest": self.digest,
                    "guest": self.guest.export_state(),
                    "rounds": self.round,
                },
            )
        )
        if not self._verdict_event.wait(self.io_timeout):
            raise MigrationFailed("no verdict from target")
        self._check()
        verdict = self._verdict or {}
        self.target_digest = verdict.get("digest")
        if not verdict.get("ok") or self.target_digest != self.digest:
            raise MigrationFailed(
                f"digest mismatch: source {self.digest}, target {self.target_digest}: {verdict.get('error', '')}".rstrip(": ")
            )
        self.downtime_ms = int(round((time.monotonic() - (self._paused_at or time.monotonic())) * 1000))
        self._lift_throttle()
        self.state = COMPLETED
        log.info("migration %s completed: %d rounds, downtime %d ms, %s", self.migration_id, self.round, self.downtime_ms, self.digest)

    # --- rounds ----------------------------------------------------------------

    def _pause_guest(self) -> None:
        self._paused_at = time.monotonic()
        self._we_paused = self.guest.pause()
        self.state = PAUSED

    def _take_dirty(self) -> dict[str, bytes]:
        if self.before_round is not None:
            self.before_round(self.round)
        plan = {}
        for name, dev in (("disk", self.disk), ("memory", self.memory)):
            bits = dev.dirty.swap()
            plan[name] = bits
        return plan

    def _begin_round(self) -> None:
        self.round += 1
        self._round_started = time.monotonic()
        self._round_bytes = 0

    def _send_round(self, plan: dict, full: bool) -> None:
        devs = {"disk": self.disk, "memory": self.memory}
        work = {}
        for name, spec in plan.items():
            dev = devs[name]
            per = max(1, MAX_EXTENT_BYTES // dev.block_size)
            if isinstance(spec, (bytes, bytearray)):
                self._progress[name].queued = popcount(spec) * dev.block_size
                work[name] = extents(spec, per)
            else:
                self._progress[name].queued = sum(c for _, c in spec) * dev.block_size
                work[name] = split_extents(spec, per)
        # paused: no guest write can tear a block in this round, so the target takes any
        # mismatch as corruption (the resend rule does not apply)
        self._send(framing.control_frame(Kind.ROUND, {"full": full, "paused": self.state == PAUSED}, index=self.round))
        for name, kd, kz in (("disk", Kind.DISK, Kind.ZERO_DISK), ("memory", Kind.MEMORY, Kind.ZERO_MEMORY)):
            for first, count in work[name]:
                self._check()
                self._send_extent(name, devs[name], kd, kz, first, count, skip_zero=full)
            self._progress[name].queued = 0
        ms = (time.monotonic() - self._round_started) * 1000.0
        dirty_now = sum(d.dirty.count() * d.block_size for d in devs.values())
        self._account_round(ms, dirty_now)

    def _account_round(self, ms: float, dirty_now: int) -> None:
        secs = max(ms / 1000.0, 1e-6)
        if self._round_bytes >= (256 << 10) or ms >= 20:
            sample = self._round_bytes / secs
            if self.bandwidth_limit:
                sample = min(sample, self.bandwidth_limit)
            if sample > 0:
                self.bandwidth_bps = sample if self.bandwidth_bps <= 0 else 0.5 * self.bandwidth_bps + 0.5 * sample
        if self.state != PAUSED:
            rate = dirty_now / secs
            self.dirty_rate_bps = rate if self.round <= 2 else 0.5 * self.dirty_rate_bps + 0.5 * rate
        self.rounds.append({"round": self.round, "bytes": self._round_bytes, "dirty_bytes": dirty_now, "ms": int(round(ms)),
                            "start_ms": int(round((self._round_started - self.started_at) * 1000)),
                            "dirty_rate_bps": int(dirty_now / secs) if self.state != PAUSED else 0,
                            "throttle_percent": max(self.disk_throttle, self.memory_throttle),
                            "paused": self.state == PAUSED,
                            "disk_throttle": self.disk_throttle, "memory_throttle": self.memory_throttle})
        self.rounds[:] = bounded_rounds(self.rounds, ROUNDS_KEPT)

    def _send_extent(self, name, dev, kind_data, kind_zero, first, count, skip_zero) -> None:
        if self.state != PAUSED:
            # a block the guest dirtied again since this round began is sent by the next
            # round anyway: skip it now (each write costs one copy, not two)
            again = dev.dirty.mask(first, count)
            if again:
                k = 0
                while k < count:
                    if again >> k & 1:
                        self._progress[name].queued = max(0, self._progress[name].queued - dev.block_size)
                        k += 1
                        continue
                    j = k
                    while j < count and not (again >> j & 1):
                        j += 1
                    self._send_blocks(name, dev, kind_data, kind_zero, first + k, j - k, skip_zero)
                    k = j
                return
        self._send_blocks(name, dev, kind_data, kind_zero, first, count, skip_zero)

    def _send_blocks(self, name, dev, kind_data, kind_zero, first, count, skip_zero) -> None:
        bs = dev.block_size
        nbytes = count * bs
        chan = self._chan
        if chan is None:
            raise Cancelled()
        src = self._views.get(name)
        if src is not None and (first + count) * bs <= len(src):
            self._send_mapped(name, src[first * bs : (first + count) * bs], kind_data, kind_zero, first, count, skip_zero)
            return
        self._reads[name]["preadv_bytes"] += nbytes
        # read the extent straight into where the channel sends it from (the sealed
        # channel's record slots: it encrypts the data where it lies)
        views = chan.data_views(nbytes)
        n = os.preadv(dev.fd, views, first * bs)
        if n < nbytes:  # past the end of a short file: zeros
            o = 0
            for v in views:
                if o + len(v) > n:
                    v[max(0, n - o):] = bytes(len(v) - max(0, n - o))
                o += len(v)
        whole = all(len(v) % bs == 0 for v in views)
        if whole:
            hashes = b"".join([block_hashes(v, bs) for v in views]) if len(views) > 1 else block_hashes(views[0], bs)
        zh = zero_hash(bs)
        if whole and zh not in hashes and self.corrupt_data_frame is None:
            # the whole extent is data (the common case): one frame from the channel's slots
            self._data_frames += 1
            self._bucket.consume(nbytes)
            self._check()
            self._send_data(framing.data_header(kind_data, first, hashes, nbytes), hashes, nbytes)
            self._sent_whole(name, first, hashes, nbytes)
            return
        # zero blocks (or a test's corruption): gather the extent, send its runs of data
        if len(views) == 1:
            mv = views[0]
        else:
            mv = memoryview(self._buf)[:nbytes]
            o = 0
            for v in views:
                mv[o : o + len(v)] = v
                o += len(v)
        if not whole:
            hashes = block_hashes(mv, bs)
        self._send_runs(name, mv, hashes, kind_data, kind_zero, first, count, skip_zero, 0)

    def _send_mapped(self, name, mv, kind_data, kind_zero, first, count, skip_zero) -> None:
        """Send an extent from the image's mapping: hashed there, sent (plain) or sealed
        (encrypted into the record slots) from there. Flagged FLAG_LIVE while the guest
        runs: a guest write between the hash and the send tears the block, and the target
        then waits for it to come again (it is dirty again: the resend rule)."""
        bs = len(mv) // count
        nbytes = len(mv)
        self._reads[name]["mmap_bytes"] += nbytes
        hashes = block_hashes(mv, bs)
        flags = framing.FLAG_LIVE if self.state != PAUSED else 0
        if self.after_hash is not None:
            self.after_hash(name, first, count)
        if zero_hash(bs) not in hashes and self.corrupt_data_frame is None:
            self._data_frames += 1
            self._bucket.consume(nbytes)
            self._check()
            if self.state == PAUSED and flags:  # force-complete paused the guest in _check: a frame hashed
                hashes = block_hashes(mv, bs)  # before the pause is hashed again (paused frames are strict)
                flags = 0
            self._send_data(framing.data_header(kind_data, first, hashes, nbytes, flags), hashes, nbytes, mv)
            self._sent_whole(name, first, hashes, nbytes)
            return
        self._send_runs(name, mv, hashes, kind_data, kind_zero, first, count, skip_zero, flags)

    def _sent_whole(self, name: str, first: int, hashes: bytes, nbytes: int) -> None:
        """Account for a whole extent sent as one data frame."""
        self._hashes[name].set_run(first, hashes)
        prog = self._progress[name]
        prog.sent += nbytes
        self._round_bytes += nbytes
        prog.queued = max(0, prog.queued - nbytes)

    def _send_runs(self, name, mv, hashes, kind_data, kind_zero, first, count, skip_zero, flags) -> None:
        """Send an extent that holds all-zero blocks (or a test's corruption): ZERO frames
        for the zero runs, a data frame per run of data blocks."""
        bs = len(mv) // count
        zh = zero_hash(bs)
        if zh in hashes:  # some all-zero blocks: split into runs of zero / data blocks
            zero = [hashes[k * HASH_SIZE : (k + 1) * HASH_SIZE] == zh for k in range(count)]
            runs, i = [], 0
            while i < count:
                j = i + 1
                while j < count and zero[j] == zero[i]:
                    j += 1
                runs.append((i, j, zero[i]))
                i = j
        else:
            runs = [(0, count, False)]
        table = self._hashes[name]
        prog = self._progress[name]
        for i, j, zero in runs:
            if zero:
                table.set_zero(first + i, j - i)
                if not skip_zero:
                    self._send(framing.zero_frame(kind_zero, first + i, j - i))
            else:
                hl = hashes[i * HASH_SIZE : j * HASH_SIZE] if (i, j) != (0, count) else hashes
                data = mv[i * bs : j * bs]
                self._data_frames += 1
                length = (j - i) * bs
                self._bucket.consume(length)
                self._check()
                f = flags
                if f and self.state == PAUSED:  # force-complete paused the guest in _check: hashed
                    hl, f = block_hashes(data, bs), 0  # again, still, so the frame is strict
                if self.corrupt_data_frame is not None and self._data_frames >= self.corrupt_data_frame:
                    self.corrupt_data_frame = None
                    bad = bytearray(data)
                    bad[len(bad) // 2] ^= 0x5A
                    data, f = bad, 0
                # header, hash list and the data straight from the read buffer (or the
                # mapping): one sendmsg
                self._send_parts([framing.data_header(kind_data, first + i, hl, length, f), hl, data])
                table.set_run(first + i, hl)
                prog.sent += length
                self._round_bytes += length
            prog.queued = max(0, prog.queued - (j - i) * bs)

    # --- I/O -------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        self._send_parts([data])

    def _send_parts(self, parts: list) -> None:
        self._channel_send(lambda chan: chan.send_parts(parts))

    def _send_data(self, head: bytes, hashes: bytes, nbytes: int, src=None) -> None:
        if src is None:
            self._channel_send(lambda chan: chan.send_data(head, hashes, nbytes))
        else:
            self._channel_send(lambda chan: chan.send_data(head, hashes, nbytes, src))

    def _channel_send(self, send) -> None:
        chan = self._chan
        if self._sock is None or chan is None:
            raise Cancelled()
        try:
            send(chan)
        except OSError as e:
            if self._cancel.is_set():
                raise Cancelled() from None
            # the reader may be about to deliver the target's reason
            self._verdict_event.wait(2.0)
            if self._remote_error:
                raise MigrationFailed(self._remote_error) from None
            raise MigrationFailed(f"connection to target lost: {failure_reason(e)}") from None

    def _reader(self) -> None:
        sock, chan = self._sock, self._chan
        try:
            while sock is not None and not self._done.is_set():
                kind, _index, check, payload = read_frame(chan, should_stop=self._done.is_set)
                body = framing.parse_control(payload, check) if kind in framing.CONTROL_KINDS else {}
                if kind is Kind.VERDICT:
                    self._verdict = body
                    self._verdict_event.set()
                elif kind is Kind.ERROR:
                    self._remote_error = f"target: {body.get('error', 'failed')}"
                    self._verdict_event.set()
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    return
        except Exception as e:  # noqa: BLE001
            if not self._done.is_set() and not self._cancel.is_set() and self._verdict is None:
                self._remote_error = self._remote_error or f"connection to target lost: {failure_reason(e)}"
                self._verdict_event.set()

    # --- throttle --------------------------------------------------------------

    def _set_throttle(self, disk_pct: int, mem_pct: int) -> None:
        now = time.monotonic()
        self.disk_throttle, self.memory_throttle = disk_pct, mem_pct
        top = max(disk_pct, mem_pct)
        self.max_throttle = max(self.max_throttle, top)
        if top > 0 and self._throttle_since is None:
            self._throttle_since = now
        self.guest.set_throttle(disk_pct, mem_pct)

    def _lift_throttle(self) -> None:
        if self._throttle_since is not None:
            self.throttled_ms += (time.monotonic() - self._throttle_since) * 1000.0
            self._throttle_since = None
        if self.disk_throttle or self.memory_throttle:
            self.disk_throttle = self.memory_throttle = 0
            self.guest.set_throttle(0, 0)

    def _expected_if_paused_now(self) -> float:
        remaining = sum(self._progress[n].queued + d.dirty.count() * d.block_size
                        for n, d in (("disk", self.disk), ("memory", self.memory)))
        bw = self.bandwidth_bps
        if bw <= 0:  # nothing measured yet (round 1): the current round's rate, else the limit
            elapsed = time.monotonic() - self._round_started
            bw = self._round_bytes / elapsed if elapsed > 0.05 and self._round_bytes else float(self.bandwidth_limit)
        return expected_downtime_ms(remaining, bw, self.policy.verify_overhead_ms)

    # --- stats -----------------------------------------------------------------

    def stats(self) -> dict:
        """MigrationStats fields as plain data."""
        out = {}
        remaining_total = 0
        for name, dev in (("disk", self.disk), ("memory", self.memory)):
            p = self._progress[name]
            remaining = 0 if self.state in TERMINAL else p.queued + dev.dirty.count() * dev.block_size
            remaining_total += remaining
            out[name] = {"total": p.total, "sent": p.sent, "remaining": remaining}
        bw = self.bandwidth_bps
        if bw <= 0 and self.state not in TERMINAL:
            elapsed = time.monotonic() - self._round_started
            if elapsed > 0.05:
                bw = self._round_bytes / elapsed
        throttled = self.throttled_ms
        if self._throttle_since is not None:
            throttled += (time.monotonic() - self._throttle_since) * 1000.0
        expected = self.expected_downtime_ms
        if self.state in TERMINAL:
            eta = 0.0 if self.state == COMPLETED else None
        else:
            eta = remaining_total / bw if bw > 0 else None
            if bw > 0:  # if it paused now
                expected = expected_downtime_ms(remaining_total, bw, self.policy.verify_overhead_ms)
        return {
            "migration_id": self.migration_id,
            "role": "source",
            "state": self.state,
            "round": self.round,
            "disk": out["disk"],
            "memory": out["memory"],
            "dirty_rate_bps": int(self.dirty_rate_bps),
            "bandwidth_bps": int(bw),
            "throttle_percent": max(self.disk_throttle, self.memory_throttle),
            "disk_throttle_percent": self.disk_throttle,
            "memory_throttle_percent": self.memory_throttle,
            "max_throttle_percent": self.max_throttle,
            "throttled_ms": int(round(throttled)),
            "expected_downtime_ms": int(round(min(expected, 1e12))),
            "eta_seconds": eta,
            "rounds": list(self.rounds),
            "downtime_ms": self.downtime_ms,
            "downtime_budget_ms": self.policy.downtime_budget_ms,
            "max_downtime_ms": self.policy.ceiling_ms,
            "allowed_downtime_ms": int(round(self.allowed_downtime_ms)),
            "downtime_steps": self.downtime_steps,
            "predicted_downtime_ms": self.predicted_downtime_ms,
            "forced": self.forced,
            "digest": self.digest if self.state == COMPLETED else None,
            "error": self.error,
            "offline": self.offline,
            "channel": self._chan.name if self._chan is not None else None,
            "reads": {n: dict(r) for n, r in self._reads.items()},
            "elapsed_ms": int(((self.finished_at or time.monotonic()) - self.started_at) * 1000),
        }
