"""orjson codecs for the gpuwatch wire contracts; they agree with the JSON Schema files beside this module.

`decode_*` raise `DecodeError` and `encode_*` raise `EncodeError` (both `ValueError`s) whose `reason`
says what is wrong and where, e.g. ``gpus[3].temp_c: expected number or null, got string "71"``.
Every record the schema files reject is rejected here too; the codecs add the rules JSON Schema cannot
express: unique `gpu_index` within a snapshot, a message-size and nesting-depth limit, and the optional
`ts` freshness window of `decode_snapshot`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from importlib import resources
from itertools import chain
from operator import itemgetter
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
from msgspec.structs import astuple

from .fields import (
    ACTIONS,
    ALL_COUNTERS,
    ALL_FLAGS,
    ALL_NUMERIC,
    DEADLETTER_SCHEMA,
    FAILURE_MODES,
    FLAGS,
    OPTIONAL_FLAGS,
    OUTCOME_SCHEMA,
    REMEDIATION_SCHEMA,
    REQUIRED_NUMERIC,
    RISK_SCHEMA,
    SAMPLES_SCHEMA,
)

MAX_MESSAGE_BYTES = 1 << 20
MAX_GPUS = 64
MAX_XIDS = 64
MAX_HOST_LEN = 255
MAX_DEPTH = 32  # containers, top-level object = 1; the known structure needs 4
MAX_GPU_INDEX = 2**31 - 1
MAX_XID = 2**31 - 1
MAX_INT64 = 2**63 - 1
MAX_DEADLETTER_ORIGINAL = 512 * 1024  # keeps a dead-letter record under Kafka's default 1 MB message limit
_FMAX = sys.float_info.max  # `-_FMAX <= x <= _FMAX` is False for NaN and +-inf
_OPTS = orjson.OPT_SERIALIZE_NUMPY


class ContractError(ValueError):
    """A record breaks its wire contract. `reason` (also `str(err)`) says what and where; `path` is the
    offending field (``gpus[3].temp_c``, ``""`` for the whole message); `kind` is a short class for metrics:
    size, json, version, missing, type, range, duplicate, depth, future, stale or internal."""

    def __init__(self, reason: str, *, path: str = "", kind: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.path = path
        self.kind = kind


class DecodeError(ContractError):
    """Raised by the `decode_*` functions for input that breaks the contract."""


class EncodeError(ContractError):
    """Raised by the `encode_*` functions for a record that would break the contract."""


@dataclass(slots=True)
class Snapshot:
    """One decoded `gpuwatch.samples/1` node snapshot, columnar for the feature pipeline (G = number of GPUs)."""

    host: str
    ts: float
    seq: int
    gpu_index: np.ndarray  # int64 (G,)
    uuids: list[str]
    numeric: np.ndarray  # float64 (G, len(ALL_NUMERIC)); null or absent -> NaN; columns in ALL_NUMERIC order
    flags: np.ndarray  # bool (G, len(ALL_FLAGS)); null or absent -> False; columns in ALL_FLAGS order
    throttle: np.ndarray  # int64 (G,); null -> 0
    xids: list[list[int]]


# ---------------------------------------------------------------- error helpers (slow path only)

_MISSING = object()
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "integer", float: "number",
               bool: "boolean", type(None): "null"}


def _fail(path: str, msg: str, kind: str) -> DecodeError:
    return DecodeError(f"{path}: {msg}" if path else msg, path=path, kind=kind)


def _short(value: Any) -> str:
    """JSON rendering of a scalar, cut to 40 characters (not orjson: this renders NaN/Infinity instead of failing)."""
    try:
        text = json.dumps(value)
    except ValueError:  # an int with more digits than Python will print
        return "(too long to show)"
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(value: Any) -> str:
    """JSON type of `value` plus a short rendering of scalars: `string "71"`, `boolean true`."""
    name = _JSON_TYPES.get(type(value))
    if name is None:
        return f"{type(value).__name__} (not a JSON type)"
    return name if name in ("object", "array", "null") else f"{name} {_short(value)}"


def _need(obj: dict, name: str, path: str) -> Any:
    value = obj.get(name, _MISSING)
    if value is _MISSING:
        raise _fail(_join(path, name), "missing required field", "missing")
    return value


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _check_str(value: Any, path: str, lo: int = 0, hi: int | None = None) -> str:
    if type(value) is not str:
        raise _fail(path, f"expected string, got {_describe(value)}", "type")
    if len(value) < lo or (hi is not None and len(value) > hi):
        limits = f"{lo}..{hi}" if hi is not None else f"at least {lo}"
        raise _fail(path, f"must be {limits} characters long, got {len(value)}", "range")
    return value


def _check_int(value: Any, path: str, lo: int, hi: int, *, nullable: bool = False) -> int | None:
    """An integer in [lo, hi]; like JSON Schema, a float with no fractional part (3.0) counts as one."""
    if value is None and nullable:
        return None
    kind = type(value)
    if kind is float and -_FMAX <= value <= _FMAX and value.is_integer():
        value = int(value)
    elif kind is not int:
        want = "integer or null" if nullable else "integer"
        raise _fail(path, f"expected {want}, got {_describe(value)}", "type")
    if not lo <= value <= hi:
        raise _fail(path, f"must be between {lo} and {hi}, got {value}", "range")
    return value


def _check_number(value: Any, path: str, lo: float | None = None, hi: float | None = None, *,
                  lo_exclusive: bool = False, nullable: bool = False) -> float | None:
    """A finite number (not a boolean, not a numeric string) within the optional bounds."""
    if value is None and nullable:
        return None
    if type(value) not in (int, float):
        want = "number or null" if nullable else "number"
        raise _fail(path, f"expected {want}, got {_describe(value)}", "type")
    if not -_FMAX <= value <= _FMAX:
        raise _fail(path, f"must be a finite number, got {_describe(value)}", "range")
    if lo is not None and (value <= lo if lo_exclusive else value < lo):
        raise _fail(path, f"must be {'>' if lo_exclusive else '>='} {lo}, got {value}", "range")
    if hi is not None and value > hi:
        raise _fail(path, f"must be <= {hi}, got {value}", "range")
    return float(value)


def _check_bool(value: Any, path: str, *, nullable: bool = False) -> bool | None:
    if type(value) is bool or (value is None and nullable):
        return value
    raise _fail(path, f"expected {'boolean or null' if nullable else 'boolean'}, got {_describe(value)}", "type")


def _check_enum(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if type(value) is not str or value not in choices:
        raise _fail(path, f"expected one of {', '.join(choices)}; got {_describe(value)}", "range")
    return value


def _check_tag(obj: dict, expected: str) -> None:
    value = _need(obj, "schema", "")
    if type(value) is not str:
        raise _fail("schema", f"expected string {expected!r}, got {_describe(value)}", "type")
    if value == expected:
        return
    family = expected.rpartition("/")[0]
    if value.startswith(family + "/"):
        raise _fail("schema", f"unsupported version {_short(value)}; this reader accepts {expected!r} "
                              "(a new major version needs a newer gpuwatch)", "version")
    raise _fail("schema", f"expected {expected!r}, got {_describe(value)}", "version")


def _too_deep(value: Any, budget: int) -> bool:
    """True if `value` nests more than `budget` containers; stops descending once over budget."""
    kind = type(value)
    if kind is dict:
        return budget <= 0 or any(_too_deep(v, budget - 1) for v in value.values())
    if kind is list:
        return budget <= 0 or any(_too_deep(v, budget - 1) for v in value)
    return False


def _check_extras_depth(obj: dict, known: frozenset[str], path: str, budget: int) -> None:
    """Unknown fields are accepted but may nest at most `budget` containers deep."""
    for name, value in obj.items():
        if name not in known and _too_deep(value, budget):
            raise _fail(_join(path, str(name)), "nested too deeply "
                        f"(at most {MAX_DEPTH} levels of objects/arrays in a message)", "depth")


# ---------------------------------------------------------------- snapshots

_TOP_REQUIRED = frozenset(("schema", "host", "ts", "seq", "gpus"))
_GPU_REQUIRED = frozenset(("gpu_index", "uuid", "throttle_reasons", "xid") + REQUIRED_NUMERIC + FLAGS)
_GPU_KNOWN = _GPU_REQUIRED | frozenset(ALL_NUMERIC + ALL_FLAGS)
_META = itemgetter("gpu_index", "uuid", "throttle_reasons", "xid")
_NUM_TYPES = frozenset((int, float, type(None)))  # bool excluded on purpose: true is not a number
_FLAG_TYPES = frozenset((bool, type(None)))
_INT_OR_NULL = frozenset((int, type(None)))
_INT, _STR, _LIST = frozenset((int,)), frozenset((str,)), frozenset((list,))
_REAL = (int, float)
_LOWER = np.array([0.0 if f in ALL_COUNTERS else -np.inf for f in ALL_NUMERIC])
_COUNTERS = frozenset(ALL_COUNTERS)
_OPTIONAL_NUMERIC = ALL_NUMERIC[len(REQUIRED_NUMERIC):]
_REQ_NUMERIC = itemgetter(*REQUIRED_NUMERIC)
_REQ_FLAGS = itemgetter(*FLAGS)
_ALL_NUMERIC = itemgetter(*ALL_NUMERIC)
_ALL_FLAGS = itemgetter(*ALL_FLAGS)
_N_NUMERIC, _N_FLAGS = len(ALL_NUMERIC), len(ALL_FLAGS)
_DICT = frozenset((dict,))


def _extras_too_deep(obj: dict, gpus: list, max_depth: int) -> bool:
    """Whether an unknown field of the snapshot or of a GPU sample nests deeper than `max_depth` allows."""
    if len(obj) > 5 and any(_too_deep(obj[k], max_depth - 1) for k in obj.keys() - _TOP_REQUIRED):
        return True
    if all(map(_GPU_KNOWN.issuperset, gpus)):  # C-level: the usual case of no unknown GPU fields
        return False
    return any(_too_deep(g[k], max_depth - 3) for g in gpus for k in g.keys() - _GPU_KNOWN)


def _fast(obj: Any, max_depth: int, from_json: bool) -> Snapshot | None:
    """Builds the Snapshot with C-level checks only; None means "invalid or unusual": `_explain` then decides."""
    if type(obj) is not dict or not obj.keys() >= _TOP_REQUIRED:
        return None
    host, ts, seq, gpus = obj["host"], obj["ts"], obj["seq"], obj["gpus"]
    if (type(obj["schema"]) is not str or obj["schema"] != SAMPLES_SCHEMA or type(host) is not str or not 0 < len(host) <= MAX_HOST_LEN
            or type(ts) not in _REAL or not 0 <= ts <= _FMAX or type(seq) is not int or not 0 <= seq <= MAX_INT64
            or type(gpus) is not list or not 0 < len(gpus) <= MAX_GPUS):
        return None
    if not _DICT.issuperset(map(type, gpus)):
        return None
    try:  # itemgetter raises KeyError for a missing field: presence check and extraction in one C call
        # The usual shape, every known field in every GPU: one itemgetter call per GPU for the numbers.
        vals = list(chain.from_iterable(map(_ALL_NUMERIC, gpus)))
        flags = list(chain.from_iterable(map(_ALL_FLAGS, gpus)))
        # ... and as many keys as known fields means no unknown field whose nesting depth needs a check.
        complete = len(obj) == len(_TOP_REQUIRED) and set(map(len, gpus)) == {len(_GPU_KNOWN)}
    except KeyError:
        complete = False
    if not complete:
        if _extras_too_deep(obj, gpus, max_depth):
            return None
        vals, flags = [], []
        try:  # optional fields may be absent: read as null
            for g in gpus:
                vals += _REQ_NUMERIC(g)
                vals += map(g.get, _OPTIONAL_NUMERIC)
                flags += _REQ_FLAGS(g)
                flags += map(g.get, OPTIONAL_FLAGS)
        except KeyError:
            return None
    try:
        idx, uuids, thr, xids = zip(*map(_META, gpus), strict=True)
    except KeyError:
        return None
    if not (_NUM_TYPES.issuperset(map(type, vals)) and _FLAG_TYPES.issuperset(map(type, flags))
            and _INT.issuperset(map(type, idx)) and _STR.issuperset(map(type, uuids))
            and _INT_OR_NULL.issuperset(map(type, thr)) and _LIST.issuperset(map(type, xids))):
        return None
    if min(idx) < 0 or max(idx) > MAX_GPU_INDEX or len(set(idx)) != len(idx):
        return None
    if None in thr:
        thr = tuple(0 if t is None else t for t in thr)
    if min(thr) < 0 or max(thr) > MAX_INT64 or max(map(len, xids)) > MAX_XIDS:
        return None
    if any(xids):
        flat = list(chain.from_iterable(xids))
        if not _INT.issuperset(map(type, flat)) or min(flat) < 0 or max(flat) > MAX_XID:
            return None
    # orjson never yields NaN/inf or ints beyond 64 bits; a caller's dict may hold any of them
    if not from_json and not all(v is None or -_FMAX <= v <= _FMAX for v in vals):
        return None
    numeric = np.array(vals, dtype=np.float64).reshape(len(gpus), _N_NUMERIC)  # None -> NaN
    if (numeric < _LOWER).any():
        return None
    return Snapshot(host, float(ts), seq, np.array(idx, dtype=np.int64), list(uuids), numeric,
                    np.array(flags, dtype=bool).reshape(len(gpus), _N_FLAGS), np.array(thr, dtype=np.int64),
                    list(xids) if from_json else [list(x) for x in xids])


# The usual message (known fields only) is parsed and type-checked in one C pass by msgspec against these
# structs; anything they refuse (an unknown field, 3.0 for an integer, a real error) takes the orjson path
# above, which accepts exactly what the schema does and names what is wrong. A struct accepts nothing that
# path refuses: tests/test_codecs.py checks that both agree on generated values and fuzzed messages.
_FiniteNum = Annotated[float, msgspec.Meta(ge=-_FMAX, le=_FMAX)]
_Count = Annotated[float, msgspec.Meta(ge=0, le=_FMAX)]
_I64 = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT64)]
_XidCode = Annotated[int, msgspec.Meta(ge=0, le=MAX_XID)]


def _gpu_field(name: str) -> tuple:
    kind = (_Count if name in _COUNTERS else _FiniteNum) if name in ALL_NUMERIC else bool
    return (name, kind | None) if name in _GPU_REQUIRED else (name, kind | None, None)


# Field order is the tuple `astuple` returns: numbers, flags, then the per-GPU metadata.
_TypedGpu = msgspec.defstruct(
    "_TypedGpu",
    [_gpu_field(f) for f in ALL_NUMERIC + ALL_FLAGS] + [
        ("gpu_index", Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_INDEX)]), ("uuid", str),
        ("throttle_reasons", _I64 | None), ("xid", Annotated[list[_XidCode], msgspec.Meta(max_length=MAX_XIDS)]),
    ],
    kw_only=True, forbid_unknown_fields=True, gc=False,
)
_TypedSnapshot = msgspec.defstruct(
    "_TypedSnapshot",
    [("schema", str), ("host", Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HOST_LEN)]),
     ("ts", Annotated[float, msgspec.Meta(ge=0, le=_FMAX)]), ("seq", _I64),
     ("gpus", Annotated[list[_TypedGpu], msgspec.Meta(min_length=1, max_length=MAX_GPUS)])],  # type: ignore[valid-type]
    forbid_unknown_fields=True, gc=False,
)
_TYPED = msgspec.json.Decoder(_TypedSnapshot)
_FLAGS_END = _N_NUMERIC + _N_FLAGS


def _typed(raw: bytes | bytearray | memoryview | str) -> Snapshot | None:
    """The Snapshot of a message holding known fields only, or None: `_parse` + `_snapshot` then decide."""
    try:
        obj: Any = _TYPED.decode(raw)
    except Exception:  # noqa: BLE001 - msgspec's errors, UnicodeDecodeError, ...: the orjson path is the authority
        return None
    rows = list(map(astuple, obj.gpus))
    n = len(rows)
    idx, uuids, thr, xids = zip(*[r[_FLAGS_END:] for r in rows])
    if obj.schema != SAMPLES_SCHEMA or len(set(idx)) != n:
        return None
    if None in thr:
        thr = tuple(0 if t is None else t for t in thr)
    values: list = []  # numbers and flags of every GPU, row after row
    for r in rows:
        values += r[:_FLAGS_END]
    try:  # array() converts a list of floats and bools far faster than numpy does
        table = np.frombuffer(array("d", values)).reshape(n, _FLAGS_END)
    except TypeError:  # a null: numpy reads it as NaN
        table = np.array(values, dtype=np.float64).reshape(n, _FLAGS_END)
    return Snapshot(obj.host, obj.ts, obj.seq, np.array(idx, dtype=np.int64), list(uuids), table[:, :_N_NUMERIC],
                    table[:, _N_NUMERIC:] > 0, np.array(thr, dtype=np.int64), list(xids))  # flag null -> False


def _explain(obj: Any, max_depth: int) -> None:
    """Slow pass: raises DecodeError naming the first offending field; returns if the snapshot is valid."""
    if type(obj) is not dict:
        raise _fail("", f"expected a JSON object at top level, got {_describe(obj)}", "type")
    _check_tag(obj, SAMPLES_SCHEMA)
    _check_str(_need(obj, "host", ""), "host", 1, MAX_HOST_LEN)
    _check_number(_need(obj, "ts", ""), "ts", 0)
    _check_int(_need(obj, "seq", ""), "seq", 0, MAX_INT64)
    gpus = _need(obj, "gpus", "")
    if type(gpus) is not list:
        raise _fail("gpus", f"expected array, got {_describe(gpus)}", "type")
    if not 0 < len(gpus) <= MAX_GPUS:
        raise _fail("gpus", f"expected 1..{MAX_GPUS} entries, got {len(gpus)}", "range")
    _check_extras_depth(obj, _TOP_REQUIRED, "", max_depth - 1)
    seen: dict[int, int] = {}
    for i, g in enumerate(gpus):
        p = f"gpus[{i}]"
        if type(g) is not dict:
            raise _fail(p, f"expected object, got {_describe(g)}", "type")
        idx = _check_int(_need(g, "gpu_index", p), p + ".gpu_index", 0, MAX_GPU_INDEX)
        assert idx is not None  # not nullable: a null raised above
        if idx in seen:
            raise _fail(p + ".gpu_index", f"duplicate gpu_index {idx} (also at gpus[{seen[idx]}])", "duplicate")
        seen[idx] = i
        _check_str(_need(g, "uuid", p), p + ".uuid")
        for name in ALL_NUMERIC:
            value = _need(g, name, p) if name not in _OPTIONAL_NUMERIC else g.get(name)
            _check_number(value, f"{p}.{name}", 0 if name in _COUNTERS else None, nullable=True)
        for name in ALL_FLAGS:
            _check_bool(_need(g, name, p) if name not in OPTIONAL_FLAGS else g.get(name), f"{p}.{name}",
                        nullable=True)
        _check_int(_need(g, "throttle_reasons", p), p + ".throttle_reasons", 0, MAX_INT64, nullable=True)
        xid = _need(g, "xid", p)
        if type(xid) is not list:
            raise _fail(p + ".xid", f"expected array, got {_describe(xid)}", "type")
        if len(xid) > MAX_XIDS:
            raise _fail(p + ".xid", f"expected at most {MAX_XIDS} entries, got {len(xid)}", "range")
        for j, code in enumerate(xid):
            _check_int(code, f"{p}.xid[{j}]", 0, MAX_XID)
        _check_extras_depth(g, _GPU_KNOWN, p, max_depth - 3)


def _integral(obj: dict) -> dict:
    """Copy of a valid snapshot with integer fields written as 3.0 turned into ints (JSON Schema allows both)."""
    def fix(v: Any) -> Any:
        return int(v) if type(v) is float else v

    gpus = [{**g, "gpu_index": fix(g["gpu_index"]), "throttle_reasons": fix(g["throttle_reasons"]),
             "xid": [fix(x) for x in g["xid"]]} for g in obj["gpus"]]
    return {**obj, "seq": fix(obj["seq"]), "gpus": gpus}


def _snapshot(obj: Any, now: float | None, max_future_s: float, max_age_s: float | None, max_depth: int,
              from_json: bool) -> Snapshot:
    snap = _fast(obj, max_depth, from_json)
    if snap is None:
        _explain(obj, max_depth)
        snap = _fast(_integral(obj), max_depth, from_json)
        if snap is None:
            raise _fail("", "snapshot rejected by the fast check but the slow check found no reason "
                            "(a bug in gpuwatch.schemas.codecs)", "internal")
    return _check_time(snap, now, max_future_s, max_age_s)


def _check_time(snap: Snapshot, now: float | None, max_future_s: float, max_age_s: float | None) -> Snapshot:
    if now is not None and snap.ts - now > max_future_s:
        raise _fail("ts", f"{snap.ts!r} is {snap.ts - now:.1f} s in the future (limit {max_future_s:g} s); "
                          "is the producer's clock right?", "future")
    if max_age_s is not None:
        age = (time.time() if now is None else now) - snap.ts
        if age > max_age_s:
            raise _fail("ts", f"{snap.ts!r} is {age:.1f} s old (limit {max_age_s:g} s)", "stale")
    return snap


_RAW_TYPES = (bytes, bytearray, memoryview, str)
_KNOWN_DEPTH = 4  # snapshot object > gpus array > GPU object > xid array


def _size(raw: bytes | bytearray | memoryview | str) -> int:
    return raw.nbytes if isinstance(raw, memoryview) else len(raw)


def _parse(raw: bytes | bytearray | memoryview | str | None, max_bytes: int) -> Any:
    """orjson.loads with the size limit; every failure becomes a DecodeError."""
    if raw is None:
        raise _fail("", "empty message: the value is null (a Kafka tombstone?)", "json")
    if not isinstance(raw, _RAW_TYPES):
        raise TypeError(f"expected bytes, bytearray, memoryview or str, got {type(raw).__name__}")
    size = _size(raw)
    if size > max_bytes:
        raise _fail("", f"message is {size} bytes, over the {max_bytes}-byte limit", "size")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if not isinstance(raw, str):
            try:
                bytes(raw).decode("utf-8")
            except UnicodeDecodeError as bad:
                raise _fail("", f"invalid UTF-8 at byte {bad.start}: {bad.reason}", "json") from None
        raise _fail("", f"invalid JSON: {exc}", "json") from None


def decode_snapshot(raw: bytes | bytearray | memoryview | str | None, *, now: float | None = None,
                    max_future_s: float = 300.0, max_age_s: float | None = None,
                    max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH) -> Snapshot:
    """Parses and validates one `gpuwatch.samples/1` message (a Kafka value) into a columnar Snapshot.

    With `now` (unix seconds), a `ts` more than `max_future_s` ahead of it is rejected (kind "future");
    with `max_age_s`, a `ts` older than that before `now` (default: the wall clock) is rejected ("stale").
    Raises DecodeError for anything else the contract forbids; a None value (tombstone) is a DecodeError too.
    """
    snap = None
    if isinstance(raw, (bytes, bytearray, memoryview, str)) and _size(raw) <= max_bytes and max_depth >= _KNOWN_DEPTH:
        snap = _typed(raw)
    if snap is None:
        return _snapshot(_parse(raw, max_bytes), now, max_future_s, max_age_s, max_depth, True)
    return _check_time(snap, now, max_future_s, max_age_s)


class _Head(msgspec.Struct, gc=False):
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HOST_LEN)]
    ts: Annotated[float, msgspec.Meta(ge=0, le=_FMAX)]


_HEAD = msgspec.json.Decoder(_Head)  # unknown fields (the GPUs) are skipped, not built


_HEAD_PREFIX = f'{{"schema":"{SAMPLES_SCHEMA}","host":"'.encode()
_HEAD_TS = b'","ts":'


def snapshot_head(raw: bytes | bytearray | memoryview | str) -> tuple[str, float] | None:
    """`host` and `ts` of a snapshot message by a light parse that skips the GPUs, or None where it cannot read
    them (`decode_snapshot` then decides: it may still accept the message on its slow path).

    For routing and batching before the full decode (`gpuwatch score --workers`). A head is a claim, not a
    check: the message may still break the contract elsewhere (or repeat a key), so whoever decodes it in full
    must compare. The usual message, as agents and the simulator write it, starts with schema, host and ts; their
    bytes are read directly. Anything else goes through msgspec, skipping the rest of the message.
    """
    if _size(raw) > MAX_MESSAGE_BYTES:
        return None
    if isinstance(raw, bytes) and raw.startswith(_HEAD_PREFIX):
        start = len(_HEAD_PREFIX)
        end = raw.find(_HEAD_TS, start)  # a JSON string holds no bare quote: this ends the host
        comma = raw.find(b",", end + len(_HEAD_TS)) if end > start else -1
        if 0 < comma and b"\\" not in raw[start:end] and end - start <= MAX_HOST_LEN:
            try:
                ts = float(raw[end + len(_HEAD_TS) : comma])
                if 0 <= ts <= _FMAX:
                    return raw[start:end].decode(), ts
            except (ValueError, UnicodeDecodeError):
                pass
    try:
        head = _HEAD.decode(raw)
    except Exception:  # noqa: BLE001 - msgspec's errors, UnicodeDecodeError, ...: the full decode decides
        return None
    return head.host, head.ts


def decode_snapshot_dict(obj: Any, *, now: float | None = None, max_future_s: float = 300.0,
                         max_age_s: float | None = None, max_depth: int = MAX_DEPTH) -> Snapshot:
    """Like `decode_snapshot` for an already-parsed object (a JSONL line read with json/orjson).

    Values must be plain JSON types (dict, list, str, int, float, bool, None); NaN and infinity are rejected.
    """
    return _snapshot(obj, now, max_future_s, max_age_s, max_depth, False)


def _dumps(obj: Any, tag: str) -> bytes:
    try:
        return orjson.dumps(obj, option=_OPTS)
    except orjson.JSONEncodeError as exc:
        raise EncodeError(f"cannot encode {tag} record: {exc}", kind="type") from None


def _encode(rec: Any, tag: str, check: Callable[[bytes], Any]) -> bytes:
    if not isinstance(rec, dict):
        raise EncodeError(f"cannot encode {tag} record: expected a dict, got {type(rec).__name__}", kind="type")
    raw = _dumps(rec if "schema" in rec else {"schema": tag, **rec}, tag)
    try:
        check(raw)
    except DecodeError as exc:
        raise EncodeError(f"invalid {tag} record: {exc.reason} (NaN and infinity are written as null)"
                          if "got null" in exc.reason else f"invalid {tag} record: {exc.reason}",
                          path=exc.path, kind=exc.kind) from None
    return raw


def encode_snapshot(snapshot_dict: dict) -> bytes:
    """Serialises a node snapshot dict (numpy scalars allowed) after validating it as `decode_snapshot` would.

    Adds `"schema": "gpuwatch.samples/1"` when absent. NaN floats are written as null, which the contract
    reads as "unknown". Raises EncodeError if the result would be rejected by consumers.
    """
    return _encode(snapshot_dict, SAMPLES_SCHEMA, decode_snapshot)


# ---------------------------------------------------------------- risk, remediation, dead-letter

_Checks = tuple[tuple[str, Callable[[Any, str], Any]], ...]
_host = partial(_check_str, lo=1, hi=MAX_HOST_LEN)
_gpu_index = partial(_check_int, lo=0, hi=MAX_GPU_INDEX)
_time = partial(_check_number, lo=0)
_unit = partial(_check_number, lo=0, hi=1)

_RISK: _Checks = (
    ("host", _host), ("gpu_index", _gpu_index), ("uuid", _check_str), ("ts", _time), ("risk", _unit),
    ("horizon_s", partial(_check_number, lo=0, lo_exclusive=True)),
    ("mode", partial(_check_enum, choices=FAILURE_MODES)), ("model", partial(_check_str, lo=1)),
    ("scored_at", _time),
)
_RISK_OPTIONAL: _Checks = (
    ("alarm", _check_bool), ("drain", _check_bool), ("failed", _check_bool), ("failed_since", _time),
    ("op", _check_str), ("score", _unit), ("history_s", partial(_check_number, lo=0)),
)
_REMEDIATION: _Checks = (
    ("id", partial(_check_str, lo=1, hi=128)), ("host", _host), ("gpu_index", _gpu_index),
    ("uuid", _check_str), ("action", partial(_check_enum, choices=ACTIONS)), ("reason", _check_str),
    ("risk", _unit), ("ts", _time),
)

_OUTCOME: _Checks = (
    ("id", partial(_check_str, lo=1, hi=128)), ("host", _host), ("gpu_index", _gpu_index),
    ("uuid", _check_str), ("action", partial(_check_enum, choices=ACTIONS)), ("risk", _unit),
    ("event_ts", _time), ("executor", _check_str), ("ok", _check_bool), ("dry_run", _check_bool),
    ("detail", _check_str), ("started_at", _time), ("duration_s", partial(_check_number, lo=0)),
)


def _check_source(value: Any, path: str) -> dict:
    if type(value) is not dict:
        raise _fail(path, f"expected object, got {_describe(value)}", "type")
    return {**value, "topic": _check_str(_need(value, "topic", path), path + ".topic"),
            "partition": _check_int(_need(value, "partition", path), path + ".partition", -(2**31), 2**31 - 1),
            "offset": _check_int(_need(value, "offset", path), path + ".offset", -MAX_INT64 - 1, MAX_INT64)}


def _check_b64(value: Any, path: str) -> str:
    try:
        base64.b64decode(_check_str(value, path), validate=True)
    except binascii.Error as exc:
        raise _fail(path, f"not valid base64: {exc}", "type") from None
    return value


_DEADLETTER: _Checks = (
    ("error", _check_str), ("source", _check_source), ("original_b64", _check_b64), ("failed_at", _time),
    ("stage", partial(_check_str, lo=1)),
)
_DEADLETTER_OPTIONAL: _Checks = (
    ("original_size", partial(_check_int, lo=0, hi=MAX_INT64)), ("original_truncated", _check_bool),
)


def _decode_record(raw: Any, tag: str, checks: _Checks, optional: _Checks = (),
                   max_bytes: int = MAX_MESSAGE_BYTES) -> dict:
    obj = _parse(raw, max_bytes)
    if type(obj) is not dict:
        raise _fail("", f"expected a JSON object at top level, got {_describe(obj)}", "type")
    _check_tag(obj, tag)
    for name, check in checks:
        obj[name] = check(_need(obj, name, ""), name)
    for name, check in optional:
        if name in obj:
            obj[name] = check(obj[name], name)
    known = frozenset(name for name, _ in checks + optional) | {"schema"}
    _check_extras_depth(obj, known, "", MAX_DEPTH - 1)
    return obj


def decode_risk(raw: bytes | bytearray | memoryview | str) -> dict:
    """Parses and validates one `gpuwatch.risk/1` message; returns the dict (unknown fields kept)."""
    return _decode_record(raw, RISK_SCHEMA, _RISK, _RISK_OPTIONAL)


def encode_risk(rec: dict) -> bytes:
    """Serialises a risk record (numpy scalars allowed; `schema` added when absent); raises EncodeError if invalid."""
    return _encode(rec, RISK_SCHEMA, decode_risk)


def decode_remediation(raw: bytes | bytearray | memoryview | str) -> dict:
    """Parses and validates one `gpuwatch.remediation/1` message; returns the dict (unknown fields kept)."""
    return _decode_record(raw, REMEDIATION_SCHEMA, _REMEDIATION)


def encode_remediation(rec: dict) -> bytes:
    """Serialises a remediation command (`schema` added when absent); raises EncodeError if invalid."""
    return _encode(rec, REMEDIATION_SCHEMA, decode_remediation)


def decode_outcome(raw: bytes | bytearray | memoryview | str) -> dict:
    """Parses and validates one `gpuwatch.outcome/1` message (the controller's); returns the dict."""
    return _decode_record(raw, OUTCOME_SCHEMA, _OUTCOME)


def remediation_id(host: str, gpu_index: int, uuid: str, action: str, episode_ts: float) -> str:
    """Deterministic 16-hex-digit id of one remediation, so a retried or replayed command can be de-duplicated.

    sha256 of the UTF-8 bytes of host, gpu_index, uuid, action and round(episode_ts * 1000) (an integer,
    milliseconds) joined by U+001F; `episode_ts` is when the risk episode began, so one episode -> one id.
    """
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    key = "\x1f".join((host, str(int(gpu_index)), uuid, action, str(round(float(episode_ts) * 1000))))
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def make_deadletter(raw: bytes | bytearray | memoryview | str | None, error: str, *, topic: str,
                    partition: int, offset: int, stage: str, failed_at: float | None = None,
                    max_original: int = MAX_DEADLETTER_ORIGINAL) -> bytes:
    """Builds a `gpuwatch.deadletter/1` message keeping the original bytes (base64) and why they were rejected.

    `raw` may be anything a consumer received, invalid UTF-8 included; None (a tombstone) is stored as "".
    Originals longer than `max_original` bytes are cut to that length with `original_truncated: true`.
    Use partition/offset -1 when unknown (e.g. a file line number goes in `offset`, `topic` holds the path).
    """
    data = b"" if raw is None else raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else bytes(raw)
    rec = {"schema": DEADLETTER_SCHEMA, "error": _printable(error)[:4096],
           "source": {"topic": _printable(topic), "partition": int(partition), "offset": int(offset)},
           "original_b64": base64.b64encode(data[:max_original]).decode("ascii"),
           "original_size": len(data), "original_truncated": len(data) > max_original,
           "failed_at": time.time() if failed_at is None else float(failed_at), "stage": _printable(stage)}
    return orjson.dumps(rec)


def _printable(text: object) -> str:
    """str(text) with lone surrogates replaced: orjson refuses them, and dead-lettering must never fail."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def decode_deadletter(raw: bytes | bytearray | memoryview | str) -> dict:
    """Parses and validates one `gpuwatch.deadletter/1` message; `deadletter_original` gives back the bytes."""
    return _decode_record(raw, DEADLETTER_SCHEMA, _DEADLETTER, _DEADLETTER_OPTIONAL, max_bytes=4 * MAX_MESSAGE_BYTES)


def deadletter_original(rec: dict) -> bytes:
    """The original message bytes of a decoded dead-letter record (possibly truncated, see original_truncated)."""
    return base64.b64decode(rec["original_b64"], validate=True)


@cache
def _schema_text(filename: str) -> str:
    return resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")


_SCHEMA_FILES = {"samples": SAMPLES_SCHEMA, "risk": RISK_SCHEMA, "remediation": REMEDIATION_SCHEMA,
                 "deadletter": DEADLETTER_SCHEMA}


def load_schema(name: str) -> dict:
    """The JSON Schema (a fresh dict) of one contract: "samples", "risk", "remediation" or "deadletter";
    "samples.json" and the tag "gpuwatch.samples/1" work too."""
    base = name.removesuffix(".json")
    base = next((k for k, tag in _SCHEMA_FILES.items() if tag == base), base)
    if base not in _SCHEMA_FILES:
        raise ValueError(f"unknown schema {name!r}; expected one of {', '.join(_SCHEMA_FILES)}")
    return json.loads(_schema_text(base + ".json"))
