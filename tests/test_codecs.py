"""Codecs of the wire contracts: valid input decodes, every kind of corruption is a DecodeError with a reason
that names the field, and the JSON Schema files reject the same corruptions where they can express them."""

from __future__ import annotations

import base64
import copy
import json

import jsonschema
import msgspec
import msgspec.inspect
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuwatch.schemas import codecs
from gpuwatch.schemas.bench import bench_codecs, bench_decode, example_snapshot
from gpuwatch.schemas.codecs import DecodeError, EncodeError, decode_snapshot, decode_snapshot_dict
from gpuwatch.schemas.fields import (
    ACTIONS,
    ALL_FLAGS,
    ALL_NUMERIC,
    OPTIONAL_GAUGES,
    RISK_SCHEMA,
    SAMPLES_SCHEMA,
)
from gpuwatch.schemas.records import Remediation, Risk, Source, StreamStats

SAMPLES = jsonschema.Draft202012Validator(codecs.load_schema("samples"))
TS = 1_700_000_000.0


def snap(n_gpus: int = 8, seed: int = 1) -> dict:
    return example_snapshot(n_gpus, seed, ts=TS)


def schema_accepts(raw: bytes) -> bool:
    """What a JSON Schema user sees: Python's json reads 1e999 as inf and -Infinity as -inf, which the schema rejects."""
    return SAMPLES.is_valid(json.loads(raw))


# ---------------------------------------------------------------- valid snapshots


def test_decodes_columnar_snapshot() -> None:
    obj = snap(4)
    obj["gpus"][2].update({"temp_c": None, "lost": None, "throttle_reasons": None, "xid": [79, 48]})
    del obj["gpus"][1]["util_mem_pct"]
    s = decode_snapshot(orjson.dumps(obj))
    assert (s.host, s.ts, s.seq) == ("node-0001", TS, 0)
    assert s.gpu_index.dtype == np.int64 and s.gpu_index.tolist() == [0, 1, 2, 3]
    assert s.numeric.dtype == np.float64 and s.numeric.shape == (4, len(ALL_NUMERIC))
    assert s.flags.dtype == np.bool_ and s.flags.shape == (4, len(ALL_FLAGS))
    assert s.numeric[0, ALL_NUMERIC.index("power_w")] == obj["gpus"][0]["power_w"]
    assert np.isnan(s.numeric[2, ALL_NUMERIC.index("temp_c")])  # null -> NaN
    assert np.isnan(s.numeric[1, ALL_NUMERIC.index("util_mem_pct")])  # absent optional -> NaN
    assert np.isnan(s.numeric[:, ALL_NUMERIC.index("fan_pct")]).all()
    assert not s.flags[2, ALL_FLAGS.index("lost")]  # null -> False
    assert s.throttle.dtype == np.int64 and s.throttle[2] == 0  # null -> 0
    assert s.xids[2] == [79, 48] and s.uuids == [g["uuid"] for g in obj["gpus"]]


def test_flags_and_counters_values() -> None:
    obj = snap(2)
    obj["gpus"][1].update({"remap_pending": True, "ecc_dbe_volatile": 3, "throttle_reasons": 0x48})
    s = decode_snapshot(orjson.dumps(obj))
    assert s.flags[1, ALL_FLAGS.index("remap_pending")] and not s.flags[0, ALL_FLAGS.index("remap_pending")]
    assert s.numeric[1, ALL_NUMERIC.index("ecc_dbe_volatile")] == 3.0 and s.throttle[1] == 0x48


def test_minimal_and_lost_gpu_accepted() -> None:
    obj = example_snapshot(1, optional=False)
    obj["gpus"][0].update({k: None for k in ALL_NUMERIC if k in obj["gpus"][0]})
    obj["gpus"][0].update({"lost": True, "throttle_reasons": None})
    raw = orjson.dumps(obj)
    s = decode_snapshot(raw)
    assert np.isnan(s.numeric).all() and s.flags[0, ALL_FLAGS.index("lost")]
    assert schema_accepts(raw)


def test_64_gpus_and_unknown_fields_accepted() -> None:
    obj = snap(64)
    obj["region"] = {"dc": "eu-1", "racks": [[1, 2], [3]]}
    obj["gpus"][5]["nvlink"] = {"links": [{"id": 0, "state": "up"}]}
    obj["gpus"][6]["new_gauge"] = 1.5
    raw = orjson.dumps(obj)
    assert decode_snapshot(raw).numeric.shape == (64, len(ALL_NUMERIC))
    assert decode_snapshot_dict(json.loads(raw)).gpu_index[-1] == 63
    assert schema_accepts(raw)


def test_integral_floats_count_as_integers_like_json_schema() -> None:
    obj = snap(2)
    obj["seq"] = 7.0
    obj["gpus"][1].update({"gpu_index": 5.0, "throttle_reasons": 4.0, "xid": [31.0]})
    raw = orjson.dumps(obj)
    s = decode_snapshot(raw)
    assert s.seq == 7 and type(s.seq) is int and s.gpu_index.tolist() == [0, 5] and s.xids[1] == [31]
    assert schema_accepts(raw)


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, lambda b: b.decode()])
def test_accepts_any_buffer(kind) -> None:
    assert decode_snapshot(kind(orjson.dumps(snap(2)))).host == "node-0001"


def test_freshness_window() -> None:
    raw = orjson.dumps(snap(1))
    assert decode_snapshot(raw, now=TS - 299).ts == TS
    assert decode_snapshot(raw, now=TS + 50, max_age_s=60).ts == TS
    with pytest.raises(DecodeError, match=r"^ts: .* s in the future \(limit 300 s\)") as err:
        decode_snapshot(raw, now=TS - 400)
    assert err.value.kind == "future" and err.value.path == "ts"
    with pytest.raises(DecodeError, match=r"^ts: .* 120.0 s old \(limit 60 s\)") as err:
        decode_snapshot(raw, now=TS + 120, max_age_s=60)
    assert err.value.kind == "stale"
    with pytest.raises(DecodeError, match="old"):
        decode_snapshot(raw, max_age_s=60)  # the wall clock is long past 2023


def test_decode_snapshot_dict_rejects_non_json_floats() -> None:
    for bad in (float("nan"), float("inf"), 10**400):
        obj = snap(2)
        obj["gpus"][1]["power_w"] = bad
        with pytest.raises(DecodeError, match=r"^gpus\[1\]\.power_w: must be a finite number") as err:
            decode_snapshot_dict(obj)
        assert err.value.kind == "range"


# ---------------------------------------------------------------- corruptions


def _set(path: str, value):
    """Mutation: set obj[...] along a dotted path with [i] indices; value _DEL deletes the key."""
    def mutate(obj: dict) -> None:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        for p in parents:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        if value is _DEL:
            del obj[last]
        else:
            obj[int(last) if last.isdigit() else last] = copy.deepcopy(value)
    return mutate


_DEL = object()


def _nest(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# (mutation, kind, reason, whether the JSON Schema can reject it too)
CORRUPTIONS = {
    "wrong type": (_set("gpus[3].temp_c", "hot"), "type", 'gpus[3].temp_c: expected number or null, got string "hot"', True),
    "numeric string": (_set("gpus[0].power_w", "71.5"), "type", "gpus[0].power_w: expected number or null, got string", True),
    "bool as number": (_set("gpus[2].ecc_dbe_volatile", True), "type", "expected number or null, got boolean true", True),
    "number as flag": (_set("gpus[1].lost", 1), "type", "gpus[1].lost: expected boolean or null, got integer 1", True),
    "list as number": (_set("gpus[1].sm_clock_mhz", [1]), "type", "gpus[1].sm_clock_mhz: expected number or null, got array", True),
    "optional wrong type": (_set("gpus[0].pcie_link_gen", "5"), "type", "gpus[0].pcie_link_gen: expected number", True),
    "optional flag wrong": (_set("gpus[0].retired_pages_pending", 0), "type", "retired_pages_pending: expected boolean", True),
    "missing host": (_set("host", _DEL), "missing", "host: missing required field", True),
    "missing schema": (_set("schema", _DEL), "missing", "schema: missing required field", True),
    "missing gpu field": (_set("gpus[5].nvlink_crc_errors", _DEL), "missing", "gpus[5].nvlink_crc_errors: missing required field", True),
    "missing flag": (_set("gpus[7].remap_failure", _DEL), "missing", "gpus[7].remap_failure: missing required field", True),
    "missing xid": (_set("gpus[0].xid", _DEL), "missing", "gpus[0].xid: missing required field", True),
    "negative counter": (_set("gpus[4].ecc_sbe_volatile", -1), "range", "gpus[4].ecc_sbe_volatile: must be >= 0, got -1", True),
    "negative optional counter": (_set("gpus[0].power_violation_us", -0.5), "range", "power_violation_us: must be >= 0", True),
    "too many gpus": (lambda o: o["gpus"].extend({**g, "gpu_index": 8 + i} for i, g in enumerate(o["gpus"] * 8)),
                      "range", "gpus: expected 1..64 entries, got 72", True),
    "no gpus": (_set("gpus", []), "range", "gpus: expected 1..64 entries, got 0", True),
    "gpus not a list": (_set("gpus", {"0": {}}), "type", "gpus: expected array, got object", True),
    "gpu not an object": (_set("gpus[2]", [1, 2]), "type", "gpus[2]: expected object, got array", True),
    "too many xids": (_set("gpus[0].xid", list(range(65))), "range", "gpus[0].xid: expected at most 64 entries, got 65", True),
    "xid not int": (_set("gpus[1].xid", [48, "63"]), "type", 'gpus[1].xid[1]: expected integer, got string "63"', True),
    "xid null": (_set("gpus[1].xid", None), "type", "gpus[1].xid: expected array, got null", True),
    "xid negative": (_set("gpus[1].xid", [-48]), "range", "gpus[1].xid[0]: must be between 0 and", True),
    "throttle string": (_set("gpus[0].throttle_reasons", "0x4"), "type", "throttle_reasons: expected integer or null", True),
    "throttle fraction": (_set("gpus[0].throttle_reasons", 4.5), "type", "throttle_reasons: expected integer or null, got number 4.5", True),
    "negative gpu_index": (_set("gpus[0].gpu_index", -1), "range", "gpus[0].gpu_index: must be between 0 and", True),
    "gpu_index bool": (_set("gpus[0].gpu_index", False), "type", "gpus[0].gpu_index: expected integer, got boolean false", True),
    "uuid number": (_set("gpus[0].uuid", 5), "type", "gpus[0].uuid: expected string, got integer 5", True),
    "empty host": (_set("host", ""), "range", "host: must be 1..255 characters long, got 0", True),
    "long host": (_set("host", "h" * 256), "range", "host: must be 1..255 characters long, got 256", True),
    "ts string": (_set("ts", "1700000000"), "type", 'ts: expected number, got string "1700000000"', True),
    "ts negative": (_set("ts", -5), "range", "ts: must be >= 0, got -5", True),
    "seq negative": (_set("seq", -1), "range", "seq: must be between 0 and", True),
    "seq fraction": (_set("seq", 1.5), "type", "seq: expected integer, got number 1.5", True),
    "schema v2": (_set("schema", "gpuwatch.samples/2"), "version", 'schema: unsupported version "gpuwatch.samples/2"', True),
    "other schema": (_set("schema", "gpuwatch.risk/1"), "version", "schema: expected 'gpuwatch.samples/1'", True),
    "schema not str": (_set("schema", 1), "type", "schema: expected string", True),
    "duplicate gpu_index": (_set("gpus[6].gpu_index", 2), "duplicate", "gpus[6].gpu_index: duplicate gpu_index 2 (also at gpus[2])", False),
    "deep unknown field": (_set("extra", _nest(40)), "depth", "extra: nested too deeply", False),
    "deep unknown gpu field": (_set("gpus[3].extra", _nest(30)), "depth", "gpus[3].extra: nested too deeply", False),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_rejected_with_reason(name: str) -> None:
    mutate, kind, reason, schema_can = CORRUPTIONS[name]
    obj = snap(8)
    mutate(obj)
    raw = orjson.dumps(obj)
    for decode, arg in ((decode_snapshot, raw), (decode_snapshot_dict, json.loads(raw))):
        with pytest.raises(DecodeError) as err:
            decode(arg)
        assert reason in err.value.reason, err.value.reason
        assert err.value.kind == kind and str(err.value) == err.value.reason
        assert err.value.reason.startswith(err.value.path + ": " if err.value.path else "")
    assert schema_accepts(raw) is not schema_can


@pytest.mark.parametrize("text, schema_can", [(b"1e999", True), (b"-1e999", True), (b"-Infinity", True),
                                              (b"NaN", False), (b"Infinity", True)])
def test_non_finite_numbers_written_as_text(text: bytes, schema_can: bool) -> None:
    raw = orjson.dumps(snap(2)).replace(b'"power_limit_w":700.0', b'"power_limit_w":' + text, 1)
    with pytest.raises(DecodeError, match="invalid JSON") as err:
        decode_snapshot(raw)
    assert err.value.kind == "json"
    # NaN slips through JSON Schema bounds in Python (NaN > x is false) but is not JSON, so other parsers refuse it
    assert schema_accepts(raw) is not schema_can


@pytest.mark.parametrize("raw, kind, reason", [
    (b'{"schema":"gpuwatch.samples/1","host":"n\xff1"}', "json", "invalid UTF-8 at byte 40"),
    (b'{"host": "\xed\xa0\x80"}', "json", "invalid UTF-8"),  # an encoded surrogate
    (b"", "json", "invalid JSON"),
    (b'{"schema":', "json", "invalid JSON"),
    (b"[" * 5000 + b"]" * 5000, "json", "invalid JSON"),  # orjson's own depth limit
    (b"[1, 2]", "type", "expected a JSON object at top level, got array"),
    (b"null", "type", "expected a JSON object at top level, got null"),
    (b'"gpuwatch.samples/1"', "type", "got string"),
    (None, "json", "empty message: the value is null"),
])
def test_bad_bytes(raw: bytes | None, kind: str, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_snapshot(raw)
    assert err.value.kind == kind and reason in err.value.reason, err.value.reason


def test_oversized_message() -> None:
    obj = snap(8)
    obj["padding"] = "x" * (1 << 20)
    with pytest.raises(DecodeError, match=r"^message is \d+ bytes, over the 1048576-byte limit$") as err:
        decode_snapshot(orjson.dumps(obj))
    assert err.value.kind == "size"
    with pytest.raises(DecodeError, match="over the 1000-byte limit"):
        decode_snapshot(orjson.dumps(snap(8)), max_bytes=1000)


def test_depth_limit_is_a_parameter() -> None:
    obj = snap(1)
    obj["extra"] = _nest(31)  # 1 + 31 = 32 levels: the limit
    raw = orjson.dumps(obj)
    assert decode_snapshot(raw).host == "node-0001"
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode_snapshot(raw, max_depth=31)


def test_not_bytes_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="expected bytes"):
        decode_snapshot(123)  # type: ignore[arg-type]


# ---------------------------------------------------------------- fuzz

VALID = orjson.dumps(snap(3))


def _general_path(raw: bytes) -> codecs.Snapshot | None:
    """The orjson decoder that reads any valid snapshot (None: it refuses `raw`)."""
    try:
        return codecs._snapshot(codecs._parse(raw, codecs.MAX_MESSAGE_BYTES), None, 300.0, None, codecs.MAX_DEPTH,
                                True)
    except DecodeError:
        return None


def assert_paths_agree(raw: bytes) -> None:
    """msgspec's typed decoder of the usual message accepts only what the general path accepts, as the same
    Snapshot; it may hand anything else to the general path (returns None)."""
    typed = codecs._typed(raw)
    if typed is None:
        return
    general = _general_path(raw)
    assert general is not None, f"typed path accepted what the general path refuses: {raw[:200]!r}"
    assert (typed.host, typed.ts, typed.seq, typed.uuids, typed.xids) == (
        general.host, general.ts, general.seq, general.uuids, general.xids)
    assert type(typed.ts) is type(general.ts) is float and type(typed.seq) is int
    for name in ("gpu_index", "numeric", "flags", "throttle"):
        a, b = getattr(typed, name), getattr(general, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b, equal_nan=True), name
        assert np.array_equal(np.signbit(a), np.signbit(b)) if a.dtype.kind == "f" else True, name


def _decode_any(raw: bytes) -> None:
    assert_paths_agree(raw)
    try:
        decoded = decode_snapshot(raw)
    except DecodeError as exc:
        assert exc.kind != "internal", exc.reason
    else:  # the light parse reads what the full decode reads, whenever the full decode accepts
        assert codecs.snapshot_head(raw) == (decoded.host, decoded.ts)
    for decode in (codecs.decode_risk, codecs.decode_remediation, codecs.decode_deadletter):
        try:
            decode(raw)
        except DecodeError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(raw: bytes) -> None:
    _decode_any(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "cut"]), st.integers(0, len(VALID) - 1),
                          st.sampled_from(b'0123456789-+.eE"{}[],:ntfx\\ \xff\x00')), min_size=1, max_size=6))
def test_fuzz_mutated_message(edits: list) -> None:
    raw = bytearray(VALID)
    for op, pos, byte in edits:
        pos %= max(len(raw), 1)
        if op == "flip":
            raw[pos:pos + 1] = bytes([byte])
        elif op == "insert":
            raw[pos:pos] = bytes([byte])
        elif op == "delete":
            del raw[pos:pos + 1]
        else:
            del raw[pos:]
    _decode_any(bytes(raw))


_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70),
    st.sampled_from([0, -0.0, 3.0, 1e308, 2**63 - 1, 2**63, 2**64, 2**31 - 1, 2**31, "1", [], {}]),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.sampled_from(sorted(codecs._GPU_KNOWN) + ["schema", "host", "ts",
                                                                                         "seq", "extra"]),
                          _ANY_VALUE), max_size=4), st.booleans())
def test_typed_and_general_paths_agree(edits: list, drop: bool) -> None:
    """Field values of every JSON type and range, written by Python's json (ints beyond 64 bits too)."""
    doc = snap(3)
    for gpu, name, value in edits:
        target = doc if name in ("schema", "host", "ts", "seq") else doc["gpus"][gpu]
        if drop:
            target.pop(name, None)
        else:
            target[name] = value
    assert_paths_agree(json.dumps(doc).encode())


@pytest.mark.parametrize("raw, head", [
    (b'{"schema":"gpuwatch.samples/1","host":"node-7","ts":1700000001.25,"seq":1,"gpus":[]}', ("node-7", 1700000001.25)),
    (b'{"gpus":[],"ts":17,"host":"n\\u00e9","schema":"x"}', ("n\u00e9", 17.0)),  # any key order, escapes
    (b'{"schema":"gpuwatch.samples/1","host":"a\\"b","ts":1e3,"seq":1}', ('a"b', 1000.0)),
    (b'{"schema":"gpuwatch.samples/1","host":"","ts":1,"seq":1}', None),  # what decode_snapshot refuses too
    (b'{"schema":"gpuwatch.samples/1","host":"h","ts":-1,"seq":1}', None),
    (b'{"host":"h"}', None), (b"[1]", None), (b"not json", None), (b'{"host":"h","ts":"1"}', None),
])  # fmt: skip
def test_snapshot_head_reads_host_and_ts_only(raw: bytes, head: tuple[str, float] | None) -> None:
    assert codecs.snapshot_head(raw) == head


def test_typed_path_takes_the_usual_message() -> None:
    """The fast path is in use (no unknown fields, every value of its declared type) and yields what the
    general path does; `xid` lists, nulls and absent optional fields included."""
    doc = snap(8)
    doc["gpus"][0]["xid"] = [79, 48]
    doc["gpus"][1]["temp_c"] = None
    doc["gpus"][2]["throttle_reasons"] = None
    del doc["gpus"][3]["mem_clock_mhz"], doc["gpus"][3]["retired_pages_pending"]
    raw = orjson.dumps(doc)
    assert codecs._typed(raw) is not None
    assert_paths_agree(raw)
    doc["gpus"][0]["vendor_extra"] = {"a": 1}  # unknown fields: the general path decides
    assert codecs._typed(orjson.dumps(doc)) is None


# ---------------------------------------------------------------- encoders and the other contracts


def test_encode_snapshot_round_trip_and_schema_tag() -> None:
    obj = snap(3)
    del obj["schema"]
    obj["gpus"][0]["power_w"] = np.float32(250.5)
    obj["gpus"][1]["temp_c"] = float("nan")  # written as null: unknown
    obj["gpus"][2]["ecc_sbe_volatile"] = np.int64(7)
    raw = codecs.encode_snapshot(obj)
    assert orjson.loads(raw)["schema"] == SAMPLES_SCHEMA and schema_accepts(raw)
    s = decode_snapshot(raw)
    assert s.numeric[0, ALL_NUMERIC.index("power_w")] == 250.5
    assert np.isnan(s.numeric[1, ALL_NUMERIC.index("temp_c")])
    assert s.numeric[2, ALL_NUMERIC.index("ecc_sbe_volatile")] == 7


def test_encode_snapshot_rejects_invalid() -> None:
    obj = snap(2)
    obj["gpus"][1]["ecc_dbe_volatile"] = -3
    with pytest.raises(EncodeError, match=r"invalid gpuwatch.samples/1 record: gpus\[1\]\.ecc_dbe_volatile"):
        codecs.encode_snapshot(obj)
    with pytest.raises(EncodeError, match="not JSON serializable"):
        codecs.encode_snapshot({**snap(1), "x": object()})


RISK = Risk(host="node-0001", gpu_index=3, uuid="GPU-1", ts=TS, risk=0.83, horizon_s=3600.0, mode="memory",
            model="gbdt-1", scored_at=TS + 0.5)
REMEDIATION = Remediation(id="abc", host="node-0001", gpu_index=3, uuid="GPU-1", action="checkpoint",
                          reason="risk 0.83", risk=0.83, ts=TS)


@pytest.mark.parametrize("contract, rec", [("risk", RISK), ("remediation", REMEDIATION)])
def test_record_round_trip(contract: str, rec: msgspec.Struct) -> None:
    encode, decode = getattr(codecs, f"encode_{contract}"), getattr(codecs, f"decode_{contract}")
    validator = jsonschema.Draft202012Validator(codecs.load_schema(contract))
    raw = encode(rec)
    assert decode(raw) == rec and raw.startswith(b'{"schema":"gpuwatch.')  # the tag first: the fast path reads it
    validator.validate(orjson.loads(raw))
    assert decode(orjson.dumps({**orjson.loads(raw), "future_field": [1, {"a": None}]})) == rec  # unknown: ignored
    assert decode(orjson.dumps({"future_field": 1, **orjson.loads(raw)})) == rec  # the tag elsewhere: slow path
    assert decode(encode(msgspec.structs.replace(rec, risk=np.float32(0.5), gpu_index=np.int64(3)))).risk == 0.5


def test_optional_risk_fields_read_as_their_defaults() -> None:
    """A record of an older stream worker (no alarm, drain, failed, op, score) reads with the documented defaults."""
    rec = codecs.decode_risk(orjson.dumps({"schema": RISK_SCHEMA, **{k: v for k, v in msgspec.to_builtins(RISK).items()
                                                                      if k in REQUIRED_RISK}}))
    assert (rec.alarm, rec.drain, rec.failed, rec.op) == (False, False, False, "")
    assert rec.score is msgspec.UNSET and rec.failed_since is msgspec.UNSET
    assert b'"score"' not in codecs.encode_risk(rec)  # absent stays absent


REQUIRED_RISK = {f.encode_name for f in msgspec.inspect.type_info(Risk).fields if f.required}


@pytest.mark.parametrize("contract, rec, field, value, kind, reason", [
    ("risk", RISK, "risk", 1.5, "range", "risk: must be <= 1, got 1.5"),
    ("risk", RISK, "risk", float("nan"), "type", "risk: expected number, got null (NaN and infinity are written"),
    ("risk", RISK, "horizon_s", 0, "range", "horizon_s: must be > 0, got 0"),
    ("risk", RISK, "mode", "melted", "range", 'mode: expected one of none, memory, thermal, power, interconnect, sudden'),
    ("risk", RISK, "model", "", "range", "model: must be at least 1 characters long"),
    ("risk", RISK, "gpu_index", True, "type", "gpu_index: expected integer, got boolean true"),
    ("risk", RISK, "schema", "gpuwatch.risk/2", "version", "unsupported version"),
    ("risk", RISK, "scored_at", _DEL, "missing", "scored_at: missing required field"),
    ("risk", RISK, "schema", _DEL, "missing", "schema: missing required field"),
    ("remediation", REMEDIATION, "action", "format", "range", "action: expected one of " + ", ".join(ACTIONS)),
    ("remediation", REMEDIATION, "id", "", "range", "id: must be 1..128 characters long"),
    ("remediation", REMEDIATION, "risk", -0.1, "range", "risk: must be >= 0"),
    ("remediation", REMEDIATION, "reason", None, "type", "reason: expected string, got null"),
])
def test_invalid_records(contract: str, rec: msgspec.Struct, field: str, value, kind: str, reason: str) -> None:
    """A record a reader would reject is refused by the encoder and by the decoder, with a reason naming the
    field, and by the schema file."""
    if field != "schema" and value is not _DEL:  # a struct always carries its tag and every required field
        with pytest.raises(EncodeError) as err:
            getattr(codecs, f"encode_{contract}")(msgspec.structs.replace(rec, **{field: value}))
        assert reason in err.value.reason and err.value.kind == kind, err.value.reason
    bad = {k: v for k, v in {"schema": rec.__struct_config__.tag, **msgspec.to_builtins(rec)}.items() if k != field}
    if value is not _DEL:
        bad[field] = value
    raw = orjson.dumps(bad)
    with pytest.raises(DecodeError) as derr:
        getattr(codecs, f"decode_{contract}")(raw)
    assert reason.partition(" (NaN")[0] in derr.value.reason and derr.value.kind == kind, derr.value.reason
    assert derr.value.path == field
    assert not jsonschema.Draft202012Validator(codecs.load_schema(contract)).is_valid(json.loads(raw))


def test_encoders_take_only_their_record() -> None:
    with pytest.raises(EncodeError, match="expected Risk, got dict"):
        codecs.encode_risk(msgspec.to_builtins(RISK))  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="expected Remediation, got Risk"):
        codecs.encode_remediation(RISK)  # type: ignore[arg-type]


def test_remediation_id_is_deterministic() -> None:
    rid = codecs.remediation_id("node-0001", 3, "GPU-1", "migrate", TS)
    assert rid == codecs.remediation_id("node-0001", 3, "GPU-1", "migrate", TS + 0.0001)  # same millisecond
    assert len(rid) == 16 and int(rid, 16) >= 0
    variants = {codecs.remediation_id(*args) for args in [
        ("node-0002", 3, "GPU-1", "migrate", TS), ("node-0001", 4, "GPU-1", "migrate", TS),
        ("node-0001", 3, "GPU-2", "migrate", TS), ("node-0001", 3, "GPU-1", "reboot", TS),
        ("node-0001", 3, "GPU-1", "migrate", TS + 1)]}
    assert len(variants) == 5 and rid not in variants
    with pytest.raises(ValueError, match="action must be one of"):
        codecs.remediation_id("node-0001", 3, "GPU-1", "explode", TS)


@pytest.mark.parametrize("original", [orjson.dumps(snap(1)), b"\xff\xfe not utf-8 \x00", b"", None])
def test_deadletter_keeps_original_bytes(original: bytes | None) -> None:
    raw = codecs.make_deadletter(original, "gpus[3].temp_c: expected number or null, got string",
                                 topic="gpuwatch.samples", partition=2, offset=18231, stage="stream-worker")
    rec = codecs.decode_deadletter(raw)
    jsonschema.Draft202012Validator(codecs.load_schema("deadletter")).validate(orjson.loads(raw))
    assert rec.original == (original or b"")
    assert rec.source == Source(topic="gpuwatch.samples", partition=2, offset=18231)
    assert rec.stage == "stream-worker" and rec.error.startswith("gpus[3].temp_c")
    assert rec.original_size == len(original or b"") and rec.original_truncated is False


def test_deadletter_truncates_huge_originals() -> None:
    rec = codecs.decode_deadletter(codecs.make_deadletter(b"x" * 2_000_000, "too big", topic="t", partition=0,
                                                          offset=1, stage="s", failed_at=TS))
    assert rec.original_truncated is True and rec.original_size == 2_000_000 and rec.failed_at == TS
    assert rec.original == b"x" * codecs.MAX_DEADLETTER_ORIGINAL


def test_deadletter_decode_validates() -> None:
    good = orjson.loads(codecs.make_deadletter(b"x", "e", topic="t", partition=0, offset=1, stage="s"))
    for field, value, reason in [("original_b64", "***", "original_b64: not valid base64"),
                                 ("original_b64", "\x80", "original_b64: not valid base64"),  # not ASCII
                                 ("source", {"topic": "t", "partition": 0}, "source.offset: missing required field"),
                                 ("stage", "", "stage: must be at least 1 characters long")]:
        with pytest.raises(DecodeError, match=reason.replace(".", r"\.")):
            codecs.decode_deadletter(orjson.dumps({**good, field: value}))
    assert base64.b64decode(good["original_b64"]) == b"x"


def test_bench_decode_reports_throughput() -> None:
    result = bench_decode(200)
    assert result["gpu_samples_per_s"] > 0 and result["snapshots"] == 200


def test_optional_gauges_may_be_absent() -> None:
    obj = snap(2)
    for g in obj["gpus"]:
        for name in OPTIONAL_GAUGES:
            g.pop(name)
    raw = orjson.dumps(obj)
    assert np.isnan(decode_snapshot(raw).numeric[:, [ALL_NUMERIC.index(n) for n in OPTIONAL_GAUGES]]).all()
    assert schema_accepts(raw)


def test_deadletter_never_fails_on_odd_input() -> None:
    raw = codecs.make_deadletter(memoryview(b"\x00\xff"), "bad \ud800 text", topic="t\udcff", partition=-1,
                                 offset=-1, stage="offline-replay")
    rec = codecs.decode_deadletter(raw)
    assert rec.error == "bad ? text" and rec.source.topic == "t?"
    assert rec.original == b"\x00\xff"


def test_stats_lines_are_read_by_their_contract() -> None:
    stats = StreamStats(samples=80, rejected_samples=8, scored=16, deadletters=1, batches=2, partitions=4,
                        offsets={"0": 10}, refreshed=0, restored_gpus=0, checkpointed=0, uptime_s=1.5,
                        first_batch_at=TS, last_batch_at=TS + 1, gpus_tracked=16, state_bytes_per_gpu=1024)
    line = codecs.encode_stats_line(stats)
    assert line.startswith('STATS {"schema":"gpuwatch.stats/1",') and "\n" not in line
    assert codecs.decode_stats_line(line + "\n") == stats == codecs.decode_stats_line(b"\x1b[?25l" + line.encode())
    assert codecs.decode_stats_line(b"[2026-01-01 12:00:00] faust: starting\n") is None  # any other line
    with pytest.raises(DecodeError, match="samples: must be between 0 and"):
        codecs.decode_stats_line(line.replace('"samples":80', '"samples":-1'))


def test_bench_codecs_reports_every_hot_path() -> None:
    figures = bench_codecs(records=200, snapshots=20, repeat=1)
    assert all(figures[k] > 0 for k in figures if k.endswith("_us_per_record") or k.endswith("_us_per_gpu_sample"))
