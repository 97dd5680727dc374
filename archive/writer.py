"""The archive writer: decoded messages in, durable Parquet files out, and the offsets that may then be committed.

No Kafka here (service.py is the edge). Files are `TABLE/day=YYYY-MM-DD/host=HOST/FROM-TO-pP-oO-RAND.parquet`:
FROM and TO are the first and last sample time in milliseconds (readers pick files by time without opening
them), P the Kafka partition, O the first offset of the batch. Exactly once across crashes: before a batch's
files appear, a marker `_pending/TOPIC/P.json` names them with the batch's offsets; it is removed once the
offsets are committed. A writer that takes a partition over (`recover`) keeps a marker's files when the
committed offset is past the batch, and deletes them otherwise: the batch is then read again from Kafka.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from urllib.parse import quote

import orjson
import pyarrow.parquet as pq

from .storage import Storage
from .tables import DEADLETTER, RECORD_TABLES, SAMPLES, TABLES, Row, decode_message, to_arrow

log = logging.getLogger(__name__)

PENDING = "_pending"
LAYOUT_FILE = "_gpuwatch_archive.json"  # marks a folder or URL as an archive; says how it is laid out
LAYOUT = {
    "layout": 1,
    "tables": list(TABLES),
    "partitioning": "TABLE/day=YYYY-MM-DD/host=HOST (UTC day of ts)",
}
_MAX_NAME_TS = 1e15  # seconds; later times (the contract allows them) are named as this


@dataclass
class Pending:
    """Files written for one topic-partition since its offsets were last committed."""

    topic: str
    partition: int
    first: int
    last: int
    files: list[str] = field(default_factory=list)


def marker_path(topic: str, partition: int) -> str:
    return f"{PENDING}/{quote(topic, safe='')}/{partition}.json"


def file_time_range(rel: str) -> tuple[float, float]:
    """(first, last) sample time of an archive file, from its name."""
    name = rel.rsplit("/", 1)[-1]
    lo, hi = name.split("-", 2)[:2]
    return int(lo) / 1000.0, int(hi) / 1000.0


class ArchiveWriter:
    """Buffers decoded messages and writes them as Parquet files, one per table, day, host and partition.

    `add` decodes a message (an undecodable one becomes a `deadletter` row); `due` says when `flush_rows`
    rows (GPU-samples count one each) or `flush_interval_s` have accumulated; `flush` writes every buffered
    row durably and returns the offsets to commit {(topic, partition): next offset}; `committed` forgets the
    markers of what was committed. `recover` and `drop` serve a partition's assignment and revocation.
    """

    def __init__(self, storage: Storage, tables: dict[str, str], *, flush_rows: int = 500_000,
                 flush_interval_s: float = 300.0, compression: str = "zstd") -> None:  # fmt: skip
        self.storage = storage
        self.tables = tables
        self.flush_rows = flush_rows
        self.flush_interval_s = flush_interval_s
        self.compression = compression
        self._rows: list[tuple[str, Row]] = []  # (topic, row)
        self._gpu_rows = 0
        self._since = 0.0
        self._pending: dict[tuple[str, int], Pending] = {}
        self.files_written = 0
        self.bytes_written = 0
        self.rows_written = 0  # GPU-samples and records
        self.deadletters = 0

    def add(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        row = decode_message(self.tables[topic], topic, partition, offset, key, value)
        if not self._rows:
            self._since = time.monotonic()
        self._rows.append((topic, row))
        self._gpu_rows += len(row.value.uuids) if row.table == SAMPLES else 1

    @property
    def buffered(self) -> int:
        """Rows waiting for the next flush (a GPU-sample counts one)."""
        return self._gpu_rows

    def due(self) -> bool:
        return self._gpu_rows >= self.flush_rows or (
            bool(self._rows) and time.monotonic() - self._since >= self.flush_interval_s
        )

    def flush(self) -> dict[tuple[str, int], int]:
        """Writes every buffered row; returns {(topic, partition): offset to commit}. Durable on return."""
        if not self._rows:
            return {}
        groups: dict[tuple[str, str, str, str, int], list[Row]] = {}
        span: dict[tuple[str, int], tuple[int, int]] = {}
        for topic, row in self._rows:
            groups.setdefault((topic, row.table, row.day, row.host, row.partition), []).append(row)
            lo, hi = span.get((topic, row.partition), (row.offset, row.offset))
            span[(topic, row.partition)] = (min(lo, row.offset), max(hi, row.offset))
        files: list[tuple[str, bytes, int]] = []
        for (topic, table, day, host, partition), rows in groups.items():
            data = to_arrow(table, rows)
            name_lo, name_hi = _time_range(table, rows)
            first = span[(topic, partition)][0]
            rel = (f"{table}/day={day}/host={quote(host, safe='')}/{name_lo:015d}-{name_hi:015d}-p{partition}-o{first}"
                   f"-{uuid.uuid4().hex[:8]}.parquet")  # fmt: skip
            buf = io.BytesIO()
            pq.write_table(data, buf, compression=self.compression)
            files.append((rel, buf.getvalue(), len(data)))
            self._note(topic, partition, first, span[(topic, partition)][1], rel)
        # The markers first: a file may only ever be visible with a marker that names it, until committed.
        for key in span:
            p = self._pending[key]
            self.storage.write(marker_path(*key), orjson.dumps(p.__dict__))
        for rel, blob, n in files:
            self.storage.write(rel, blob)
            self.files_written += 1
            self.bytes_written += len(blob)
            self.rows_written += n
        self.deadletters += sum(1 for _, r in self._rows if r.table == DEADLETTER)
        self._rows.clear()
        self._gpu_rows = 0
        return {key: hi + 1 for key, (_, hi) in span.items()}

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        """The offsets `flush` returned are committed: their markers go."""
        for key, next_offset in offsets.items():
            p = self._pending.get(key)
            if p is not None and p.last < next_offset:
                self.storage.delete(marker_path(*key))
                del self._pending[key]

    def recover(self, topic: str, partition: int, committed: int | None) -> int:
        """Settles what an earlier writer left for this partition, given its committed offset (None: none):
        keeps the files of a committed batch, deletes those of an uncommitted one; returns how many it deleted."""
        rel = marker_path(topic, partition)
        self._pending.pop((topic, partition), None)
        if not self.storage.exists(rel):
            return 0
        p = Pending(**orjson.loads(self.storage.read(rel)))
        deleted = 0
        if committed is None or committed <= p.last:
            for f in p.files:
                deleted += self.storage.delete(f)
            log.warning("%s[%d]: offsets %d..%d were written but not committed; deleted %d of their %d files, "
                        "they are read again", topic, partition, p.first, p.last, deleted, len(p.files))  # fmt: skip
        else:
            log.info("%s[%d]: offsets %d..%d were committed before the writer stopped; their %d files stay", topic,
                     partition, p.first, p.last, len(p.files))  # fmt: skip
        self.storage.delete(rel)
        return deleted

    def drop(self, topic: str, partition: int) -> None:
        """The partition went to another consumer: forget its buffered rows (they are read again there)."""
        self._rows = [(t, r) for t, r in self._rows if not (t == topic and r.partition == partition)]
        self._gpu_rows = sum(len(r.value.uuids) if r.table == SAMPLES else 1 for _, r in self._rows)
        self._pending.pop((topic, partition), None)

    def expire(self, retention_days: int, today: date | None = None) -> list[str]:
        """Deletes day partitions more than `retention_days` before `today` (UTC); returns them. 0 keeps all."""
        if retention_days <= 0:
            return []
        cutoff = ((today or _utc_today()) - timedelta(days=retention_days)).isoformat()
        gone = []
        for table in TABLES:
            for child in self.storage.children(table):
                if child.startswith("day=") and child[4:] < cutoff:
                    self.storage.delete_tree(f"{table}/{child}")
                    gone.append(f"{table}/{child}")
        if gone:
            log.info("retention (%d days): deleted %s", retention_days, ", ".join(gone))
        return gone

    def _note(self, topic: str, partition: int, first: int, last: int, rel: str) -> None:
        p = self._pending.get((topic, partition))
        if p is None:
            p = self._pending[(topic, partition)] = Pending(topic, partition, first, last)
        p.last = max(p.last, last)
        p.files.append(rel)


def ensure_layout(storage: Storage) -> None:
    """Marks `storage` as an archive (what `is_archive` and the readers look for)."""
    if not storage.exists(LAYOUT_FILE):
        storage.write(LAYOUT_FILE, orjson.dumps(LAYOUT))


def import_recording(
    samples_path: str, storage: Storage, *, flush_rows: int = 500_000, topic: str = "import"
) -> int:
    """Archives a JSONL recording (`gpuwatch simulate`'s samples.jsonl) as if it came from Kafka partition 0 with
    its line numbers as offsets; returns how many lines it read. Lines that do not decode go to `deadletter`."""
    ensure_layout(storage)
    writer = ArchiveWriter(storage, {topic: SAMPLES}, flush_rows=flush_rows, flush_interval_s=float("inf"))
    n = 0
    with open(samples_path, "rb") as fh:
        for lineno, line in enumerate(fh):
            if line.strip():
                writer.add(topic, 0, lineno, None, line.rstrip(b"\n"))
                n += 1
            if writer.due():
                writer.committed(writer.flush())
    writer.committed(writer.flush())
    return n


def _time_range(table: str, rows: list[Row]) -> tuple[int, int]:
    """First and last time of a file's rows in milliseconds, for its name."""
    if table == SAMPLES:
        times = [r.value.ts for r in rows]
    elif table == DEADLETTER:
        times = [r.value["failed_at"] for r in rows]
    else:
        times = [float(r.value[RECORD_TABLES[table].day_field]) for r in rows]
    return int(min(min(times), _MAX_NAME_TS) * 1000), int(min(max(times), _MAX_NAME_TS) * 1000)


def _utc_today() -> date:
    return date(*time.gmtime()[:3])
