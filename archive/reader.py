"""Reading the archive back: snapshots as the `gpuwatch.samples/1` messages they were, and records by day.

`ArchiveReader.snapshot_messages()` yields what a JSONL recording's lines hold, in time order (the order
`gpuwatch simulate` writes), a time window of files at a time so memory stays bounded by the window, not by the
archive. `gpuwatch score`, `eval` and `train` read an archive through it (training/recording.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .storage import Storage
from .tables import RECORD_TABLES, SAMPLES, record_dicts, snapshot_messages
from .writer import LAYOUT_FILE, file_time_range

# Time order; snapshots of one time in the order Kafka (or the imported file) held them.
_ORDER = [("ts", "ascending"), ("kafka_partition", "ascending"), ("kafka_offset", "ascending")]


def is_archive(location: str) -> bool:
    """Whether `location` is a gpuwatch archive (a folder or URL holding the archive's layout file)."""
    try:
        return Storage(location).exists(LAYOUT_FILE)
    except Exception:  # noqa: BLE001 - an unreachable or unknown location is simply not an archive
        return False


class ArchiveReader:
    """The archive at `location` (a folder or fsspec URL), optionally only rows with `since <= ts < until`."""

    def __init__(
        self, location: str | Storage, *, since: float | None = None, until: float | None = None
    ) -> None:
        self.storage = location if isinstance(location, Storage) else Storage(location)
        self.since = since
        self.until = until

    @property
    def url(self) -> str:
        return self.storage.url

    def files(self, table: str) -> list[str]:
        """The table's data files whose time range meets [since, until), by first time."""
        out = []
        for rel in self.storage.files(table, ".parquet"):
            lo, hi = file_time_range(rel)
            if (self.since is None or hi >= self.since) and (self.until is None or lo < self.until):
                out.append((lo, rel))
        return [rel for _, rel in sorted(out)]

    def read(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(self.storage.path(rel), columns=columns, filesystem=self.storage.filesystem)

    def snapshot_messages(self, window_s: float = 3600.0) -> Iterator[tuple[int, bytes]]:
        """(ordinal, JSON message) of every archived snapshot in time order."""
        n = 0
        for _, _, raw in self.snapshots(window_s):
            yield n, raw
            n += 1

    def snapshots(self, window_s: float = 3600.0) -> Iterator[tuple[float, str, bytes]]:
        """(ts, host, JSON message) of every archived snapshot in time order."""
        for window in self.sample_windows(window_s):
            yield from snapshot_messages(window)

    def sample_windows(
        self, window_s: float = 3600.0, columns: list[str] | None = None
    ) -> Iterator[pa.Table]:
        """The sample rows in time order, `window_s` of sample time (or less) per table; with `columns`, only
        those (plus ts and the Kafka source, which order the rows)."""
        if columns is not None:
            columns = list(dict.fromkeys([*columns, "ts", "kafka_partition", "kafka_offset"]))
        files = [(file_time_range(rel)[0], rel) for rel in self.files(SAMPLES)]
        i = 0
        active: list[pa.Table] = []
        while i < len(files) or active:
            starts = [t["ts"][0].as_py() for t in active] + ([files[i][0]] if i < len(files) else [])
            end = min(starts) + window_s
            while i < len(files) and files[i][0] < end:
                t = self._clip(self.read(files[i][1], columns))
                if len(t):
                    active.append(t)
                i += 1
            taken, rest = [], []
            for t in active:
                cut = len(t) if i == len(files) else _first_at_or_after(t, end)
                taken.append(t.slice(0, cut))
                if cut < len(t):
                    rest.append(t.slice(cut))
            active = rest
            window = pa.concat_tables(taken)
            if len(window):
                yield window.sort_by(_ORDER)

    def uuid_at(self, host: str, gpu_index: int, ts: float) -> str | None:
        """The uuid GPU `gpu_index` of `host` reported last at or before `ts` (else first after it), or None."""
        before: tuple[float, str] | None = None
        after: tuple[float, str] | None = None
        for rel in self.files(SAMPLES):
            if f"/host={quote(host, safe='')}/" not in rel:
                continue
            t = self.read(rel, ["gpu_index", "uuid", "ts"])
            t = t.filter(pc.equal(t["gpu_index"], gpu_index))
            for when, uuid in zip(t["ts"].to_pylist(), t["uuid"].to_pylist()):
                if when <= ts and (before is None or when >= before[0]):
                    before = (when, uuid)
                elif when > ts and (after is None or when < after[0]):
                    after = (when, uuid)
        found = before or after
        return found[1] if found else None

    def records(self, table: str) -> Iterator[dict[str, Any]]:
        """The risk, remediation or outcome records (as their codec returns them), a day at a time, each day in
        time order."""
        spec = RECORD_TABLES[table]
        by_day: dict[str, list[str]] = {}
        for rel in self.files(table):
            by_day.setdefault(rel.split("/")[1], []).append(rel)
        for day in sorted(by_day):
            # promote: a day may hold files written before a field was added (its column is null there)
            data = pa.concat_tables([self.read(rel) for rel in by_day[day]], promote_options="default")
            if self.since is not None or self.until is not None:
                t = data[spec.day_field].to_numpy()
                keep = (t >= (self.since if self.since is not None else -1.0)) & (
                    t < (self.until if self.until is not None else float("inf"))
                )
                data = data.filter(pa.array(keep))
            yield from record_dicts(data.sort_by([(spec.day_field, "ascending"), ("kafka_offset", "ascending")]),
                                    spec)  # fmt: skip

    def _clip(self, t: pa.Table) -> pa.Table:
        if self.since is None and self.until is None:
            return t
        ts = t["ts"].to_numpy()
        keep = (ts >= (self.since if self.since is not None else -1.0)) & (
            ts < (self.until if self.until is not None else float("inf"))
        )
        return t.filter(pa.array(keep))


def _first_at_or_after(t: pa.Table, end: float) -> int:
    """Index of the first row of a ts-sorted table at or after `end`."""
    return int(np.searchsorted(t["ts"].to_numpy(), end, side="left"))
