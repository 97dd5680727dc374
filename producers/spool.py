"""Bounded on-disk spool: the agent's write-ahead queue of snapshots not yet acknowledged by Kafka.

Records are appended to segment files (`<first record id, 20 digits>.seg`), read back in order, and
acknowledged by id; a segment is deleted once every record in it is acknowledged. The acknowledged
position is kept in `cursor`, so a restarted agent resends only what was not acknowledged (a crash may
resend up to `cursor_interval_s` of acknowledged records: delivery is at least once). When the spool
would grow past `max_bytes`, the oldest segment is deleted and its unsent records are counted in `dropped`.

Frame: u32 payload length, u32 CRC-32 of the payload, payload = u16 key length, key, value. A torn or
corrupt tail (a crash mid-write) is cut off when the spool is opened.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gpuwatch.config import FSYNC_POLICIES

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<II")
_KEYLEN = struct.Struct("<H")
_SEG_RE = re.compile(r"^(\d{20})\.seg$")


class SpoolError(RuntimeError):
    """The spool directory cannot be used; the message says why and what to do."""


@dataclass
class _Segment:
    base: int  # id of its first record
    count: int
    size: int
    path: Path

    @property
    def end(self) -> int:
        return self.base + self.count


def _frame(key: bytes, value: bytes) -> bytes:
    payload = _KEYLEN.pack(len(key)) + key + value
    return _HEAD.pack(len(payload), zlib.crc32(payload)) + payload


def _scan(data: bytes) -> tuple[int, int]:
    """(valid records, valid bytes) at the start of a segment's contents."""
    pos = count = 0
    while pos + _HEAD.size <= len(data):
        length, crc = _HEAD.unpack_from(data, pos)
        end = pos + _HEAD.size + length
        if length < _KEYLEN.size or end > len(data) or zlib.crc32(data[pos + _HEAD.size : end]) != crc:
            break
        pos, count = end, count + 1
    return count, pos


class Spool:
    """FIFO of (key, value) records on disk, bounded by `max_bytes`, that survives agent restarts.

    `append` writes a record (flushed to the OS at once; fsync per `fsync`: "always" after every record,
    "interval" at most every `fsync_interval_s`, "never" leaves it to the OS). `read_next` returns the next
    unread record; `ack(rid)` says every record below id `rid` was delivered. Single-threaded; one process
    per directory (a lock file enforces it).
    """

    def __init__(self, directory: str | Path, *, max_bytes: int = 256 << 20, segment_bytes: int | None = None,
                 fsync: str = "interval", fsync_interval_s: float = 1.0, cursor_interval_s: float = 1.0) -> None:  # fmt: skip
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"spool fsync policy must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        self.segment_bytes = int(segment_bytes or min(max(self.max_bytes // 16, 64 << 10), 16 << 20))
        if self.max_bytes < 2 * self.segment_bytes:
            raise ValueError(f"spool max_bytes ({self.max_bytes}) must be at least twice the segment size "
                             f"({self.segment_bytes})")  # fmt: skip
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.cursor_interval_s = cursor_interval_s
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.dir / "lock", "a+b")  # noqa: SIM115 - held for the spool's lifetime
        except OSError as exc:
            raise SpoolError(f"cannot use spool directory {self.dir}: {exc}; set agent_spool_dir "
                             "(--spool-dir) to a writable directory") from None  # fmt: skip
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise SpoolError(f"spool directory {self.dir} is in use by another gpuwatch agent; "
                             "give each agent its own --spool-dir") from None  # fmt: skip
        self.dropped = 0  # records deleted unsent because the spool was full
        self.appended = 0  # records appended since open
        self._segs: list[_Segment] = []
        self._writer: BinaryIO | None = None
        self._reader: BinaryIO | None = None
        self._reader_base = -1
        self._last_fsync = self._last_cursor = time.monotonic()
        self._open_existing()

    # ----- public API

    @property
    def pending(self) -> int:
        """Records not yet acknowledged (sent or not)."""
        return sum(max(0, s.end - max(s.base, self._acked)) for s in self._segs)

    @property
    def unread(self) -> int:
        """Records not yet handed out by read_next."""
        return sum(max(0, s.end - max(s.base, self._read)) for s in self._segs)

    @property
    def bytes(self) -> int:
        """Bytes the segment files take on disk."""
        return sum(s.size for s in self._segs)

    @property
    def next_id(self) -> int:
        """Id the next appended record will get."""
        return self._segs[-1].end if self._segs else self._acked

    def append(self, key: bytes, value: bytes) -> int:
        """Writes one record and returns its id; drops the oldest segment(s) first if the spool is full."""
        frame = _frame(key, value)
        if len(frame) > self.max_bytes // 2:
            self.dropped += 1
            log.error("a %d-byte record does not fit a %d-byte spool; dropped", len(frame), self.max_bytes)
            return -1
        while self._segs and self.bytes + len(frame) > self.max_bytes:
            self._drop_oldest()
        seg = self._segs[-1] if self._segs else None
        if seg is None or (seg.count and seg.size + len(frame) > self.segment_bytes):
            seg = self._roll()
        assert self._writer is not None
        self._writer.write(frame)
        self._writer.flush()
        seg.size += len(frame)
        seg.count += 1
        self.appended += 1
        now = time.monotonic()
        if self.fsync == "always" or (
            self.fsync == "interval" and now - self._last_fsync >= self.fsync_interval_s
        ):
            os.fsync(self._writer.fileno())
            self._last_fsync = now
        return seg.end - 1

    def read_next(self) -> tuple[int, bytes, bytes] | None:
        """(id, key, value) of the next record not yet read, in append order; None when all were read."""
        seg = self._segment_for(self._read)
        if seg is None:
            return None
        if self._reader_base != seg.base:
            self._open_reader(seg)
        assert self._reader is not None
        head = self._reader.read(_HEAD.size)
        length, crc = _HEAD.unpack(head)
        payload = self._reader.read(length)
        if len(payload) != length or zlib.crc32(payload) != crc:
            raise SpoolError(
                f"spool segment {seg.path} changed under the agent (record {self._read} is corrupt)"
            )
        rid = self._read
        self._read += 1
        (klen,) = _KEYLEN.unpack_from(payload)
        return rid, payload[_KEYLEN.size : _KEYLEN.size + klen], payload[_KEYLEN.size + klen :]

    def ack(self, upto: int) -> None:
        """Every record with id < `upto` was delivered: deletes finished segments, records the position."""
        if upto <= self._acked:
            return
        self._acked = upto
        while len(self._segs) > 1 and self._segs[0].end <= self._acked:
            self._delete(self._segs.pop(0))
        now = time.monotonic()
        if now - self._last_cursor >= self.cursor_interval_s:
            self._write_cursor()

    def sync(self) -> None:
        """Makes appended records and the acknowledged position durable (fsync)."""
        if self._writer is not None:
            self._writer.flush()
            os.fsync(self._writer.fileno())
        self._write_cursor(durable=True)

    def close(self) -> None:
        """sync() and release the directory."""
        self.sync()
        for f in (self._writer, self._reader):
            if f is not None:
                f.close()
        self._writer = self._reader = None
        self._lock.close()

    # ----- internals

    def _open_existing(self) -> None:
        try:
            self._acked = int((self.dir / "cursor").read_text().strip() or 0)
        except FileNotFoundError:
            self._acked = 0
        except ValueError:
            log.warning("spool cursor in %s is unreadable; resending everything spooled", self.dir)
            self._acked = 0
        names = sorted(p for p in self.dir.iterdir() if _SEG_RE.match(p.name))
        for i, path in enumerate(names):
            base = int(_SEG_RE.match(path.name).group(1))  # type: ignore[union-attr]
            data = path.read_bytes()
            count, valid = _scan(data)
            if valid < len(data):
                log.warning(
                    "spool segment %s: cut %d bytes of torn or corrupt records", path.name, len(data) - valid
                )
                with open(path, "r+b") as f:
                    f.truncate(valid)
            seg = _Segment(base, count, valid, path)
            if (seg.end <= self._acked or count == 0) and i < len(names) - 1:
                self._delete(seg)
                continue
            self._segs.append(seg)
        if self._segs:
            self._acked = max(self._acked, self._segs[0].base)
            last = self._segs[-1]
            self._writer = open(last.path, "ab")  # noqa: SIM115
            if self.pending:
                log.info("spool %s holds %d unsent records; sending them first", self.dir, self.pending)
        self._read = self._acked

    def _roll(self) -> _Segment:
        if self._writer is not None:
            self._writer.flush()
            if self.fsync != "never":
                os.fsync(self._writer.fileno())
            self._writer.close()
        base = self.next_id
        seg = _Segment(base, 0, 0, self.dir / f"{base:020d}.seg")
        self._writer = open(seg.path, "ab")  # noqa: SIM115
        if self.fsync != "never":
            fd = os.open(self.dir, os.O_RDONLY)  # make the new file's name durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        # A finished segment that was fully acknowledged can go now.
        if self._segs and self._segs[-1].end <= self._acked:
            self._delete(self._segs.pop())
        self._segs.append(seg)
        return seg

    def _drop_oldest(self) -> None:
        if len(self._segs) == 1:
            self._roll()  # never delete the file being appended to; close it first
            if len(self._segs) == 1:  # the closed one was fully acknowledged and is gone already
                return
        seg = self._segs.pop(0)
        lost = max(0, seg.end - max(seg.base, self._read))
        if lost:
            self.dropped += lost
            log.warning("spool full (%d bytes): dropped %d oldest unsent records", self.max_bytes, lost)
        self._read = max(self._read, seg.end)
        self._acked = max(self._acked, seg.end)
        self._delete(seg)

    def _delete(self, seg: _Segment) -> None:
        if self._reader_base == seg.base:
            self._close_reader()
        try:
            seg.path.unlink()
        except FileNotFoundError:
            pass

    def _segment_for(self, rid: int) -> _Segment | None:
        for seg in self._segs:
            if rid < seg.end:
                if rid < seg.base:  # a gap left by a corrupt segment: skip to the next record
                    self._read = rid = seg.base
                return seg
        return None

    def _open_reader(self, seg: _Segment) -> None:
        self._close_reader()
        self._reader = open(seg.path, "rb")  # noqa: SIM115
        self._reader_base = seg.base
        for _ in range(self._read - seg.base):  # skip what was already read (reopen after restart or rewind)
            (length, _crc) = _HEAD.unpack(self._reader.read(_HEAD.size))
            self._reader.seek(length, os.SEEK_CUR)

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader, self._reader_base = None, -1

    def _write_cursor(self, durable: bool = False) -> None:
        tmp = self.dir / "cursor.tmp"
        with open(tmp, "w") as f:
            f.write(f"{self._acked}\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, self.dir / "cursor")
        self._last_cursor = time.monotonic()
