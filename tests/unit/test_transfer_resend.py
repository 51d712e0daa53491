"""The source reads through a mapping of the image, and the resend rule.

The source hashes an extent in its mapping of the image and sends (plain) or seals
(encrypted) it from there, so a guest write between the hash and the send tears a block:
its data on the wire does not match its hash. Such a frame is flagged FLAG_LIVE; the target
never writes the torn block and holds it as owed until it comes again (the write marked it
dirty, so a later round sends it). A torn block never sent again, or a mismatch in a paused
round, fails the attempt. These tests tear blocks with real writes between hash and send
(``SourceEngine.after_hash``).
"""

import os

import pytest

from ferry.drivers.sim.image import DISK_BLOCK_SIZE as BS
from ferry.drivers.sim.image import MEMORY_PAGE_SIZE as PS
from ferry.drivers.sim.image import Image
from ferry.transfer import session, source
from ferry.transfer.channel import AES_256_GCM, PLAIN
from ferry.transfer.digest import combine, image_root
from test_transfer_precopy import contents, distinct_blocks_pair, run

CHANNELS = [PLAIN, AES_256_GCM]


@pytest.fixture
def pair(tmp_path):
    src = (Image(str(tmp_path / "sd"), 32 * BS, BS), Image(str(tmp_path / "sm"), 64 * PS, PS))
    dst = (Image(str(tmp_path / "td"), 32 * BS, BS, fresh=True), Image(str(tmp_path / "tm"), 64 * PS, PS, fresh=True))
    yield src, dst
    for img in src + dst:
        img.close()


def fill(src, blocks=32):
    for b in range(blocks):
        src[0].write(b * BS, bytes([b + 1]) * BS)


def tear_once(img, block, *, mark=True, when=lambda: True):
    """An after_hash hook: the first time it sees ``block`` sent (and ``when()``), the guest
    rewrites it: through the image (data then dirty bit, as every guest write) or, with
    ``mark=False``, a write the bitmap never sees (what the rule must not excuse)."""
    state = {"done": False}

    def hook(name, first, count):
        if name == "disk" and not state["done"] and first <= block < first + count and when():
            state["done"] = True
            data = b"T" * BS
            if mark:
                img.write(block * BS, data)
            else:
                os.pwrite(img.fd, data, block * BS)

    return hook, state


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_torn_block_that_is_sent_again_passes(pair, channel):
    src, dst = pair
    fill(src)
    hook, state = tear_once(src[0], 5)
    eng, tgt, _ = run(src, dst, after_hash=hook, channel=channel, allow_plain=True)
    assert state["done"]
    assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED, (eng.error, tgt.error)
    st = tgt.stats()
    assert st["torn_blocks"] == {"disk": 1, "memory": 0}  # excused once, then paid by the resend
    assert contents(dst[0]) == contents(src[0]) and contents(dst[0])[5 * BS : 6 * BS] == b"T" * BS
    expected = combine(image_root(src[0].fd, src[0].size, BS), image_root(src[1].fd, src[1].size, src[1].block_size))
    assert eng.digest == tgt.digest == expected
    reads = eng.stats()["reads"]
    assert reads["disk"]["mode"] == "mmap" and reads["disk"]["preadv_bytes"] == 0
    assert reads["disk"]["mmap_bytes"] == 33 * BS  # 32 blocks, then the torn one again


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_torn_block_never_sent_again_fails_at_the_verdict_and_is_never_written(pair, channel):
    src, dst = pair
    fill(src)
    hook, state = tear_once(src[0], 7, mark=False)  # the bitmap never learns: no resend
    eng, tgt, _ = run(src, dst, after_hash=hook, channel=channel, allow_plain=True)
    assert state["done"]
    assert tgt.state == session.FAILED and tgt.stats()["digest"] is None
    assert tgt.error.startswith("checksum mismatch in disk frame at block 7 (round 1, read from the running guest")
    assert "never sent again" in tgt.error
    assert eng.state == session.FAILED and "never sent again" in eng.error and eng.digest is not None
    got, want = contents(dst[0]), contents(src[0])
    assert got[7 * BS : 8 * BS] == bytes(BS)  # the torn block never became the image
    assert got[: 7 * BS] == want[: 7 * BS] and got[8 * BS :] == want[8 * BS :]  # its frame's other blocks did


def test_a_mismatch_in_the_paused_final_round_fails_at_once(pair):
    src, dst = pair
    fill(src)
    later = {"round": 1}

    def before_round(n):  # dirty block 3 so that the next round (the paused final one) sends it
        later["round"] = n
        src[0].write(3 * BS, b"r" * BS)

    hook, state = tear_once(src[0], 3, mark=False, when=lambda: later["round"] >= 2)
    eng, tgt, _ = run(src, dst, after_hash=hook, before_round=before_round)
    assert state["done"] and eng.round == 2 and eng.rounds[-1]["paused"]
    assert tgt.state == session.FAILED
    assert tgt.error == ("checksum mismatch in disk frame at block 3 (round 2, in a paused round: "
                         "no guest write can explain it)")
    assert eng.state == session.FAILED and eng.error.startswith("target: checksum mismatch")
    # round 1's copy (or nothing: a failed attempt drops the writes still queued), never the torn one
    assert contents(dst[0])[3 * BS : 4 * BS] in (bytes(BS), bytes([4]) * BS)


def test_an_offline_copy_is_paused_throughout_so_any_mismatch_fails(pair):
    src, dst = pair
    fill(src)
    hook, state = tear_once(src[0], 9, mark=False)
    eng, tgt, _ = run(src, dst, after_hash=hook, offline=True)
    assert state["done"]
    assert tgt.state == session.FAILED and "block 9 (round 1, in a paused round" in tgt.error
    assert eng.state == session.FAILED
    assert contents(dst[0])[9 * BS : 10 * BS] == bytes(BS)


def test_a_corrupt_copy_is_not_excused_as_a_tear(pair):
    # the corruption hook models a bad copy (no FLAG_LIVE): the target fails at once even
    # though the guest is running and the block could be sent again
    src, dst = pair
    tgt, eng = distinct_blocks_pair(src, dst)
    eng.corrupt_data_frame = 1
    eng.run()
    tgt.join(10)
    assert tgt.state == session.FAILED and tgt.stats()["torn_blocks"] == {"disk": 0, "memory": 0}
    assert "checksum mismatch in disk frame at block 8 (round 1, not sent as read from a running guest)" == tgt.error


@pytest.mark.parametrize("why", ["off", "short"])
def test_preadv_where_the_mapping_cannot_be_used_and_stats_say_so(pair, monkeypatch, why):
    src, dst = pair
    fill(src)
    if why == "off":
        monkeypatch.setattr(source, "MMAP_READS", False)
    else:  # the file is shorter than the image: a mapping would SIGBUS past its end
        os.ftruncate(src[0].fd, 20 * BS)
    eng, tgt, _ = run(src, dst)
    assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED, eng.error
    assert contents(dst[0])[: 20 * BS] == contents(src[0])[: 20 * BS]
    r = eng.stats()["reads"]
    assert r["disk"]["mode"] == "preadv" and r["disk"]["mmap_bytes"] == 0 and r["disk"]["preadv_bytes"] > 0
    assert r["disk"]["fallback"] == ("mmap reads off" if why == "off"
                                     else f"file shorter than the image ({20 * BS} < {32 * BS} bytes)")
    assert r["memory"]["mode"] == ("preadv" if why == "off" else "mmap")


def test_a_force_complete_between_hash_and_send_hashes_again_and_sends_strictly(pair):
    # force-complete pauses the guest in the check just before the send: the extent was hashed
    # while the guest ran (and a write tore it), so it is hashed again, paused, and goes
    # without FLAG_LIVE: it matches, nothing is owed, and the migration completes
    src, dst = pair
    tgt, eng = distinct_blocks_pair(src, dst)
    seen = []

    def hook(name, first, count):
        if name == "disk" and not seen:
            seen.append(first)
            src[0].write((first + 2) * BS, b"F" * BS)
            eng.force_complete()

    eng.after_hash = hook
    eng.run()
    tgt.join(10)
    assert seen and eng.forced
    assert eng.state == session.COMPLETED and tgt.state == session.RECEIVED, (eng.error, tgt.error)
    assert tgt.stats()["torn_blocks"] == {"disk": 0, "memory": 0}
    assert contents(dst[0]) == contents(src[0]) and contents(dst[0])[(seen[0] + 2) * BS :][:BS] == b"F" * BS
    assert eng.digest == tgt.digest
