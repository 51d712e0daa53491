"""Which ideas make ferry's data plane close on sendfile: one variant of the engines per idea.

    .venv/bin/python tests/perf/bench_dataplane_ideas.py                 # 1 GiB, 5 runs of each
    .venv/bin/python tests/perf/bench_dataplane_ideas.py --quick         # tiny sizes (smoke test)

The engines run as they ship (``ferry.transfer.source``/``target``, no VM processes: the
data plane alone), each end in its own forked process, the source image in the page cache,
the target writing fresh image files. Every run measures, interleaved: the sendfile
baseline of ``bench_dataplane.py`` and then every variant, so each ratio (sendfile time /
variant time) comes from one run. A variant changes one thing of the shipped engines in
its child process only (module attributes, as a patch would):

- ``shipped, plain`` / ``shipped, aes-256-gcm``: the engines as they are (the source reads
  through a mapping of the image, with the resend rule: ``ferry.transfer.source``).
- ``preadv reads (before)``: the source ``preadv``s every extent into the channel's
  buffers (plain) or record slots (sealed in place) instead (``source.MMAP_READS`` off).
- ``aes-256-gcm, sealed through copies (before)``: the sealed channel before it sealed
  in place: a plaintext and a ciphertext buffer on each end, a copy between them (with
  ``preadv`` reads, as then).
- ``aes-256-gcm, one sendmsg per frame``: the source seals a whole frame before it sends
  it, instead of sending every two records (512 KiB).
- ``socket buffers autotuned``: neither end sets SO_SNDBUF/SO_RCVBUF (which fixes them
  at 4 MiB and turns autotuning off): the kernel sizes them, as for the baseline.
- ``target writes through the page cache``: the target's image writer (a thread that
  writes while the receiver takes the next chunk, ``ferry.transfer.writer``) writes
  buffered instead of with O_DIRECT as shipped (``target.DIRECT_WRITES`` off); the
  baseline's receiver writes through the page cache. (The O_DIRECT variants measured in
  issue 16's second round are what ships now.)
- ``frames 4 MiB``: data frames of up to 4 MiB instead of 1 MiB (larger frames).
- ``frames 256 KiB``: data frames of up to 256 KiB: the source's hash pass and its send or
  seal pass over a frame then meet in the CPU's cache (with the mapping, each is a read).
- ``target chunk 1 MiB``: the target receives, checks and writes 1 MiB at a time, not 256 KiB.
- ``Python socket timeouts``: both sockets in Python's timeout mode (a poll before every
  send and recv) instead of blocking sockets with SO_RCVTIMEO/SO_SNDTIMEO and MSG_WAITALL.
- ``pread into new buffers``: the source reads each extent into a new bytes object
  instead of ``preadv`` into one reused buffer (both instead of the mapping).
- ``MSG_ZEROCOPY``: the source sends with MSG_ZEROCOPY (and waits for each completion
  before it reuses its buffer).
- ``sendfile + mmap hash``: hashing off the send path's copies: the source hashes the
  extent through an mmap of the image and sends it with ``os.sendfile``; plain channel
  only, and only correct for a guest that does not write meanwhile (the idle guest here):
  an upper bound of what the idea can buy.

The hash itself (xxh3-128) and AES-256-GCM are timed alone over the same bytes.
Every figure is measured in this run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import mmap
import os
import pathlib
import select
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench_dataplane as bd  # noqa: E402  (the baseline, fill() and table())

from ferry.drivers.sim.image import DISK_BLOCK_SIZE, MEMORY_PAGE_SIZE, Image  # noqa: E402
from ferry.transfer import framing, session, source, target  # noqa: E402
from ferry.transfer.digest import block_hashes, zero_hash  # noqa: E402
from ferry.transfer.session import COMPLETED, RECEIVED  # noqa: E402

MiB = 1 << 20
SO_ZEROCOPY = getattr(socket, "SO_ZEROCOPY", 60)
MSG_ZEROCOPY = getattr(socket, "MSG_ZEROCOPY", 0x4000000)


class IdleGuest:
    def pause(self) -> bool:
        return True

    def resume(self) -> None:
        pass

    def set_throttle(self, disk_percent: int, memory_percent: int) -> None:
        pass

    def export_state(self) -> dict:
        return {"seq": 0}


# --- the variants (each applied in a child process only) ---------------------------------


def seal_whole_frames(role: str) -> None:
    from ferry.transfer.channel import SealedChannel

    SealedChannel.FLUSH_BYTES = 64 << 20  # every frame sealed whole, then one sendmsg


def frames_4mib(role: str) -> None:
    source.MAX_EXTENT_BYTES = 4 << 20


def frames_256kib(role: str) -> None:
    """Data frames of up to 256 KiB: the source hashes a frame and then seals or sends it
    while the frame is still in the CPU's cache (from the mapping, a second read of memory)."""
    source.MAX_EXTENT_BYTES = 256 << 10


def frames_256kib_preadv(role: str) -> None:
    frames_256kib(role)
    preadv_reads(role)


def target_chunk_1mib(role: str) -> None:
    target.RECV_CHUNK_BYTES = 1 << 20


def python_timeouts(role: str) -> None:
    session.BLOCKING_IO = False


def preadv_reads(role: str) -> None:
    """The source reads with preadv into the channel's buffers, not through a mapping."""
    if role == "source":
        source.MMAP_READS = False


def pread_new_buffers(role: str) -> None:
    if role != "source":
        return
    source.MMAP_READS = False
    real = os.preadv

    def preadv(fd, buffers, offset):
        data = os.pread(fd, len(buffers[0]), offset)  # a new bytes object per extent
        buffers[0][: len(data)] = data
        return len(data)

    source.os = _Proxy(os, preadv=preadv)
    assert real is os.preadv


class _Proxy:
    def __init__(self, base, **override):
        self._base, self._override = base, override

    def __getattr__(self, name):
        return self._override.get(name) or getattr(self._base, name)


def _zerocopy_send_parts(sock: socket.socket, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        try:
            sent = sock.sendmsg(views, [], MSG_ZEROCOPY)
        except BlockingIOError:
            select.select([], [sock], [], 60)
            continue
        _zerocopy_wait(sock)  # the buffer is reused at once: wait until the kernel let go of it
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _zerocopy_wait(sock: socket.socket) -> None:
    state = _ZC.setdefault(sock.fileno(), [0, -1])
    issued = state[0]
    state[0] += 1
    while state[1] < issued:
        p = select.poll()
        p.register(sock, select.POLLERR)
        p.poll(60_000)
        try:
            _data, anc, _flags, _addr = sock.recvmsg(0, 1024, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            continue
        for _level, _type, cdata in anc:
            _errno, _origin, _type2, code, _pad, lo, hi = struct.unpack("=IBBBBII", cdata[:16])
            state[1] = max(state[1], hi)
            _ZC_COPIED[0] += code & 1


_ZC: dict[int, list[int]] = {}
_ZC_COPIED = [0]


def msg_zerocopy(role: str) -> None:
    if role != "source":
        return
    connect = source.SourceEngine._connect

    def _connect(self):
        sock = connect(self)
        sock.setsockopt(socket.SOL_SOCKET, SO_ZEROCOPY, 1)
        return sock

    source.SourceEngine._connect = _connect
    framing.send_parts = _zerocopy_send_parts


def sendfile_mmap_hash(role: str) -> None:
    if role != "source":
        return
    maps: dict[int, memoryview] = {}

    def _send_blocks(self, name, dev, kind_data, kind_zero, first, count, skip_zero):
        bs = dev.block_size
        if dev.fd not in maps:
            maps[dev.fd] = memoryview(mmap.mmap(dev.fd, dev.size, prot=mmap.PROT_READ))
        off, n = first * bs, count * bs
        view = maps[dev.fd][off : off + n]
        hashes = block_hashes(view, bs)
        if zero_hash(bs) in hashes:  # not in this benchmark's images (every block written)
            raise RuntimeError("zero blocks: not handled by this variant")
        self._send_parts([framing.data_header(kind_data, first, hashes, n), hashes])
        sock = self._sock
        done = 0
        while done < n:
            try:
                done += os.sendfile(sock.fileno(), dev.fd, off + done, n - done)
            except BlockingIOError:
                select.select([], [sock], [], 60)
        self._hashes[name].set_run(first, hashes)
        self._progress[name].sent += n
        self._round_bytes += n
        self._progress[name].queued = max(0, self._progress[name].queued - n)

    source.SourceEngine._send_blocks = _send_blocks


def sealed_through_copies(role: str) -> None:
    """The sealed channel as it was before it sealed in place: the source reads an extent
    into one buffer and encrypts it into another; the target receives a record into one
    buffer and decrypts it into another."""
    from ferry.transfer.channel import SealedChannel

    source.MMAP_READS = False  # the copies were with preadv reads

    def data_views(self, nbytes):
        if len(getattr(self, "_copy_in", b"")) < nbytes:
            self._copy_in = bytearray(nbytes)
        return [memoryview(self._copy_in)[:nbytes]]

    def send_data(self, head, hashes, nbytes):
        self.send_parts([head, hashes, memoryview(self._copy_in)[:nbytes]])

    def recv_data(self, n, should_stop=None, into=None):
        # opened out of place: from the ciphertext buffer into the target's (or a plaintext) buffer
        if into is not None:
            view = memoryview(into)[:n]
        else:
            if len(getattr(self, "_copy_out", b"")) < n:
                self._copy_out = bytearray(n)
            view = memoryview(self._copy_out)[:n]
        self.recv_into(view, should_stop)
        return view

    SealedChannel.data_views, SealedChannel.send_data, SealedChannel.recv_data = data_views, send_data, recv_data


def autotuned_buffers(role: str) -> None:
    """Neither end fixes its socket buffer (SO_SNDBUF/SO_RCVBUF 4 MiB, which also turns the
    kernel's autotuning off): the kernel sizes them, as it does for the sendfile baseline."""
    real = socket.socket.setsockopt

    class _Sock(socket.socket):
        def setsockopt(self, level, opt, value, *rest):
            if level == socket.SOL_SOCKET and opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                return None
            return real(self, level, opt, value, *rest)

    socket.socket.setsockopt = _Sock.setsockopt


def target_buffered(role: str) -> None:
    """The target's writer writes through the page cache (``DIRECT_WRITES`` off): what the
    shipped O_DIRECT writes save (the writer thread still overlaps the writes)."""
    if role == "target":
        target.DIRECT_WRITES = False


VARIANTS = [
    ("shipped, plain", "plain", None),
    ("shipped, aes-256-gcm", "aes-256-gcm", None),
    ("preadv reads (plain, before)", "plain", preadv_reads),
    ("aes-256-gcm, preadv reads (before)", "aes-256-gcm", preadv_reads),
    ("aes-256-gcm, sealed through copies (before)", "aes-256-gcm", sealed_through_copies),
    ("aes-256-gcm, one sendmsg per frame", "aes-256-gcm", seal_whole_frames),
    ("socket buffers autotuned (plain)", "plain", autotuned_buffers),
    ("aes-256-gcm, socket buffers autotuned", "aes-256-gcm", autotuned_buffers),
    ("target writes through the page cache (plain)", "plain", target_buffered),
    ("aes-256-gcm, target writes through the page cache", "aes-256-gcm", target_buffered),
    ("frames 4 MiB (plain)", "plain", frames_4mib),
    ("frames 256 KiB (plain)", "plain", frames_256kib),
    ("frames 256 KiB, aes-256-gcm", "aes-256-gcm", frames_256kib),
    ("frames 256 KiB, aes-256-gcm, with preadv", "aes-256-gcm", frames_256kib_preadv),
    ("target chunk 1 MiB (plain)", "plain", target_chunk_1mib),
    ("Python socket timeouts (plain)", "plain", python_timeouts),
    ("pread into new buffers (plain)", "plain", pread_new_buffers),
    ("MSG_ZEROCOPY (plain)", "plain", msg_zerocopy),
    ("sendfile + mmap hash (plain)", "plain", sendfile_mmap_hash),
]


# --- one migration, each end in a forked child ----------------------------------------------


def _child(fn) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = fn()
        except BaseException as e:  # noqa: BLE001
            print(f"child failed: {e!r}", file=sys.stderr)
        finally:
            os._exit(code)
    return pid


def migrate_once(workdir: str, src_paths: tuple[str, str], sizes: tuple[int, int], channel: str, patch) -> dict:
    port_r, port_w = os.pipe()
    time_r, time_w = os.pipe()
    mid = "idea"
    secret = b"s" * 32

    def run_target() -> int:
        if patch:
            patch("target")
        disk = Image(os.path.join(workdir, "t-disk"), sizes[0], DISK_BLOCK_SIZE, fresh=True)
        mem = Image(os.path.join(workdir, "t-mem"), sizes[1], MEMORY_PAGE_SIZE, fresh=True)
        eng = target.TargetEngine(disk=disk, memory=mem, secret=secret, migration_id=mid, allow_plain=True)
        _host, port = eng.listen("127.0.0.1")
        os.write(port_w, struct.pack("!H", port))
        eng.run()
        return 0 if eng.state == RECEIVED else 1

    def run_source() -> int:
        port = struct.unpack("!H", os.read(port_r, 2))[0]
        if patch:
            patch("source")
        disk = Image(src_paths[0], sizes[0], DISK_BLOCK_SIZE)
        mem = Image(src_paths[1], sizes[1], MEMORY_PAGE_SIZE)
        eng = source.SourceEngine(disk=disk, memory=mem, guest=IdleGuest(), target=f"127.0.0.1:{port}", secret=secret,
                                  migration_id=mid, channel=channel)
        t0 = time.perf_counter()
        eng.run()
        os.write(time_w, struct.pack("!d", time.perf_counter() - t0))
        if _ZC_COPIED[0]:
            print(f"MSG_ZEROCOPY: {_ZC_COPIED[0]} completions said the kernel copied the data anyway", file=sys.stderr)
        if eng.state != COMPLETED:
            print(f"source: {eng.error}", file=sys.stderr)
        return 0 if eng.state == COMPLETED else 1

    tpid = _child(run_target)
    spid = _child(run_source)
    _, s_status, s_ru = os.wait4(spid, 0)
    _, t_status, t_ru = os.wait4(tpid, 0)
    seconds = struct.unpack("!d", os.read(time_r, 8))[0] if s_status == 0 else None
    for fd in (port_r, port_w, time_r, time_w):
        os.close(fd)
    for f in ("t-disk", "t-mem"):
        try:
            os.unlink(os.path.join(workdir, f))
        except FileNotFoundError:
            pass
    if s_status or t_status:
        raise RuntimeError(f"migration failed (source {s_status}, target {t_status})")
    return {"s": seconds, "src_cpu": s_ru.ru_utime + s_ru.ru_stime, "dst_cpu": t_ru.ru_utime + t_ru.ru_stime,
            "user": s_ru.ru_utime + t_ru.ru_utime}


def time_alone(path: str) -> tuple[float, float]:
    """CPU s/GiB of xxh3-128 block hashes and of AES-256-GCM (seal + open) over the image."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    size = os.path.getsize(path)
    buf = bytearray(256 << 10)
    out = bytearray(len(buf) + 16)
    aead = AESGCM(os.urandom(32))
    fd = os.open(path, os.O_RDONLY)
    try:
        h = a = 0.0
        for off in range(0, size - len(buf) + 1, len(buf)):
            os.preadv(fd, [buf], off)
            c0 = time.process_time()
            block_hashes(buf, DISK_BLOCK_SIZE)
            c1 = time.process_time()
            nonce = off.to_bytes(12, "big")
            aead.encrypt_into(nonce, buf, b"", out)
            aead.decrypt_into(nonce, out, b"", buf)
            c2 = time.process_time()
            h, a = h + c1 - c0, a + c2 - c1
    finally:
        os.close(fd)
    gib = size / (1 << 30)
    return h / gib, a / gib


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, one run (smoke test)")
    p.add_argument("--disk-mib", type=int, default=1024)
    p.add_argument("--memory-mib", type=int, default=16)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.disk_mib, args.memory_mib, args.runs = 16, 1, 1
    variants = [v for v in VARIANTS if not args.only or any(s in v[0] for s in args.only.split(","))]
    root = tempfile.mkdtemp(prefix="ferry-ideas-", dir=args.workdir)
    t0 = time.monotonic()
    try:
        sizes = (args.disk_mib * MiB, args.memory_mib * MiB)
        paths = (os.path.join(root, "disk"), os.path.join(root, "mem"))
        bd.fill(paths[0], sizes[0], 1)
        bd.fill(paths[1], sizes[1], 2)
        gib = sum(sizes) / (1 << 30)
        res: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
        base: list[float] = []
        base_cpu: list[float] = []
        for _ in range(args.runs):
            b, b_cpu = bd.baseline_sendfile(list(paths), os.path.join(root, "baseline.out"))
            base.append(b)
            base_cpu.append(b_cpu / gib)
            for name, channel, patch in variants:
                r = migrate_once(root, paths, sizes, channel, patch)
                r["ratio"] = b / r["s"]
                res[name].append(r)
        rows = [["sendfile (baseline)", f"{sum(sizes) / MiB / statistics.median(base):.0f}", "1.00", "-",
                 f"{statistics.median(base_cpu):.2f}", "-", "-"]]
        for name, _, _ in variants:
            rs = res[name]
            ratios = [r["ratio"] for r in rs]
            cpu = [(r["src_cpu"] + r["dst_cpu"]) / gib for r in rs]
            rows.append([name, f"{sum(sizes) / MiB / statistics.median([r['s'] for r in rs]):.0f}",
                         f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}",
                         f"{statistics.median(cpu):.2f}",
                         f"{statistics.median([r['src_cpu'] / gib for r in rs]):.2f} + "
                         f"{statistics.median([r['dst_cpu'] / gib for r in rs]):.2f}",
                         f"{statistics.median([r['user'] / max(r['src_cpu'] + r['dst_cpu'], 1e-9) for r in rs]):.0%}"])
        bd.table(f"data plane ideas: {sum(sizes) / MiB:.0f} MiB over loopback, engines alone (no VM processes), "
                 f"{args.runs} interleaved runs; ratio = sendfile time / variant time in the same run (medians)",
                 ["variant", "MiB/s", "ratio", "ratio spread", "CPU s/GiB", "src + dst", "user share"], rows)
        h, a = time_alone(paths[0])
        print(f"alone, per GiB: xxh3-128 block hashes {h:.3f} CPU-s; AES-256-GCM seal + open {a:.3f} CPU-s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal benchmark time {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
