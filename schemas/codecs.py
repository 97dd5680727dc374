"""Codecs of the gpuwatch wire contracts: one encode/decode pair per record; they agree with the JSON Schema
files beside this module.

Every record but the samples is a typed msgspec Struct (records.py); `decode_*` return it, `encode_*` take it.
`decode_*` raise `DecodeError` and `encode_*` raise `EncodeError` (both `ValueError`s) whose `reason`
says what is wrong and where, e.g. ``gpus[3].temp_c: expected number or null, got string "71"``.
A message is read in one of two ways with the same result: msgspec parses and checks the usual message in one
pass in C against the struct; anything it refuses is read again by orjson and checked field by field against
the same struct's type information (`_check_struct`), which accepts exactly what the schema files accept and
names what is wrong. Every record the schema files reject is rejected here too; the codecs add the rules JSON
Schema cannot express: unique `gpu_index` within a snapshot, a message-size limit, a nesting-depth limit on the
unknown fields of a snapshot, and the optional `ts` freshness window of `decode_snapshot`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial
from importlib import resources
from itertools import chain
from operator import itemgetter
from typing import Annotated, Any, Generic, Literal, TypeVar, get_args, get_origin, get_type_hints

import msgspec
import msgspec.inspect as mi
import numpy as np
import orjson
from msgspec.structs import astuple

from .fields import (
    ACTIONS,
    ALL_COUNTERS,
    ALL_FLAGS,
    ALL_NUMERIC,
    FLAGS,
    OPTIONAL_FLAGS,
    REQUIRED_NUMERIC,
    SAMPLES_SCHEMA,
)
from .records import (
    MAX_GPU_INDEX,
    MAX_HOST_LEN,
    MAX_INT64,
    REDIS_RECORDS,
    AuditEntry,
    Command,
    CommandAck,
    DeadLetter,
    ModelControl,
    Outcome,
    Remediation,
    Risk,
    Source,
    StreamStats,
)

MAX_MESSAGE_BYTES = 1 << 20
MAX_GPUS = 64
MAX_XIDS = 64
MAX_DEPTH = 32  # containers, top-level object = 1; the known structure needs 4
MAX_XID = 2**31 - 1
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


def _check_b64(value: Any, path: str) -> str:
    try:
        base64.b64decode(_check_str(value, path), validate=True)
    except ValueError as exc:  # binascii.Error, and a non-ASCII string
        raise _fail(path, f"not valid base64: {exc}", "type") from None
    return value


# ---------------------------------------------------------------- checks derived from a struct (slow path only)

# A check of one value: (value, path, nesting depth of the value, max_depth) -> the value, 3.0 as 3 for an integer.
_Check = Callable[[Any, str, int, "int | None"], Any]


def _literal_values(hint: Any) -> tuple[str, ...]:
    """The values of the Literal inside a type hint, in the order written (msgspec.inspect sorts them)."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    for arg in get_args(hint):
        found = _literal_values(arg)
        if found:
            return found
    return ()


@cache
def _plan(cls: type) -> tuple[tuple[str, _Check, bool], ...]:
    """(wire name, check, required) of each field of the struct `cls`, built once from its type information."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    hints = get_type_hints(cls, include_extras=True)
    return tuple((f.encode_name, _compile(f.type, _literal_values(hints.get(f.name))), f.required)
                 for f in info.fields)


def _compile(t: Any, choices: tuple[str, ...] = (), nullable: bool = False) -> _Check:
    """The check of a value of the msgspec type `t` (msgspec.inspect), raising DecodeError with the reason."""
    if type(t) is mi.Metadata:  # a description
        t = t.type
    kind = type(t)
    if kind is mi.UnionType:  # the contracts' unions are "T or null"
        (t,) = (x for x in t.types if type(x) is not mi.NoneType)
        return _compile(t, choices, nullable=True)
    if kind is mi.IntType:
        lo = t.ge if t.ge is not None else t.gt + 1 if t.gt is not None else -MAX_INT64 - 1
        hi = t.le if t.le is not None else t.lt - 1 if t.lt is not None else 2**64 - 1
        return lambda v, path, depth, max_depth: _check_int(v, path, lo, hi, nullable=nullable)
    if kind is mi.FloatType:
        assert t.lt is None, "exclusive maxima are not used by the contracts"
        low, high, exclusive = t.ge if t.gt is None else t.gt, t.le, t.gt is not None
        return lambda v, path, depth, max_depth: _check_number(v, path, low, high, lo_exclusive=exclusive,
                                                               nullable=nullable)  # fmt: skip
    if kind is mi.BoolType:
        return lambda v, path, depth, max_depth: _check_bool(v, path, nullable=nullable)
    if kind is mi.StrType:
        return partial(_check_text, lo=t.min_length or 0, hi=t.max_length, nullable=nullable,
                       pattern=None if t.pattern is None else re.compile(t.pattern))
    if kind is mi.LiteralType:
        values = choices or tuple(map(str, t.values))
        return lambda v, path, depth, max_depth: (None if v is None and nullable else _check_enum(v, path, values))
    if kind is mi.BytesType:
        return lambda v, path, depth, max_depth: (None if v is None and nullable else _check_b64(v, path))
    if kind is mi.ListType:
        return partial(_check_list, item=_compile(t.item_type), lo=t.min_length or 0, hi=t.max_length)
    if kind is mi.DictType:
        return partial(_check_dict, value_check=_compile(t.value_type))
    if kind is mi.StructType:
        cls = t.cls

        def check_object(v: Any, path: str, depth: int, max_depth: int | None) -> dict | None:
            if v is None and nullable:
                return None
            if nullable and type(v) is not dict:
                raise _fail(path, f"expected object or null, got {_describe(v)}", "type")
            return _check_struct(v, cls, path, depth, max_depth)

        return check_object
    raise TypeError(f"no check for {t!r}: the contracts use numbers, text, flags, enums, bytes, lists and objects")


def _check_text(v: Any, path: str, depth: int, max_depth: int | None, *, lo: int, hi: int | None, nullable: bool,
                pattern: re.Pattern[str] | None) -> str | None:
    if v is None and nullable:
        return None
    if type(v) is not str:
        raise _fail(path, f"expected {'string or null' if nullable else 'string'}, got {_describe(v)}", "type")
    _check_str(v, path, lo, hi)
    if pattern is not None and not pattern.search(v):
        raise _fail(path, f"must match {pattern.pattern}, got {_describe(v)}", "range")
    return v


def _check_list(v: Any, path: str, depth: int, max_depth: int | None, *, item: _Check, lo: int,
                hi: int | None) -> list:
    if type(v) is not list:
        raise _fail(path, f"expected array, got {_describe(v)}", "type")
    if len(v) < lo or (hi is not None and len(v) > hi):
        want = f"{lo}..{hi}" if lo and hi is not None else f"at most {hi}" if hi is not None else f"at least {lo}"
        raise _fail(path, f"expected {want} entries, got {len(v)}", "range")
    return [item(x, f"{path}[{i}]", depth + 1, max_depth) for i, x in enumerate(v)]


def _check_dict(v: Any, path: str, depth: int, max_depth: int | None, *, value_check: _Check) -> dict:
    if type(v) is not dict:
        raise _fail(path, f"expected object, got {_describe(v)}", "type")
    return {k: value_check(x, _join(path, str(k)), depth + 1, max_depth) for k, x in v.items()}


def _check_struct(obj: Any, cls: type, path: str = "", depth: int = 1, max_depth: int | None = None) -> dict:
    """A copy of `obj` checked field by field against the struct `cls` (the slow path: names the first offending
    field); with `max_depth`, unknown fields may nest at most that many containers counting from the top."""
    if type(obj) is not dict:
        raise _fail(path, f"expected {'a JSON object at top level' if not path else 'object'}, "
                          f"got {_describe(obj)}", "type")
    out = dict(obj)
    plan = _plan(cls)
    prefix = path + "." if path else ""
    for name, check, required in plan:
        if name == "schema":
            continue  # the tag: `_check_tag` reads it first
        value = obj.get(name, _MISSING)
        if value is not _MISSING:
            out[name] = check(value, prefix + name, depth + 1, max_depth)
        elif required:
            raise _fail(prefix + name, "missing required field", "missing")
    if max_depth is not None:
        _check_extras_depth(obj, _known(cls), path, max_depth - depth)
    return out


@cache
def _known(cls: type) -> frozenset[str]:
    return frozenset(name for name, *_ in _plan(cls)) | {"schema"}


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


# The typed definition of a `gpuwatch.samples/1` message, built from fields.py. Field order is the tuple `astuple`
# returns: numbers, flags, then the per-GPU metadata. Unknown fields are refused here (they take the slow path,
# which checks their nesting depth); the schema file allows them.
GpuSampleMessage = msgspec.defstruct(
    "GpuSampleMessage",
    [_gpu_field(f) for f in ALL_NUMERIC + ALL_FLAGS] + [
        ("gpu_index", Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_INDEX)]), ("uuid", str),
        ("throttle_reasons", _I64 | None), ("xid", Annotated[list[_XidCode], msgspec.Meta(max_length=MAX_XIDS)]),
    ],
    kw_only=True, forbid_unknown_fields=True, gc=False,
)
SamplesMessage = msgspec.defstruct(
    "SamplesMessage",
    [("schema", str), ("host", Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_HOST_LEN)]),
     ("ts", Annotated[float, msgspec.Meta(ge=0, le=_FMAX)]), ("seq", _I64),
     ("gpus", Annotated[list[GpuSampleMessage], msgspec.Meta(min_length=1, max_length=MAX_GPUS)])],  # type: ignore[valid-type]
    forbid_unknown_fields=True, gc=False,
)
_TYPED = msgspec.json.Decoder(SamplesMessage)
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


def _explain(obj: Any, max_depth: int) -> dict:
    """Slow pass: raises DecodeError naming the first offending field; returns the snapshot with integers written
    as 3.0 turned into ints (JSON Schema allows both) if it is valid."""
    if type(obj) is not dict:
        raise _fail("", f"expected a JSON object at top level, got {_describe(obj)}", "type")
    _check_tag(obj, SAMPLES_SCHEMA)
    fixed = _check_struct(obj, SamplesMessage, "", 1, max_depth)
    seen: dict[int, int] = {}
    for i, g in enumerate(fixed["gpus"]):
        idx = g["gpu_index"]
        if idx in seen:
            raise _fail(f"gpus[{i}].gpu_index", f"duplicate gpu_index {idx} (also at gpus[{seen[idx]}])", "duplicate")
        seen[idx] = i
    return fixed


def _snapshot(obj: Any, now: float | None, max_future_s: float, max_age_s: float | None, max_depth: int,
              from_json: bool) -> Snapshot:
    snap = _fast(obj, max_depth, from_json)
    if snap is None:
        snap = _fast(_explain(obj, max_depth), max_depth, from_json)
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


# ---------------------------------------------------------------- the typed records (records.py)

R = TypeVar("R", bound=msgspec.Struct)
Raw = bytes | bytearray | memoryview | str  # a Kafka message value, or a line of a file


def _plain(obj: Any) -> Any:
    """msgspec's encoder hook: numpy scalars (np.float32(0.5), np.int64(3), np.bool_) as the Python value."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode objects of type {type(obj).__name__}")


_ENCODER = msgspec.json.Encoder(enc_hook=_plain)


class _Codec(Generic[R]):
    """Encodes and decodes one record type: msgspec in one C pass for the usual message, and where that refuses a
    message, orjson plus `_check_struct`, which names the reason (and accepts 3.0 for an integer, as the schema
    file does)."""

    def __init__(self, cls: type[R], max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.cls = cls
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType) and isinstance(info.tag, str)
        self.tag: str = info.tag
        self.max_bytes = max_bytes
        self._decoder = msgspec.json.Decoder(cls)
        # msgspec accepts a tagged struct whose tag is absent: the fast path takes only messages that start with it
        self._prefix = f'{{"schema":"{self.tag}"'.encode()

    def decode(self, raw: Raw | None) -> R:
        if type(raw) is bytes and raw.startswith(self._prefix) and len(raw) <= self.max_bytes:
            try:
                return self._decoder.decode(raw)
            except Exception:  # noqa: BLE001 - msgspec's errors, RecursionError, ...: the slow path names the reason
                pass
        return self.from_builtins(_parse(raw, self.max_bytes))

    def from_builtins(self, obj: Any) -> R:
        """The record of an already-parsed JSON object (a dict as orjson or json return it)."""
        if type(obj) is not dict:
            raise _fail("", f"expected a JSON object at top level, got {_describe(obj)}", "type")
        _check_tag(obj, self.tag)
        fixed = _check_struct(obj, self.cls)
        try:
            return msgspec.convert(fixed, self.cls)
        except msgspec.ValidationError as exc:
            raise _fail("", f"{exc}; the field checks found no reason (a bug in gpuwatch.schemas.codecs)",
                        "internal") from None

    def encode(self, rec: R, *, validate: bool = True) -> bytes:
        if type(rec) is not self.cls:
            raise EncodeError(f"cannot encode {self.tag} record: expected {self.cls.__name__}, "
                              f"got {type(rec).__name__}", kind="type")
        try:
            raw = _ENCODER.encode(rec)
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"cannot encode {self.tag} record: {exc}", kind="type") from None
        if validate:
            try:
                self.decode(raw)
            except DecodeError as exc:
                hint = " (NaN and infinity are written as null)" if "got null" in exc.reason else ""
                raise EncodeError(f"invalid {self.tag} record: {exc.reason}{hint}", path=exc.path,
                                  kind=exc.kind) from None
        return raw


_RISK = _Codec(Risk)
_REMEDIATION = _Codec(Remediation)
_OUTCOME = _Codec(Outcome)
_COMMAND = _Codec(Command)
_COMMAND_ACK = _Codec(CommandAck)
_DEADLETTER = _Codec(DeadLetter, max_bytes=4 * MAX_MESSAGE_BYTES)
_STATS = _Codec(StreamStats)
_AUDIT = _Codec(AuditEntry)
_MODEL_CONTROL = _Codec(ModelControl)
def decode_risk(raw: Raw | None) -> Risk:
    """Parses and validates one `gpuwatch.risk/1` message."""
    return _RISK.decode(raw)


def encode_risk(rec: Risk, *, validate: bool = True) -> bytes:
    """Serialises a risk record; raises EncodeError if a reader would reject it. `validate=False` skips that check
    (the stream worker's per-record path, whose values come from decoded samples and the model)."""
    return _RISK.encode(rec, validate=validate)


def decode_remediation(raw: Raw | None) -> Remediation:
    """Parses and validates one `gpuwatch.remediation/1` message."""
    return _REMEDIATION.decode(raw)


def encode_remediation(rec: Remediation) -> bytes:
    """Serialises a remediation command; raises EncodeError if a reader would reject it."""
    return _REMEDIATION.encode(rec)


def decode_audit(raw: Raw | None) -> AuditEntry:
    """Parses and validates one `gpuwatch.audit/1` entry (the ``json`` field of a ``gpuwatch:audit`` entry)."""
    return _AUDIT.decode(raw)


def encode_audit(rec: AuditEntry) -> bytes:
    """Serialises an audit entry; raises EncodeError if a reader would reject it."""
    return _AUDIT.encode(rec)


def decode_outcome(raw: Raw | None) -> Outcome:
    """Parses and validates one `gpuwatch.outcome/1` message."""
    return _OUTCOME.decode(raw)


def encode_outcome(rec: Outcome) -> bytes:
    """Serialises an outcome record; raises EncodeError if a reader would reject it."""
    return _OUTCOME.encode(rec)


def decode_command(raw: Raw | None) -> Command:
    """Parses and validates one `gpuwatch.command/1` message (its fields; `gpuwatch.signing.verify` checks the
    signature, on the parsed object, so that no field can be added either)."""
    return _COMMAND.decode(raw)


def command_from_builtins(obj: Any) -> Command:
    """Like `decode_command` for an already-parsed JSON object (the agent parses once to verify the signature)."""
    return _COMMAND.from_builtins(obj)


def encode_command(rec: Command) -> bytes:
    """Serialises a signed agent command; raises EncodeError if a reader would reject it."""
    return _COMMAND.encode(rec)


def decode_command_ack(raw: Raw | None) -> CommandAck:
    """Parses and validates one `gpuwatch.command_ack/1` message."""
    return _COMMAND_ACK.decode(raw)


def encode_command_ack(rec: CommandAck) -> bytes:
    """Serialises a command acknowledgement; raises EncodeError if a reader would reject it."""
    return _COMMAND_ACK.encode(rec)


STATS_PREFIX = "STATS "


def encode_stats_line(stats: StreamStats) -> str:
    """The ``STATS {json}`` line (no newline) a stream worker prints on its stdout."""
    return STATS_PREFIX + _STATS.encode(stats).decode()


def decode_stats_line(line: bytes | str) -> StreamStats | None:
    """The stats of a ``STATS {json}`` line (text in front of ``STATS `` is ignored), or None for any other line.
    Raises DecodeError for a stats line that breaks the `gpuwatch.stats/1` contract."""
    raw = line.encode("utf-8", "surrogateescape") if isinstance(line, str) else bytes(line)
    at = raw.find(STATS_PREFIX.encode())
    if at < 0:
        return None
    return _STATS.decode(raw[at + len(STATS_PREFIX):].strip())


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
    rec = DeadLetter(error=_printable(error)[:4096],
                     source=Source(topic=_printable(topic), partition=int(partition), offset=int(offset)),
                     original=data[:max_original], original_size=len(data), original_truncated=len(data) > max_original,
                     failed_at=time.time() if failed_at is None else float(failed_at), stage=_printable(stage))
    return _DEADLETTER.encode(rec, validate=False)  # built here from checked parts; dead-lettering must never fail


def _printable(text: object) -> str:
    """str(text) with lone surrogates replaced: no encoder writes them, and dead-lettering must never fail."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def decode_model_control(raw: Raw | None) -> ModelControl:
    """Parses and validates one `gpuwatch.model_control/1` message."""
    return _MODEL_CONTROL.decode(raw)


def encode_model_control(rec: ModelControl) -> bytes:
    """Serialises a model control message; raises EncodeError if a reader would reject it."""
    return _MODEL_CONTROL.encode(rec)


def decode_deadletter(raw: Raw | None) -> DeadLetter:
    """Parses and validates one `gpuwatch.deadletter/1` message; `.original` holds the original bytes."""
    return _DEADLETTER.decode(raw)


@cache
def _schema_text(filename: str) -> str:
    return resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")


# file name (without .json) -> contract tag
SCHEMA_FILES = {"samples": SAMPLES_SCHEMA, **{name: codec.tag for name, codec in (
    ("risk", _RISK), ("remediation", _REMEDIATION), ("outcome", _OUTCOME), ("command", _COMMAND),
    ("command_ack", _COMMAND_ACK), ("deadletter", _DEADLETTER), ("stats", _STATS), ("audit", _AUDIT),
    ("model_control", _MODEL_CONTROL))}}
# contract tag -> the typed record (samples: the struct `decode_snapshot` reads the usual message with)
STRUCTS: dict[str, type[msgspec.Struct]] = {SAMPLES_SCHEMA: SamplesMessage, **{codec.tag: codec.cls for codec in (
    _RISK, _REMEDIATION, _OUTCOME, _COMMAND, _COMMAND_ACK, _DEADLETTER, _STATS, _AUDIT, _MODEL_CONTROL)}}


def load_schema(name: str) -> dict:
    """The JSON Schema (a fresh dict) of one contract: "samples", "risk", "remediation", "outcome", "command",
    "command_ack", "deadletter", "stats", "audit" or "model_control"; "samples.json" and the tag
    "gpuwatch.samples/1" work too. The Redis records (records.REDIS_RECORDS, untagged) by file name: "gpu_risk",
    "host_risk", "fleet_gpu", "claim"."""
    base = name.removesuffix(".json")
    base = next((k for k, tag in SCHEMA_FILES.items() if tag == base), base)
    if base not in SCHEMA_FILES and base not in REDIS_RECORDS:
        raise ValueError(f"unknown schema {name!r}; expected one of {', '.join([*SCHEMA_FILES, *REDIS_RECORDS])}")
    return json.loads(_schema_text(base + ".json"))
