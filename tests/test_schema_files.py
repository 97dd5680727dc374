"""The JSON Schema files: well-formed, in step with fields.py and the docs, and in agreement with the codecs
(generated valid snapshots pass both; a random single-field corruption is rejected by both or by neither)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jsonschema
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuwatch.schemas import codecs
from gpuwatch.schemas.codecs import DecodeError, decode_snapshot, decode_snapshot_dict
from gpuwatch.schemas.fields import (
    ACTIONS,
    ALL_COUNTERS,
    ALL_FLAGS,
    ALL_NUMERIC,
    DEADLETTER_SCHEMA,
    FAILURE_MODES,
    FLAGS,
    REMEDIATION_SCHEMA,
    REQUIRED_NUMERIC,
    RISK_SCHEMA,
    SAMPLES_SCHEMA,
)

NAMES = {"samples": SAMPLES_SCHEMA, "risk": RISK_SCHEMA, "remediation": REMEDIATION_SCHEMA,
         "deadletter": DEADLETTER_SCHEMA}
DECODERS = {SAMPLES_SCHEMA: decode_snapshot, RISK_SCHEMA: codecs.decode_risk,
            REMEDIATION_SCHEMA: codecs.decode_remediation, DEADLETTER_SCHEMA: codecs.decode_deadletter}
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
    assert "additionalProperties" not in json.dumps(schema)  # unknown fields must stay allowed
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


# ---------------------------------------------------------------- generated snapshots

FMAX = 1.7976931348623157e308
INT64 = st.integers(-(2**63), 2**64 - 1)  # what orjson writes and reads as integers
finite = st.floats(allow_nan=False, allow_infinity=False)
gauge = st.one_of(st.none(), INT64, finite)
counter = st.one_of(st.none(), st.integers(0, 2**64 - 1), st.floats(min_value=0, allow_infinity=False))
flag = st.one_of(st.none(), st.booleans())
KNOWN = {"gpu_index", "uuid", "throttle_reasons", "xid", *ALL_NUMERIC, *ALL_FLAGS, "schema", "host", "ts", "seq", "gpus"}
json_leaf = st.one_of(st.none(), st.booleans(), INT64, finite, st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                          max_leaves=8)
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


BAD_VALUES = st.one_of(json_leaf, st.just(float("inf")), st.just(-float("inf")), st.sampled_from(["1", "0.5", "-1"]),
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
        target[data.draw(st.text(max_size=12))] = data.draw(BAD_VALUES)
    elif op == "delete":
        del target[data.draw(st.sampled_from(sorted(target)))]
    else:
        target[data.draw(st.sampled_from(sorted(target)))] = data.draw(BAD_VALUES)
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
