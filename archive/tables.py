"""The archive's tables: which topic each holds, its Parquet columns (derived from `schemas/fields.py` and the
typed records of `schemas/records.py`), how a
message becomes rows, and the day and host a row is filed under.

Samples are stored one row per GPU-sample with a column per contract field, so a snapshot read back decodes to
the very `Snapshot` it was. Risk, remediation and outcome records get a column per known field and `extra`
(JSON of any field the contract does not name, null when none). A message that does not decode is kept in the
`deadletter` table with the reason, never dropped. Every row carries the Kafka partition and offset it came from.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

from gpuwatch.config import Settings
from gpuwatch.schemas import fields as F
from gpuwatch.schemas.codecs import DecodeError, Snapshot, decode_outcome, decode_remediation, decode_risk
from gpuwatch.schemas.codecs import decode_snapshot as _decode_snapshot
from gpuwatch.schemas.records import Outcome, Remediation, Risk, columns

SAMPLES, RISK, REMEDIATION, OUTCOMES, DEADLETTER = "samples", "risk", "remediation", "outcomes", "deadletter"
TABLES: tuple[str, ...] = (SAMPLES, RISK, REMEDIATION, OUTCOMES, DEADLETTER)
_ARROW = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "json": pa.string()}
_SOURCE = [pa.field("kafka_partition", pa.int32()), pa.field("kafka_offset", pa.int64())]

SAMPLES_SCHEMA = pa.schema(
    [pa.field("host", pa.string()), pa.field("ts", pa.float64()), pa.field("seq", pa.int64()),
     pa.field("gpu_index", pa.int64()), pa.field("uuid", pa.string())]
    + [pa.field(name, pa.float64()) for name in F.ALL_NUMERIC]
    + [pa.field(name, pa.bool_()) for name in F.ALL_FLAGS]
    + [pa.field("throttle_reasons", pa.int64()), pa.field("xid", pa.list_(pa.int32()))] + _SOURCE
)  # fmt: skip
DEADLETTER_SCHEMA = pa.schema(
    [pa.field("host", pa.string()), pa.field("failed_at", pa.float64()), pa.field("topic", pa.string()),
     pa.field("error", pa.string()), pa.field("original_b64", pa.string())] + _SOURCE
)  # fmt: skip


@dataclass(frozen=True)
class RecordTable:
    """A table of JSON records: its fields, its codec, and which field dates a record."""

    name: str
    fields: tuple[tuple[str, str], ...]
    decode: Callable[[bytes], Any]  # the record's codec: raises DecodeError for a message that breaks it
    day_field: str

    def wire_object(self, value: bytes) -> dict:
        """The message's JSON object once its codec accepts it: the archive keeps every field as it came, those
        the contract does not name too (`extra`), which the typed record leaves out."""
        self.decode(value)
        return orjson.loads(value)

    @property
    def schema(self) -> pa.Schema:
        cols = [pa.field(name, _ARROW[kind]) for name, kind in self.fields]
        return pa.schema([*cols, pa.field("extra", pa.string()), *_SOURCE])


RECORD_TABLES = {
    RISK: RecordTable(RISK, columns(Risk), decode_risk, "ts"),
    REMEDIATION: RecordTable(REMEDIATION, columns(Remediation), decode_remediation, "ts"),
    OUTCOMES: RecordTable(OUTCOMES, columns(Outcome), decode_outcome, "event_ts"),
}


def topic_tables(settings: Settings) -> dict[str, str]:
    """Topic name -> the table it is archived in."""
    return {settings.topic_samples: SAMPLES, settings.topic_risk: RISK,
            settings.topic_remediation: REMEDIATION, settings.topic_outcomes: OUTCOMES}  # fmt: skip


def day_of(ts: float) -> str:
    """The UTC day `ts` falls on, as YYYY-MM-DD (the archive's day partition)."""
    try:
        return time.strftime("%Y-%m-%d", time.gmtime(ts))
    except (
        OverflowError,
        OSError,
        ValueError,
    ):  # a ts no calendar holds: the contract allows any number >= 0
        return "9999-12-31"


@dataclass
class Row:
    """One decoded message waiting in the writer: its table, day and host, and where it came from."""

    table: str
    day: str
    host: str
    partition: int
    offset: int
    value: Any  # Snapshot (samples), dict (records), or a dead letter dict


def decode_message(table: str, topic: str, partition: int, offset: int, key: bytes | None,
                   value: bytes | None) -> Row:  # fmt: skip
    """The row(s) a Kafka message becomes; an undecodable message becomes a `deadletter` row with the reason."""
    try:
        if value is None:
            raise DecodeError("message has no value (tombstone)")
        if table == SAMPLES:
            snap = _decode_snapshot(value)
            return Row(SAMPLES, day_of(snap.ts), snap.host, partition, offset, snap)
        spec = RECORD_TABLES[table]
        rec = spec.wire_object(value)
        return Row(table, day_of(float(rec[spec.day_field])), rec["host"], partition, offset, rec)
    except DecodeError as exc:
        now = time.time()
        host = key.decode("utf-8", "replace") if key else "-"
        dead = {"host": host, "failed_at": now, "topic": topic, "error": str(exc)[:4096],
                "original_b64": base64.b64encode(value or b"").decode("ascii")}  # fmt: skip
        return Row(DEADLETTER, day_of(now), host, partition, offset, dead)


def to_arrow(table: str, rows: list[Row]) -> pa.Table:
    """The rows of one file as an Arrow table, sorted by time then offset (files are read in time windows)."""
    if table == SAMPLES:
        out = _samples_table(rows)
        return out.take(np.lexsort((out["kafka_offset"].to_numpy(), out["ts"].to_numpy())))
    if table == DEADLETTER:
        cols: dict[str, list] = {f.name: [] for f in DEADLETTER_SCHEMA}
        for r in rows:
            for name in ("host", "failed_at", "topic", "error", "original_b64"):
                cols[name].append(r.value[name])
            cols["kafka_partition"].append(r.partition)
            cols["kafka_offset"].append(r.offset)
        return pa.table(cols, schema=DEADLETTER_SCHEMA)
    spec = RECORD_TABLES[table]
    known = {name for name, _ in spec.fields} | {"schema"}
    rows = sorted(rows, key=lambda r: (float(r.value[spec.day_field]), r.offset))
    cols = {name: [r.value.get(name) for r in rows] for name, kind in spec.fields if kind != "json"}
    for name in (name for name, kind in spec.fields if kind == "json"):  # a list field is kept as its JSON text
        cols[name] = [None if (v := r.value.get(name)) is None else orjson.dumps(v).decode() for r in rows]
    extras = [{k: v for k, v in r.value.items() if k not in known} for r in rows]
    cols["extra"] = [orjson.dumps(e).decode() if e else None for e in extras]
    cols["kafka_partition"] = [r.partition for r in rows]
    cols["kafka_offset"] = [r.offset for r in rows]
    return pa.table(cols, schema=spec.schema)


def _samples_table(rows: list[Row]) -> pa.Table:
    snaps: list[Snapshot] = [r.value for r in rows]
    counts = np.fromiter((len(s.uuids) for s in snaps), dtype=np.int64, count=len(snaps))

    def per_gpu(values: list, dtype: Any) -> np.ndarray:
        return np.repeat(np.asarray(values, dtype=dtype), counts)

    numeric = np.concatenate([s.numeric for s in snaps])
    flags = np.concatenate([s.flags for s in snaps])
    xids = [x for s in snaps for x in s.xids]
    lengths = np.fromiter(map(len, xids), dtype=np.int32, count=len(xids))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    values = np.fromiter(chain.from_iterable(xids), dtype=np.int32, count=int(offsets[-1]))
    cols: dict[str, Any] = {
        "host": pa.array([s.host for s, n in zip(snaps, counts) for _ in range(n)], pa.string()),
        "ts": per_gpu([s.ts for s in snaps], np.float64),
        "seq": per_gpu([s.seq for s in snaps], np.int64),
        "gpu_index": np.concatenate([s.gpu_index for s in snaps]),
        "uuid": pa.array([u for s in snaps for u in s.uuids], pa.string()),
    }
    for j, name in enumerate(F.ALL_NUMERIC):
        col = numeric[:, j]
        cols[name] = pa.array(col, pa.float64(), mask=np.isnan(col))  # null: unknown, as in the contract
    for j, name in enumerate(F.ALL_FLAGS):
        cols[name] = flags[:, j]
    cols["throttle_reasons"] = np.concatenate([s.throttle for s in snaps])
    cols["xid"] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))
    cols["kafka_partition"] = per_gpu([r.partition for r in rows], np.int32)
    cols["kafka_offset"] = per_gpu([r.offset for r in rows], np.int64)
    return pa.table(cols, schema=SAMPLES_SCHEMA)


_GPU_FIELDS = ("gpu_index", "uuid", *F.ALL_NUMERIC, *F.ALL_FLAGS, "throttle_reasons", "xid")


def snapshot_messages(table: pa.Table) -> list[tuple[float, str, bytes]]:
    """The `gpuwatch.samples/1` messages of sample rows (in row order; a snapshot's rows are contiguous), as
    (ts, host, JSON bytes). `decode_snapshot` of each gives back the archived snapshot."""
    if not len(table):
        return []
    key_p = table["kafka_partition"].to_numpy()
    key_o = table["kafka_offset"].to_numpy()
    starts = np.flatnonzero(np.r_[True, (key_p[1:] != key_p[:-1]) | (key_o[1:] != key_o[:-1])])
    ends = np.r_[starts[1:], len(table)]
    hosts = table["host"].to_pylist()
    ts = table["ts"].to_pylist()
    seq = table["seq"].to_pylist()
    gpu_rows = list(zip(*(table[name].to_pylist() for name in _GPU_FIELDS)))
    out = []
    for a, b in zip(starts.tolist(), ends.tolist()):
        gpus = [dict(zip(_GPU_FIELDS, row)) for row in gpu_rows[a:b]]
        msg = {"schema": F.SAMPLES_SCHEMA, "host": hosts[a], "ts": ts[a], "seq": seq[a], "gpus": gpus}
        out.append((ts[a], hosts[a], orjson.dumps(msg)))
    return out


def record_dicts(table: pa.Table, spec: RecordTable) -> list[dict]:
    """The records of a risk, remediation or outcome table as their JSON objects, as they came (absent optional
    fields left out, unknown fields back from `extra`), in row order."""
    names = [name for name, _ in spec.fields]
    as_json = {name for name, kind in spec.fields if kind == "json"}
    tag = {RISK: F.RISK_SCHEMA, REMEDIATION: F.REMEDIATION_SCHEMA, OUTCOMES: F.OUTCOME_SCHEMA}[spec.name]
    out = []
    # a file written before a field was added lacks its column: the field reads as absent
    present = [table[n].to_pylist() if n in table.column_names else [None] * len(table) for n in names]
    for row in zip(*present, table["extra"].to_pylist()):
        rec = {"schema": tag, **{n: orjson.loads(v) if n in as_json else v for n, v in zip(names, row) if v is not None}}
        if row[-1]:
            rec.update(orjson.loads(row[-1]))
        out.append(rec)
    return out
