"""The agent's on-disk spool: ordered, bounded (oldest dropped and counted), durable across restarts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gpuwatch.producers import spool as spool_mod
from gpuwatch.producers.spool import Spool, SpoolError


def _value(i: int, size: int = 100) -> bytes:
    return f"{i:08d}".encode().ljust(size, b".")


def _drain(spool: Spool) -> list[tuple[int, bytes, bytes]]:
    out = []
    while (rec := spool.read_next()) is not None:
        out.append(rec)
    return out


def _segments(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.endswith(".seg"))


def test_records_come_back_in_order_and_ack_deletes_finished_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100_000, segment_bytes=1_000)
    ids = [spool.append(b"host-%d" % (i % 3), _value(i)) for i in range(50)]
    assert ids == list(range(50))
    assert spool.pending == 50 and spool.unread == 50
    assert len(_segments(tmp_path)) > 5  # ~8 records per 1 kB segment

    recs = _drain(spool)
    assert [r[0] for r in recs] == ids
    assert [r[1] for r in recs] == [b"host-%d" % (i % 3) for i in range(50)]
    assert [r[2] for r in recs] == [_value(i) for i in range(50)]
    assert spool.unread == 0 and spool.pending == 50  # read is not delivered

    before = len(_segments(tmp_path))
    spool.ack(30)
    assert spool.pending == 20
    first_base = int(_segments(tmp_path)[0][:20])
    assert 22 <= first_base <= 30  # segments holding only acknowledged records are gone
    assert len(_segments(tmp_path)) < before
    spool.ack(50)
    assert spool.pending == 0
    assert len(_segments(tmp_path)) == 1  # only the segment being appended to stays
    spool.close()


def test_reopened_spool_resends_only_unacknowledged_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100_000, segment_bytes=1_000)
    for i in range(40):
        spool.append(b"h", _value(i))
    _drain(spool)
    spool.ack(25)
    spool.close()

    again = Spool(tmp_path, max_bytes=100_000, segment_bytes=1_000)
    assert again.pending == 15
    assert [r[2] for r in _drain(again)] == [_value(i) for i in range(25, 40)]
    assert again.append(b"h", _value(40)) == 40  # ids keep counting after a restart
    assert _drain(again)[0][2] == _value(40)
    again.close()


def test_crash_without_close_keeps_every_appended_record(tmp_path: Path) -> None:
    live = tmp_path / "live"
    spool = Spool(live, max_bytes=100_000, segment_bytes=1_000, fsync="never", cursor_interval_s=3600)
    for i in range(20):
        spool.append(b"h", _value(i))
    _drain(spool)
    spool.ack(5)  # cursor file not rewritten yet (interval): a crash forgets this ack
    # The files as a crash leaves them (the process's open files are simply gone).
    crashed = tmp_path / "crashed"
    shutil.copytree(live, crashed, ignore=shutil.ignore_patterns("lock"))
    spool.close()

    after = Spool(crashed, max_bytes=100_000, segment_bytes=1_000)
    assert [r[2] for r in _drain(after)] == [_value(i) for i in range(20)]  # at least once: 0..4 again
    after.close()


def test_torn_tail_is_cut_and_appending_continues(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100_000, segment_bytes=10_000)
    for i in range(5):
        spool.append(b"h", _value(i))
    spool.close()
    seg = tmp_path / _segments(tmp_path)[-1]
    whole = seg.stat().st_size
    with open(seg, "ab") as f:
        # a record header promising 64 bytes, then a crash
        f.write(b"\x40\x00\x00\x00\x00\x00\x00\x00partial")

    again = Spool(tmp_path, max_bytes=100_000, segment_bytes=10_000)
    assert seg.stat().st_size == whole
    assert again.append(b"h", _value(5)) == 5
    assert [r[2] for r in _drain(again)] == [_value(i) for i in range(6)]
    again.close()


def test_corrupt_record_inside_a_segment_is_cut(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=100_000, segment_bytes=10_000)
    for i in range(6):
        spool.append(b"h", _value(i))
    spool.close()
    seg = tmp_path / _segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    frame = len(data) // 6
    data[3 * frame + 20] ^= 0xFF  # flip a byte in the payload of record 3: its CRC no longer matches
    seg.write_bytes(bytes(data))

    again = Spool(tmp_path, max_bytes=100_000, segment_bytes=10_000)
    assert [r[2] for r in _drain(again)] == [_value(i) for i in range(3)]
    again.close()


def test_full_spool_drops_the_oldest_unsent_records_and_counts_them(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=1_000)
    for i in range(500):
        spool.append(b"h", _value(i))
        assert spool.bytes <= spool.max_bytes
    on_disk = sum((tmp_path / n).stat().st_size for n in _segments(tmp_path))
    assert on_disk == spool.bytes <= 10_000
    kept = [r[2] for r in _drain(spool)]
    assert spool.dropped == 500 - len(kept) > 400
    assert kept == [_value(i) for i in range(500 - len(kept), 500)]  # the newest, in order
    spool.close()


def test_records_already_handed_out_are_not_counted_as_dropped(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=10_000, segment_bytes=1_000)
    for i in range(8):
        spool.append(b"h", _value(i))
    assert len(_drain(spool)) == 8  # in flight in the producer: still deliverable from memory
    for i in range(8, 200):
        spool.append(b"h", _value(i))
    kept = _drain(spool)
    assert spool.dropped == 200 - 8 - len(kept)
    spool.ack(kept[-1][0] + 1)
    assert spool.pending == 0
    spool.close()


def test_fsync_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync
    monkeypatch.setattr(spool_mod.os, "fsync", lambda fd: (calls.append(fd), real(fd)))

    for policy, expected in (("always", 10), ("never", 0), ("interval", 0)):
        calls.clear()
        spool = Spool(tmp_path / policy, max_bytes=100_000, segment_bytes=50_000, fsync=policy,
                      fsync_interval_s=3600)  # fmt: skip
        spool.append(b"h", _value(0))  # creates the segment (a directory fsync unless "never")
        calls.clear()
        for i in range(10):
            spool.append(b"h", _value(i))
        assert len(calls) == expected, policy
        spool.close()
    with pytest.raises(ValueError, match="fsync policy"):
        Spool(tmp_path / "bad", fsync="sometimes")


def test_one_agent_per_spool_directory(tmp_path: Path) -> None:
    first = Spool(tmp_path)
    with pytest.raises(SpoolError, match="in use by another gpuwatch agent"):
        Spool(tmp_path)
    first.close()
    Spool(tmp_path).close()


def test_unwritable_directory_says_what_to_do(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SpoolError, match="agent_spool_dir"):
        Spool(blocker / "spool")
