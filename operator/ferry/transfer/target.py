"""The receiving end of a migration's pre-copy: runs in the target VM process.

It accepts one authenticated connection (encrypted, or plain where ``allow_plain``), checks
every block against its hash as it arrives and only then queues it to its image writer
(``ferry.transfer.writer``: one thread, frame order, O_DIRECT where the file system takes
it); on DONE it waits for every write, compares the source's digests with those of what it
holds and answers VERDICT. It never runs what it received until its VM is told ``cont``.

The resend rule (``ferry.transfer.framing``): a block that does not match its hash in a
``FLAG_LIVE`` frame of a round that is not paused was torn by a guest write on the source
(it hashed and sent from a mapping of the live image). The block is not written (its hash
in the table stays that of what the image holds), and it is owed: a later matching data
frame or ZERO frame for it pays the debt. A block still owed at DONE fails the attempt
(VERDICT not ok, the reason naming the block), as does any mismatch elsewhere, at once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import zlib
from collections.abc import Callable
from typing import Protocol

from ferry.transfer import auth, framing, session
from ferry.transfer.channel import TAG_SIZE
from ferry.transfer.digest import HASH_NAME, BlockHashes, combine, mismatches
from ferry.transfer.framing import HASH_SIZE, Kind
from ferry.transfer.session import (
    ABORTED,
    COPYING,
    FAILED,
    MAX_EXTENT_BYTES,
    NONE,
    RECEIVED,
    TERMINAL,
    Cancelled,
    MigrationFailed,
    failure_reason,
)
from ferry.transfer.writer import ImageWriter

log = logging.getLogger(__name__)

# The receiver takes a frame in RECV_CHUNK_BYTES pieces (receive, check) so the bytes are
# still in the CPU cache when hashed: with whole 1 MiB pieces (received, checked and written
# through the page cache) the receiver needed ~2.5x the CPU (tests/perf/bench_dataplane.py).
# The checked pieces of a frame are then written together (ferry.transfer.writer).
RECV_CHUNK_BYTES = 256 << 10

# Data frames are written with O_DIRECT where the image's file system takes it (a buffered
# fallback is automatic and named in stats()["writes"]); False writes through the page cache.
DIRECT_WRITES = True


class TargetDevice(Protocol):
    """What the receiver needs of an image: its file and geometry."""

    fd: int
    size: int
    block_size: int
    nblocks: int


class TargetEngine:
    """Receives one VM's images; verifies every block and the final digests."""

    def __init__(
        self,
        *,
        disk: TargetDevice,
        memory: TargetDevice,
        secret: bytes,
        migration_id: str,
        io_timeout: float = 120.0,
        on_finish: Callable[["TargetEngine"], None] | None = None,
        allow_plain: bool = False,
        direct_writes: bool | None = None,
    ):
        self.disk, self.memory = disk, memory
        self.secret = bytes(secret)
        self.migration_id = migration_id
        self.io_timeout = io_timeout
        self.on_finish = on_finish
        self.allow_plain = allow_plain  # take a plain channel if the source asks for one (else encrypted only)
        self.direct_writes = DIRECT_WRITES if direct_writes is None else direct_writes
        self._writer: ImageWriter | None = None
        self._write_stats: dict | None = None  # the writer's stats once it is closed
        self._chan = None
        self.state = NONE
        self.error: str | None = None
        self.round = 0
        self.digest: str | None = None
        self.guest_state: dict | None = None
        self.auth_failures = 0
        self.downtime_ms: int | None = None
        self.offline = False
        self._received = {"disk": 0, "memory": 0}
        self._hashes = {"disk": BlockHashes(disk.size, disk.block_size), "memory": BlockHashes(memory.size, memory.block_size)}
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hl_buf = bytearray(HASH_SIZE * 256)
        self._round_paused = False  # the source said this round runs with its guest paused
        # the resend rule: blocks torn in a live frame and not sent again yet -> the round they tore in
        self._owed: dict[str, dict[int, int]] = {"disk": {}, "memory": {}}
        self.torn_blocks = {"disk": 0, "memory": 0}  # mismatches excused as tears (all of them resent, or the attempt failed)
        self.address: tuple[str, int] | None = None
        self.started_at = time.monotonic()

    def listen(self, host: str, port: int = 0) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        ls = socket.socket(family, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, port))
        ls.listen(8)
        self._listener = ls
        self.address = ls.getsockname()[:2]
        self.state = NONE
        return self.address

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"incoming-{self.migration_id}", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self) -> None:
        self._stop.set()
        for s in (self._listener, self._conn):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    s.close()
                except OSError:
                    pass

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop waiting/receiving; the attempt fails with ``reason`` unless it ended."""
        if self.state in TERMINAL:
            return
        self.stop()
        self.join(5)
        self._finish(FAILED, reason)

    def run(self) -> None:
        assert self._listener is not None, "listen() first"
        try:
            conn = self._accept_authenticated()
        except Exception as e:  # noqa: BLE001
            if not self._stop.is_set():
                self._finish(FAILED, f"listener failed: {failure_reason(e)}")
            elif self.state not in TERMINAL:
                self._finish(FAILED, "stopped")
            return
        self._conn = conn
        try:
            self._writer = self._open_writer()
            self._serve(self._chan)
        except Exception as e:  # noqa: BLE001
            reason = "stopped" if self._stop.is_set() else failure_reason(e)
            log.warning("incoming migration %s failed: %s", self.migration_id, reason)
            self._close_writer(discard=True)
            self._finish(FAILED, reason)
            self._send_error_and_drain(conn, self._chan, reason)
        finally:
            self._close_writer(discard=True)  # a no-op after the verdict (drained and closed)
            try:
                conn.close()
            except OSError:
                pass

    def _open_writer(self) -> ImageWriter:
        # a buffer holds a whole frame as a ferry source cuts them (or at least one receive
        # chunk), the last record's tag after it
        chunk = max(max(1, RECV_CHUNK_BYTES // dev.block_size) * dev.block_size for dev in (self.disk, self.memory))
        w = ImageWriter(max(MAX_EXTENT_BYTES, chunk) + TAG_SIZE, direct=self.direct_writes,
                        name=f"writer-{self.migration_id}")
        w.add_image("disk", self.disk.fd)
        w.add_image("memory", self.memory.fd)
        return w

    def _close_writer(self, *, discard: bool) -> None:
        w = self._writer
        if w is None:
            return
        w.close(discard=discard)
        self._write_stats = w.stats()
        self._writer = None
        log.info("migration %s: image writes %s", self.migration_id, self._write_stats)

    def _accept_authenticated(self) -> socket.socket:
        ls = self._listener
        while not self._stop.is_set():
            conn, peer = ls.accept()
            try:
                hs = auth.server_handshake(conn, self.secret, self.migration_id, allow_plain=self.allow_plain)
            except (auth.AuthError, OSError) as e:
                self.auth_failures += 1
                log.warning("refused data connection from %s for migration %s: %s", peer, self.migration_id, e)
                try:
                    conn.close()
                except OSError:
                    pass
                continue
            self._chan = hs.open(conn, self.secret, self.migration_id, "target")
            log.info("authenticated data connection from %s for migration %s (channel %s)", peer, self.migration_id,
                     self._chan.name)
            try:
                ls.close()
            except OSError:
                pass
            self._listener = None
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            except OSError:
                pass
            if session.BLOCKING_IO:
                framing.set_kernel_timeouts(conn, self.io_timeout)
            else:
                conn.settimeout(self.io_timeout)
            return conn
        raise Cancelled()

    def _send_error_and_drain(self, conn: socket.socket, chan, reason: str) -> None:
        try:
            conn.settimeout(2.0)
            chan.send_parts([framing.control_frame(Kind.ERROR, {"error": reason})])
            conn.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and conn.recv(1 << 16):
                pass
        except OSError:
            pass

    def _finish(self, state: str, error: str | None = None) -> None:
        if self.state in TERMINAL:
            return
        self.error = error
        self.state = state
        if self.on_finish is not None:
            try:
                self.on_finish(self)
            except Exception:  # noqa: BLE001
                log.exception("on_finish hook failed")

    def _serve(self, chan) -> None:
        self.state = COPYING
        writer = self._writer
        stop = self._stop.is_set
        devs = {Kind.DISK: ("disk", self.disk), Kind.MEMORY: ("memory", self.memory),
                Kind.ZERO_DISK: ("disk", self.disk), Kind.ZERO_MEMORY: ("memory", self.memory)}
        head = bytearray(framing.HEADER_SIZE)
        headv = memoryview(head)
        got_info = False
        while True:
            chan.recv_into(headv, stop)
            kind, flags, length, index, check = framing.decode_header(headv)
            if not got_info and kind is not Kind.INFO:
                raise framing.FrameError(f"expected INFO, got {kind.name}")
            if kind in framing.DATA_KINDS:
                name, dev = devs[kind]
                bs = dev.block_size
                count = framing.data_count(length, bs)
                if index + count > dev.nblocks:
                    raise framing.FrameError(f"{name} frame out of range: blocks {index}+{count} > {dev.nblocks}")
                hl_len = count * HASH_SIZE
                if len(self._hl_buf) < hl_len:
                    self._hl_buf = bytearray(hl_len)
                hlv = memoryview(self._hl_buf)[:hl_len]
                chan.recv_into(hlv, stop)
                if zlib.crc32(hlv) != check:
                    raise framing.ChecksumError(f"checksum mismatch in {name} frame at block {index}")
                hl = bytes(hlv)
                # receive and verify in chunks that stay in the CPU cache, one after the other
                # into one of the writer's page-aligned buffers (a sealed record is decrypted
                # where it was received); the buffer (the frame, or as much of it as fits) is
                # queued for writing only once every block in it matched its hash, and written
                # while the next frame is received
                live = bool(flags & framing.FLAG_LIVE) and not self._round_paused
                owed = self._owed[name]
                torn: list[int] = []  # blocks of this frame (from 0) torn by a guest write on the source
                per = max(1, RECV_CHUNK_BYTES // bs)
                per_buf = max(per, (writer.buffer_bytes - TAG_SIZE) // bs // per * per)
                for b0 in range(0, count, per_buf):
                    m = min(per_buf, count - b0)
                    buf = writer.acquire()
                    t0 = len(torn)
                    try:
                        for c0 in range(b0, b0 + m, per):
                            n = min(per, b0 + m - c0)
                            data = chan.recv_data(n * bs, stop, memoryview(buf)[(c0 - b0) * bs :])
                            bad = mismatches(data, bs, hl[c0 * HASH_SIZE : (c0 + n) * HASH_SIZE])
                            if bad:
                                if not live:
                                    raise framing.ChecksumError(self._mismatch_reason(name, index + c0 + bad[0], flags))
                                torn.extend(c0 + k for k in bad)
                    except BaseException:
                        writer.release(buf)  # never written
                        raise
                    if len(torn) == t0:
                        writer.write(name, buf, m * bs, (index + b0) * bs)
                    else:  # only the runs of blocks that matched: a torn block is never written
                        runs, k = [], b0
                        for t in torn[t0:] + [b0 + m]:
                            if t > k:
                                runs.append(((k - b0) * bs, (t - k) * bs, (index + k) * bs))
                            k = t + 1
                        writer.write_runs(name, buf, runs)
                self._paid(name, index, count)  # every block of the frame arrived again (torn ones owed anew below)
                if torn:
                    table = self._hashes[name]
                    k = 0
                    for t in torn + [count]:
                        if t > k:
                            table.set_run(index + k, hl[k * HASH_SIZE : t * HASH_SIZE])
                        k = t + 1
                    for t in torn:
                        owed[index + t] = self.round
                    self.torn_blocks[name] += len(torn)
                    log.info("migration %s: %d %s block(s) torn by a guest write in round %d (first %d): owed until sent again",
                             self.migration_id, len(torn), name, self.round, index + torn[0])
                else:
                    self._hashes[name].set_run(index, hl)
                self._received[name] += count * bs
                continue
            payload = chan.recv_exact(length, stop)
            if kind in framing.ZERO_KINDS:
                name, dev = devs[kind]
                count = framing.parse_zero(payload, check)
                if index + count > dev.nblocks:
                    raise framing.FrameError(f"{name} zero frame out of range")
                writer.zero(name, index * dev.block_size, count * dev.block_size)  # after the writes queued before
                self._hashes[name].set_zero(index, count)
                self._paid(name, index, count)
                continue
            body = framing.parse_control(payload, check)
            if kind is Kind.INFO:
                self._check_info(body)
                got_info = True
            elif kind is Kind.ROUND:
                self.round = index
                self._round_paused = bool(body.get("paused"))
            elif kind is Kind.DONE:
                self._verify(chan, body)
                return
            elif kind is Kind.ABORT:
                self._finish(ABORTED, f"source aborted: {body.get('reason', '')}".rstrip(": "))
                return
            else:
                raise framing.FrameError(f"unexpected {kind.name} frame")

    def _check_info(self, body: dict) -> None:
        if body.get("migration_id") != self.migration_id:
            raise framing.FrameError("INFO for another migration")
        self.offline = bool(body.get("offline"))
        if body.get("hash") != HASH_NAME:
            raise MigrationFailed(f"block hash mismatch: source uses {body.get('hash')}, target {HASH_NAME}")
        for name, dev in (("disk", self.disk), ("memory", self.memory)):
            geo = body.get(name) or {}
            if geo.get("size") != dev.size or geo.get("block_size") != dev.block_size:
                raise MigrationFailed(
                    f"{name} geometry mismatch: source {geo.get('size')}/{geo.get('block_size')}, "
                    f"target {dev.size}/{dev.block_size}"
                )

    def _mismatch_reason(self, name: str, block: int, flags: int) -> str:
        why = ("in a paused round: no guest write can explain it" if self._round_paused
               else "not sent as read from a running guest" if not flags & framing.FLAG_LIVE else "")
        return f"checksum mismatch in {name} frame at block {block}" + (f" (round {self.round}, {why})" if why else "")

    def _paid(self, name: str, first: int, count: int) -> None:
        """Blocks ``first``..``first + count`` arrived again (matching, or as zeros): no longer owed."""
        owed = self._owed[name]
        if owed:
            for b in range(first, first + count):
                owed.pop(b, None)

    def _unpaid(self) -> str | None:
        """Why the attempt fails if a torn block was never sent again (None: none owed)."""
        for name in ("disk", "memory"):
            owed = self._owed[name]
            if owed:
                block = min(owed)
                more = f"; {len(owed) - 1} more owed" if len(owed) > 1 else ""
                return (f"checksum mismatch in {name} frame at block {block} (round {owed[block]}, read from the "
                        f"running guest: taken as torn by a guest write) and the block was never sent again{more}")
        return None

    def _verify(self, chan, body: dict) -> None:
        # the verdict only once every queued write is done (a failed one fails the attempt)
        self._writer.drain()
        self._close_writer(discard=False)
        disk_root, mem_root = self._hashes["disk"].root(), self._hashes["memory"].root()
        self.digest = combine(disk_root, mem_root)
        unpaid = self._unpaid()
        ok = (unpaid is None and body.get("digest") == self.digest and body.get("disk_root") == disk_root.hex()
              and body.get("memory_root") == mem_root.hex())
        verdict = {"ok": ok, "digest": self.digest, "disk_root": disk_root.hex(), "memory_root": mem_root.hex()}
        if not ok:
            verdict["error"] = unpaid or "target holds different data"
        if ok:
            self.guest_state = body.get("guest") or {}
            self._finish(RECEIVED)
        elif unpaid:
            self._finish(FAILED, unpaid)
        else:
            self._finish(FAILED, f"digest mismatch: source {body.get('digest')}, target {self.digest}")
        chan.send_parts([framing.control_frame(Kind.VERDICT, verdict)])

    def stats(self) -> dict:
        out = {}
        for name, dev in (("disk", self.disk), ("memory", self.memory)):
            out[name] = {"total": dev.size, "sent": self._received[name], "remaining": 0}
        elapsed = time.monotonic() - self.started_at
        recv = self._received["disk"] + self._received["memory"]
        return {
            "migration_id": self.migration_id,
            "role": "target",
            "state": self.state,
            "round": self.round,
            "disk": out["disk"],
            "memory": out["memory"],
            "dirty_rate_bps": 0,
            "bandwidth_bps": int(recv / elapsed) if elapsed > 0 else 0,
            "throttle_percent": 0,
            "max_throttle_percent": 0,
            "throttled_ms": 0,
            "expected_downtime_ms": 0,
            "eta_seconds": 0.0 if self.state == RECEIVED else None,
            "rounds": [],
            "downtime_ms": self.downtime_ms,
            "digest": self.digest if self.state == RECEIVED else None,
            "error": self.error,
            "offline": self.offline,
            "auth_failures": self.auth_failures,
            "channel": self._chan.name if self._chan is not None else None,
            "address": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "writes": self._writes(),
            "torn_blocks": dict(self.torn_blocks),
        }

    def _writes(self) -> dict | None:
        """How the images were written: per image, O_DIRECT or buffered bytes and why not direct."""
        w = self._writer
        return self._write_stats if w is None else w.stats()
