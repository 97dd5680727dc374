"""The JSON Schema files: well-formed, in step with the typed records (records.py, fields.py) and the docs, and in
agreement with the codecs (generated valid records pass both; a random single-field corruption is rejected by both
or by neither, and the codec then says why)."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import msgspec.inspect as mi
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuwatch.schemas import codecs, redis_keys
from gpuwatch.schemas.codecs import DecodeError, decode_snapshot, decode_snapshot_dict
from gpuwatch.schemas.fields import (
    ACTIONS,
    ALL_COUNTERS,
    ALL_FLAGS,
    ALL_NUMERIC,
    FAILURE_MODES,
    FLAGS,
    REQUIRED_NUMERIC,
    SAMPLES_SCHEMA,
    STATS_SCHEMA,
)
from gpuwatch.schemas.records import REDIS_RECORDS

NAMES = codecs.SCHEMA_FILES  # file name -> contract tag
RECORDS = {tag: cls for tag, cls in codecs.STRUCTS.items() if tag != SAMPLES_SCHEMA}


def _decode_stats(raw: bytes) -> msgspec.Struct | None:
    return codecs.decode_stats_line(b"STATS " + raw)


DECODERS = {SAMPLES_SCHEMA: decode_snapshot, **{tag: getattr(codecs, f"decode_{name}") for name, tag in NAMES.items()
                                                 if tag not in (SAMPLES_SCHEMA, STATS_SCHEMA)},
            STATS_SCHEMA: _decode_stats}
VALIDATORS = {tag: jsonschema.Draft202012Validator(codecs.load_schema(name)) for name, tag in NAMES.items()}
SAMPLES = VALIDATORS[SAMPLES_SCHEMA]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "contracts.md"


# ---------------------------------------------------------------- the files themselves


@pytest.mark.parametrize("name", NAMES)
def test_schema_file_is_valid_2020_12_with_metadata(name: str) -> None:
    schema = codecs.load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].startswith("https://") and schema["title"] == NAMES[name]
    assert schema["properties"]["schema"]["const"] == NAMES[name]
    assert '"additionalProperties": false' not in json.dumps(schema)  # unknown fields must stay allowed
    defs = schema.get("$defs", {})
    undocumented = [name for name, node in _properties(schema) if "description" not in node
                    and "description" not in defs.get(node.get("$ref", "").rpartition("/")[2], {})]
    assert not undocumented


def _properties(node: object):
    """(name, subschema) of every entry of every `properties` keyword, at any depth."""
    if isinstance(node, dict):
        for key, child in node.items():
            if key == "properties":
                yield from child.items()
            if key != "examples":
                yield from _properties(child)
    elif isinstance(node, list):
        for child in node:
            yield from _properties(child)


def test_load_schema_accepts_file_names_and_tags() -> None:
    assert codecs.load_schema("samples.json") == codecs.load_schema(SAMPLES_SCHEMA) == codecs.load_schema("samples")
    with pytest.raises(ValueError, match="unknown schema 'nope'"):
        codecs.load_schema("nope")


# What a schema says, in one canonical form: $refs resolved, "T or null" as a type set, const as a one-value enum,
# descriptions and examples left out; what is left must be the same for the file and for the typed record.
_IGNORED = {"description", "title", "examples", "$comment", "$schema", "$id", "$defs"}
_NULL = {"type": frozenset({"null"})}
# JSON Schema cannot say "base64"; the files spell it as a pattern next to contentEncoding
BASE64_PATTERN = "^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


def canonical(node: dict, root: dict) -> dict:
    node = dict(node)
    if "$ref" in node:
        target = root
        for part in node.pop("$ref").removeprefix("#/").split("/"):
            target = target[part]
        return canonical({**target, **node}, root)
    if "anyOf" in node:
        branches = [canonical(b, root) for b in node.pop("anyOf")]
        others = [b for b in branches if b != _NULL]
        assert len(branches) == 2 and len(others) == 1, f"only 'T or null' unions are used: {branches}"
        if "type" not in others[0]:  # an enum or null
            return {**others[0], "enum": others[0]["enum"] | {None}, **canonical(node, root)}
        return {**others[0], "type": others[0]["type"] | {"null"}, **canonical(node, root)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _IGNORED:
            continue
        if key == "type":
            out[key] = frozenset([value] if isinstance(value, str) else value)
        elif key in ("const", "enum"):
            out["enum"] = frozenset([value] if key == "const" else value)
        elif key == "properties":
            out[key] = {k: canonical(v, root) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = canonical(value, root)
        elif key == "required":
            out[key] = frozenset(value)
        else:
            out[key] = value
    if out.get("contentEncoding") == "base64" and out.get("pattern") == BASE64_PATTERN:
        del out["pattern"]
    return out


def differences(struct: Any, file: Any, path: str = "") -> list[str]:
    if isinstance(struct, dict) and isinstance(file, dict):
        return [d for key in sorted(set(struct) | set(file), key=str) for d in (
            [f"{path}/{key}: only in the file: {file[key]!r}"] if key not in struct else
            [f"{path}/{key}: only in the typed record: {struct[key]!r}"] if key not in file else
            differences(struct[key], file[key], f"{path}/{key}"))]
    return [] if struct == file else [f"{path}: typed record {struct!r}, file {file!r}"]


def _drop_tag(schema: dict) -> dict:
    return {**schema, "properties": {k: v for k, v in schema["properties"].items() if k != "schema"},
            "required": schema["required"] - {"schema"}}


def _no_closed_objects(node: Any) -> Any:
    """The samples struct refuses unknown fields (they take the codec's slow path); the file allows them."""
    if isinstance(node, dict):
        return {k: _no_closed_objects(v) for k, v in node.items() if not (k == "additionalProperties" and v is False)}
    return node


@pytest.mark.parametrize("name", NAMES)
def test_schema_file_matches_typed_record(name: str) -> None:
    """Field for field: the same names, required fields, types, bounds, enums and defaults in the file as in the
    msgspec struct the codecs read and write (the struct's own JSON Schema, as msgspec derives it)."""
    tag = NAMES[name]
    derived = msgspec.json.schema(codecs.STRUCTS[tag])
    file = codecs.load_schema(name)
    struct_side = _no_closed_objects(_drop_tag(canonical(derived, derived)))
    assert differences(struct_side, _drop_tag(canonical(file, file))) == []


# ---------------------------------------------------------------- the Redis records (untagged: a hash's or a key's)

REDIS = REDIS_RECORDS  # file name -> typed record


@pytest.mark.parametrize("name", REDIS)
def test_redis_record_schema_file_matches_typed_record(name: str) -> None:
    """Each Redis record's file is valid 2020-12, documents every field, allows unknown ones, and says field for
    field what its struct says."""
    file = codecs.load_schema(name)
    jsonschema.Draft202012Validator.check_schema(file)
    assert file["$schema"] == "https://json-schema.org/draft/2020-12/schema" and file["$id"].startswith("https://")
    assert file["title"] == REDIS[name].__name__ and '"additionalProperties": false' not in json.dumps(file)
    assert all("description" in node for _, node in _properties(file))
    derived = msgspec.json.schema(REDIS[name])
    assert differences(canonical(derived, derived), canonical(file, file)) == []


def _redis_examples():
    for name in REDIS:
        for example in codecs.load_schema(name)["examples"]:
            yield f"{name}.json", name, example
    titles = {cls.__name__: name for name, cls in REDIS.items()}
    for i, (title, block) in enumerate(re.findall(r"<!-- (\w+) -->\n```json\n(.*?)```", DOCS.read_text(encoding="utf-8"),
                                                   re.S)):
        yield f"contracts.md#{title}-{i}", titles[title], json.loads(block)


@pytest.mark.parametrize("where, name, example", list(_redis_examples()), ids=lambda v: v if isinstance(v, str) else "")
def test_redis_examples_pass_schema_and_struct(where: str, name: str, example: dict) -> None:
    jsonschema.Draft202012Validator(codecs.load_schema(name)).validate(example)
    msgspec.convert(example, REDIS[name])


def test_docs_show_every_redis_record() -> None:
    assert {name for where, name, _ in _redis_examples() if where.startswith("contracts.md")} == set(REDIS)


@pytest.mark.parametrize("name", REDIS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_generated_redis_records_pass_schema_and_struct(name: str, data: st.DataObject) -> None:
    """A record drawn from the typed definition passes its schema file and reads as the same values; a claim also
    through `decode_claim`, and back through `encode_claim`."""
    obj = data.draw(record(REDIS[name]))
    jsonschema.Draft202012Validator(codecs.load_schema(name)).validate(obj)
    rec = msgspec.convert(obj, REDIS[name])
    known = {f.encode_name for f in mi.type_info(REDIS[name]).fields}
    assert _same_values(msgspec.to_builtins(rec), {k: v for k, v in obj.items() if k in known})
    if name == "claim":
        try:
            raw = orjson.dumps(obj)
        except orjson.JSONEncodeError:
            return  # an integer beyond 64 bits among the extras: orjson cannot write it
        assert redis_keys.decode_claim("K", raw) == rec == redis_keys.decode_claim("K", redis_keys.encode_claim(rec))


def test_samples_schema_matches_fields_py() -> None:
    schema = codecs.load_schema("samples")
    sample = schema["$defs"]["gpuSample"]
    assert sample["required"] == ["gpu_index", "uuid", *REQUIRED_NUMERIC, *FLAGS, "throttle_reasons", "xid"]
    props = sample["properties"]
    assert set(props) == {"gpu_index", "uuid", "throttle_reasons", "xid", *ALL_NUMERIC, *ALL_FLAGS}
    for name in ALL_NUMERIC:
        assert props[name]["$ref"] == ("#/$defs/counter" if name in ALL_COUNTERS else "#/$defs/gauge"), name
    for name in ALL_FLAGS:
        assert props[name]["$ref"] == "#/$defs/flag"
    assert schema["$defs"]["counter"]["minimum"] == 0
    assert schema["properties"]["gpus"]["maxItems"] == codecs.MAX_GPUS == props["xid"]["maxItems"]
    assert schema["$defs"]["host"]["maxLength"] == codecs.MAX_HOST_LEN


def test_enums_match_fields_py() -> None:
    assert codecs.load_schema("risk")["properties"]["mode"]["enum"] == list(FAILURE_MODES)
    assert codecs.load_schema("remediation")["properties"]["action"]["enum"] == list(ACTIONS)


def _examples():
    for name, tag in NAMES.items():
        for example in codecs.load_schema(name)["examples"]:
            yield f"{name}.json", tag, example
    for i, block in enumerate(re.findall(r"```json\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)):
        example = json.loads(block)
        if isinstance(example, dict) and example.get("schema") in DECODERS:
            yield f"contracts.md#{i}", example["schema"], example


@pytest.mark.parametrize("where, tag, example", list(_examples()), ids=lambda v: v if isinstance(v, str) else "")
def test_examples_pass_schema_and_codec(where: str, tag: str, example: dict) -> None:
    VALIDATORS[tag].validate(example)
    DECODERS[tag](orjson.dumps(example))


def test_docs_show_every_contract() -> None:
    assert {tag for where, tag, _ in _examples() if where.startswith("contracts.md")} == set(DECODERS)


# ---------------------------------------------------------------- generated records (every contract but samples)

INT64 = st.integers(-(2**63), 2**64 - 1)  # what orjson writes and reads as integers
finite = st.floats(allow_nan=False, allow_infinity=False)


def _hint(t: Any) -> Any:
    return t.type if type(t) is mi.Metadata else t


def valid(t: Any) -> st.SearchStrategy:
    """Values the msgspec type `t` (msgspec.inspect) accepts, drawn across its whole range."""
    t = _hint(t)
    kind = type(t)
    if kind is mi.IntType:
        lo = t.ge if t.ge is not None else -(2**63)
        return st.integers(lo, t.le if t.le is not None else 2**64 - 1)
    if kind is mi.FloatType:
        lo = t.ge if t.ge is not None else t.gt
        floats = st.floats(min_value=lo, max_value=t.le, exclude_min=t.gt is not None, allow_nan=False,
                           allow_infinity=False)
        int_lo = max(-(2**63), -(2**63) if lo is None else math.ceil(lo) if t.gt is None else math.floor(lo) + 1)
        int_hi = 2**63 if t.le is None else min(math.floor(t.le), 2**63)
        return st.one_of(floats, st.integers(int_lo, int_hi))  # a JSON number may be written without a fraction
    if kind is mi.StrType:
        if t.pattern is not None:
            return st.from_regex(t.pattern, fullmatch=True)
        return st.text(min_size=t.min_length or 0, max_size=t.max_length if t.max_length is not None else 40)
    if kind is mi.BoolType:
        return st.booleans()
    if kind is mi.LiteralType:
        return st.sampled_from(t.values)
    if kind is mi.BytesType:
        return st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
    if kind is mi.ListType:
        return st.lists(valid(t.item_type), min_size=t.min_length or 0, max_size=min(t.max_length or 4, 4))
    if kind is mi.DictType:
        return st.dictionaries(st.text(max_size=5), valid(t.value_type), max_size=3)
    if kind is mi.UnionType:
        return st.one_of(st.none(), *(valid(x) for x in t.types if type(x) is not mi.NoneType))
    if kind is mi.StructType:
        return record(t.cls)
    raise AssertionError(f"no strategy for {t!r}")


json_leaf = st.one_of(st.none(), st.booleans(), INT64, finite, st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                          max_leaves=8)


@st.composite
def record(draw: st.DrawFn, cls: type) -> dict:
    """A valid record of the struct `cls` as a JSON object: required fields, some optional ones, unknown extras."""
    info = mi.type_info(cls)
    names = {f.encode_name for f in info.fields} | {"schema"}
    obj: dict[str, Any] = {"schema": info.tag} if info.tag else {}
    for f in info.fields:
        if f.required or draw(st.booleans()):
            obj[f.encode_name] = draw(valid(f.type))
    extras = draw(st.dictionaries(st.text(max_size=12).filter(lambda k: k not in names), json_value, max_size=2))
    return {**obj, **extras}


def _same_values(decoded: Any, written: Any) -> bool:
    """Whether the decoded record holds what was written (a number written as 3 reads as 3.0 in a float field)."""
    if isinstance(written, dict):
        return all(_same_values(decoded[k], v) for k, v in written.items() if k in decoded)
    if isinstance(written, list):
        return len(decoded) == len(written) and all(map(_same_values, decoded, written))
    if type(written) is bool or type(decoded) is bool:
        return decoded is written
    if type(decoded) is float and type(written) is int:
        return decoded == float(written)
    return decoded == written


@pytest.mark.parametrize("tag", RECORDS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generated_records_pass_schema_and_codec(tag: str, data: st.DataObject) -> None:
    """A record drawn from the typed definition passes the schema file, decodes to the same values, and encodes
    back to a message that decodes to the same record."""
    obj = data.draw(record(RECORDS[tag]))
    VALIDATORS[tag].validate(obj)
    rec = DECODERS[tag](orjson.dumps(obj))
    assert type(rec) is RECORDS[tag]
    assert _same_values(msgspec.to_builtins(rec), {k: v for k, v in obj.items() if k in
                                                         {f.encode_name for f in mi.type_info(RECORDS[tag]).fields}})
    raw = msgspec.json.encode(rec)
    assert DECODERS[tag](raw) == rec
    VALIDATORS[tag].validate(orjson.loads(raw))


BAD_VALUES = st.one_of(json_leaf, st.just(float("inf")), st.sampled_from(["1", "0.5", "-1", "", "x" * 300, 3.0, -1]),
                       st.integers(-(2**70), 2**70), st.lists(st.integers(-5, 100), max_size=5),
                       st.dictionaries(st.text(max_size=3), json_leaf, max_size=2))


@pytest.mark.parametrize("tag", RECORDS)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_codec_and_schema_agree_on_corrupted_records(tag: str, data: st.DataObject) -> None:
    """Replace, delete or add one field of a record (or of an object inside it): the codec accepts exactly when
    the schema file does, and a rejection names its reason (never an internal error)."""
    obj = data.draw(record(RECORDS[tag]))
    target = data.draw(st.sampled_from([obj, *(v for v in obj.values() if isinstance(v, dict))]))
    op = data.draw(st.sampled_from(["replace", "delete", "add"]))
    name = data.draw(st.text(max_size=12) if op == "add" or not target else st.sampled_from(sorted(target)))
    if op == "delete" and name in target:
        del target[name]
    else:
        target[name] = data.draw(BAD_VALUES)
    try:
        raw = orjson.dumps(obj)  # infinity is written as null
    except orjson.JSONEncodeError:
        return  # an integer beyond 64 bits: orjson cannot write it
    schema_ok = VALIDATORS[tag].is_valid(orjson.loads(raw))
    try:
        DECODERS[tag](raw)
        codec_ok = True
    except DecodeError as exc:
        assert exc.kind != "internal", exc.reason
        if target is obj:  # the reason names the field that was changed
            assert re.split(r"[.\[]", exc.path)[0] == name and exc.reason.startswith(f"{exc.path}: "), exc.reason
        codec_ok = False
    assert codec_ok == schema_ok, f"schema {'accepts' if schema_ok else 'rejects'} what the codec does not: {raw!r}"


# ---------------------------------------------------------------- generated snapshots

FMAX = 1.7976931348623157e308
gauge = st.one_of(st.none(), INT64, finite)
counter = st.one_of(st.none(), st.integers(0, 2**64 - 1), st.floats(min_value=0, allow_infinity=False))
flag = st.one_of(st.none(), st.booleans())
KNOWN = {"gpu_index", "uuid", "throttle_reasons", "xid", *ALL_NUMERIC, *ALL_FLAGS, "schema", "host", "ts", "seq", "gpus"}
extras = st.dictionaries(st.text(max_size=12).filter(lambda k: k not in KNOWN), json_value, max_size=2)


@st.composite
def gpu_sample(draw: st.DrawFn, index: int) -> dict:
    sample = {"gpu_index": index, "uuid": draw(st.text(max_size=40))}
    for name in ALL_NUMERIC:
        if name in REQUIRED_NUMERIC or draw(st.booleans()):
            sample[name] = draw(counter if name in ALL_COUNTERS else gauge)
    for name in ALL_FLAGS:
        if name in FLAGS or draw(st.booleans()):
            sample[name] = draw(flag)
    sample["throttle_reasons"] = draw(st.one_of(st.none(), st.integers(0, 2**63 - 1)))
    sample["xid"] = draw(st.lists(st.integers(0, 2**31 - 1), max_size=4))
    return {**sample, **draw(extras)}


@st.composite
def snapshot(draw: st.DrawFn, max_gpus: int = 8) -> dict:
    indices = draw(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=max_gpus, unique=True))
    obj = {"schema": SAMPLES_SCHEMA, "host": draw(st.text(min_size=1, max_size=255)),
           "ts": draw(st.one_of(st.floats(min_value=0, allow_infinity=False), st.integers(0, 2**63))),
           "seq": draw(st.integers(0, 2**63 - 1)), "gpus": [draw(gpu_sample(i)) for i in indices]}
    return {**obj, **draw(extras)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(snapshot())
def test_generated_snapshots_pass_schema_and_codec(obj: dict) -> None:
    SAMPLES.validate(obj)
    raw = orjson.dumps(obj)
    for s in (decode_snapshot(raw), decode_snapshot_dict(obj)):
        assert s.host == obj["host"] and s.seq == obj["seq"] and s.ts == float(obj["ts"])
        assert s.gpu_index.tolist() == [g["gpu_index"] for g in obj["gpus"]]
        for i, g in enumerate(obj["gpus"]):
            for j, name in enumerate(ALL_NUMERIC):
                value = g.get(name)
                assert math.isnan(s.numeric[i, j]) if value is None else s.numeric[i, j] == np.float64(value)
            assert s.flags[i].tolist() == [bool(g.get(name)) for name in ALL_FLAGS]
            assert s.throttle[i] == (g["throttle_reasons"] or 0) and s.xids[i] == g["xid"]
    assert codecs.encode_snapshot(obj) == raw


SNAPSHOT_BAD_VALUES = st.one_of(json_leaf, st.just(float("inf")), st.just(-float("inf")), st.sampled_from(["1", "0.5", "-1"]),
                       st.integers(-(2**70), 2**70), st.lists(st.integers(-5, 100), max_size=70),
                       st.dictionaries(st.text(max_size=3), json_leaf, max_size=2))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(snapshot(max_gpus=3), st.data())
def test_codec_and_schema_agree_on_corruptions(obj: dict, data: st.DataObject) -> None:
    """Replace, delete or add one field anywhere: the codec accepts exactly when the schema does, except for
    the rules only the codec can check (a duplicated gpu_index here)."""
    target = data.draw(st.sampled_from([obj, *obj["gpus"]]))
    op = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if op == "add" or not target:
        target[data.draw(st.text(max_size=12))] = data.draw(SNAPSHOT_BAD_VALUES)
    elif op == "delete":
        del target[data.draw(st.sampled_from(sorted(target)))]
    else:
        target[data.draw(st.sampled_from(sorted(target)))] = data.draw(SNAPSHOT_BAD_VALUES)
    schema_ok = SAMPLES.is_valid(obj)
    gpus = obj.get("gpus") if isinstance(obj.get("gpus"), list) else []
    indices = [g["gpu_index"] for g in gpus if isinstance(g, dict) and type(g.get("gpu_index")) is int]
    duplicated = len(set(indices)) < len(indices)
    try:
        decode_snapshot_dict(obj)
        codec_ok = True
    except DecodeError as exc:
        assert exc.kind != "internal", exc.reason
        assert exc.kind == "duplicate" or not schema_ok, f"codec rejects what the schema accepts: {exc.reason}"
        codec_ok = False
    assert codec_ok == (schema_ok and not duplicated)
    if not any(isinstance(v, float) and math.isinf(v) for v in _leaves(obj)):
        try:  # and the bytes path agrees with the dict path
            decode_snapshot(orjson.dumps(obj))
            assert codec_ok
        except DecodeError:
            assert not codec_ok
        except orjson.JSONEncodeError:
            pass  # an integer beyond 64 bits: not writable by orjson


def _leaves(node: object):
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    elif isinstance(node, list):
        for value in node:
            yield from _leaves(value)
    else:
        yield node
