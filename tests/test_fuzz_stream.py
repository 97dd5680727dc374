"""Bad input through the stream's batch step and through a real worker.

Every kind of bad snapshot gets one dead letter whose reason names the problem; nothing raises; and the
GPU the bad snapshot was about keeps exactly the window it would have had without it: a clean run and a
run with the bad input interleaved end in the same state and publish the same scores. Decreasing counters
are not bad input (a driver reload resets them): they are folded as a reset, and a reset to zero reads as
"no events" so the features stay what they would have been without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pytest
from helpers import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_producer, partition_count, read_partitions_to_end
from gpuwatch.processes import start_stream_worker
from gpuwatch.schemas.codecs import decode_deadletter, decode_risk
from gpuwatch.schemas.fields import ALL_COUNTERS
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, Inbound, RiskProcessor

SCORER = Scorer(load_artifact(), device="cpu")
NOW = time.time()
# Arrays that hold NaN or -inf by design: "not loaded" and "never" sentinels.
# -inf where there is none yet: no XID, no scoring, no scoring at or above an operating point in reach.
_SENTINELS = {"last_power_peer", "last_xid_ts", "last_scored_ts", "alarm_hit", "drain_hit"}


def _processor(rescore_s: float = 1.0) -> RiskProcessor:
    return RiskProcessor(SCORER, rescore_interval_s=rescore_s)


def _snapshots(n: int, hosts: int = 1, seed: int = 4) -> list[bytes]:
    """`n` intervals of a small fleet, ending a minute before NOW (fresh for the stale and future checks)."""
    sim = FleetSimulator(FleetConfig(hosts=hosts, seed=seed, start_ts=NOW - 60 - n))
    return [value for _ in range(n) for _, value in sim.step_json()]


def _edit(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    obj = orjson.loads(raw)
    change(obj)
    return orjson.dumps(obj)


def _set_gpu(field: str, value: Any, gpu: int = 0) -> Callable[[bytes], bytes]:
    return lambda raw: _edit(raw, lambda o: o["gpus"][gpu].__setitem__(field, value))


def _set(field: str, value: Any) -> Callable[[bytes], bytes]:
    return lambda raw: _edit(raw, lambda o: o.__setitem__(field, value))


def _text(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def change(raw: bytes) -> bytes:
        assert old in raw
        return raw.replace(old, new, 1)

    return change


def _nest(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _many_gpus(raw: bytes) -> bytes:
    return _edit(raw, lambda o: o.__setitem__("gpus", [{**o["gpus"][0], "gpu_index": i} for i in range(65)]))


# kind -> (how to spoil a good snapshot (given it and an earlier one), a fragment of the dead letter's reason)
BAD: dict[str, tuple[Callable[[bytes, bytes], bytes | None], str]] = {
    "wrong type": (lambda raw, _: _set_gpu("temp_c", "71")(raw), 'temp_c: expected number or null, got string "71"'),
    "bool as number": (lambda raw, _: _set_gpu("power_w", True)(raw), "power_w: expected number or null, got boolean"),
    "NaN": (lambda raw, _: _text(b'"power_limit_w":', b'"power_limit_w":NaN,"x":')(raw), "invalid JSON"),
    "Infinity": (lambda raw, _: _text(b'"temp_c":', b'"temp_c":Infinity,"x":')(raw), "invalid JSON"),
    "overflowing number": (lambda raw, _: _text(b'"temp_c":', b'"temp_c":1e999,"x":')(raw), "invalid JSON"),
    "absurd value": (lambda raw, _: _set_gpu("temp_c", 1e300)(raw), "temp_c: 1e+300 is beyond any real reading"),
    "absurd counter": (lambda raw, _: _set_gpu("ecc_sbe_volatile", 1e200, 3)(raw), "gpus[3].ecc_sbe_volatile: 1e+200"),
    "negative counter": (lambda raw, _: _set_gpu("ecc_sbe_volatile", -1)(raw), "ecc_sbe_volatile: must be >= 0"),
    "huge gpus array": (lambda raw, _: _many_gpus(raw), "gpus: expected 1..64 entries, got 65"),
    "huge xid array": (lambda raw, _: _set_gpu("xid", [48] * 10_000)(raw), "xid: expected at most 64 entries"),
    "deep nesting": (lambda raw, _: _set("extra", _nest(40))(raw), "extra: nested too deeply"),
    "oversized": (lambda raw, _: _set("padding", "x" * (1 << 20))(raw), "over the 1048576-byte limit"),
    "invalid UTF-8": (lambda raw, _: _text(b'"host":"node-0000"', b'"host":"node-\xff\xfe00"')(raw), "invalid UTF-8"),
    "not JSON": (lambda raw, _: b"\x00\x01 definitely not json", "invalid JSON"),
    "empty": (lambda raw, _: b"", "invalid JSON"),
    "tombstone": (lambda raw, _: None, "no value"),
    "far future ts": (lambda raw, _: _set("ts", NOW + 86400.0)(raw), "s in the future (limit 300 s)"),
    "far past ts": (lambda raw, _: _set("ts", NOW - 30 * 86400.0)(raw), "old (limit 604800 s)"),
    "ts before 1970": (lambda raw, _: _set("ts", -1.0)(raw), "ts: must be >= 0"),
    "duplicated seq (a resend)": (lambda raw, earlier: earlier, "duplicate or out of order"),
    # An earlier snapshot's seq and ts with other readings. (The next seq with an older ts is the node's clock
    # stepping back: folded, see tests/test_processor.py.)
    "duplicated seq, older ts": (lambda raw, earlier: _edit(raw, lambda o: o.update(
                                     seq=orjson.loads(earlier)["seq"], ts=orjson.loads(earlier)["ts"])),
                                 "duplicate or out of order"),
    "duplicate gpu_index": (lambda raw, _: _set_gpu("gpu_index", 0, 5)(raw), "duplicate gpu_index 0"),
    "missing field": (lambda raw, _: _edit(raw, lambda o: o["gpus"][2].pop("temp_c")), "missing required field"),
    "unknown major version": (lambda raw, _: _set("schema", "gpuwatch.samples/2")(raw), "unsupported version"),
}  # fmt: skip


def _state(proc: RiskProcessor) -> dict[str, np.ndarray]:
    store = proc.store
    n = len(store.uuids)
    return {name: getattr(store, name)[:n].copy() for name in store._shapes()}


def _scores(results: list[BatchResult]) -> list[tuple[str, float, float, str]]:
    return [
        (r.uuid, r.ts, r.risk, r.mode)
        for res in results
        for r in (decode_risk(v) for _, v in res.risk)
    ]


def _assert_same_windows(a: RiskProcessor, b: RiskProcessor) -> None:
    assert a.store.slot_of == b.store.slot_of
    sa, sb = _state(a), _state(b)
    for name in sa:
        np.testing.assert_array_equal(sa[name], sb[name], err_msg=f"window array {name} differs")


def _assert_finite(proc: RiskProcessor) -> None:
    for name, arr in _state(proc).items():
        if name not in _SENTINELS and arr.dtype.kind == "f":
            assert np.isfinite(arr).all(), f"window array {name} holds NaN or infinity"


GOOD = _snapshots(12)


@pytest.fixture(scope="module")
def clean() -> tuple[RiskProcessor, list[BatchResult]]:
    proc = _processor()
    return proc, [proc.process([Inbound(m, "samples", 0, i) for i, m in enumerate(GOOD[:6])], now=NOW),
                  proc.process([Inbound(m, "samples", 0, i) for i, m in enumerate(GOOD[6:], 6)], now=NOW)]  # fmt: skip


@pytest.mark.parametrize("kind", BAD)
def test_bad_snapshot_is_dead_lettered_and_does_not_touch_the_window(
    kind: str, clean: tuple[RiskProcessor, list[BatchResult]]
) -> None:
    spoil, reason = BAD[kind]
    bad = spoil(GOOD[6], GOOD[3])
    dirty = _processor()
    before = dirty.process([Inbound(m, "samples", 0, i) for i, m in enumerate(GOOD[:6])], now=NOW)
    spoiled = dirty.process([Inbound(bad, "samples", 0, 99)], now=NOW)
    after = dirty.process([Inbound(m, "samples", 0, i) for i, m in enumerate(GOOD[6:], 6)], now=NOW)

    (letter,) = [decode_deadletter(d) for d in spoiled.deadletters]
    assert reason in letter.error, letter.error
    assert (letter.source.offset, letter.stage) == (99, "stream")
    if bad is not None and len(bad) <= 512 * 1024:
        assert letter.original == bad  # the original bytes, for a replay once fixed
    assert spoiled.samples == 0 and not spoiled.risk
    assert spoiled.rejected_samples == (8 if reason == "duplicate or out of order" else 0)
    _assert_same_windows(clean[0], dirty)
    assert _scores(clean[1]) == _scores([before, after])
    assert before.samples + after.samples == 8 * len(GOOD)


def test_counter_reset_is_folded_as_a_reset_not_a_negative_rate() -> None:
    """A driver reload drops volatile counters to 0: accepted (the contract says a decrease is a reset), and a
    reset to zero followed by new errors gives the same features as the same errors without the reset."""
    steady, reset = _processor(), _processor()
    good = _snapshots(30)

    def with_sbe(raw: bytes, value: int) -> bytes:
        return _edit(raw, lambda o: [g.__setitem__("ecc_sbe_volatile", value) for g in o["gpus"]])

    for i, raw in enumerate(good):
        errors = 0 if i < 10 else 3 * (i - 9)  # errors from sample 10 on
        steady_raw = with_sbe(raw, 1000 + errors)  # counters that never reset
        reset_raw = with_sbe(raw, 1000 if i < 10 else errors)  # the driver reloaded between samples 9 and 10
        assert steady.process([Inbound(steady_raw)], now=NOW).samples == 8
        result = reset.process([Inbound(reset_raw)], now=NOW)
        assert result.samples == 8 and not result.deadletters
    a, b = _state(steady), _state(reset)
    for name in a:
        if name != "last_counters":
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    _assert_finite(reset)
    rates = reset.store.ewma[:8, :, :5]  # the counter-rate signals never go negative
    assert (rates >= 0).all() and rates[:, 0, 0].max() > 0


# ---------------------------------------------------------------- property-based fuzzing

_GOOD = _snapshots(24, hosts=2, seed=9)
_JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(min_value=-1e15, max_value=1e15),
    st.text(max_size=8),
)
_JSON = st.recursive(
    _JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
_FIELDS = st.sampled_from(
    [
        "temp_c",
        "power_w",
        "ecc_sbe_volatile",
        "ecc_dbe_volatile",
        "xid",
        "throttle_reasons",
        "gpu_index",
        "uuid",
        "lost",
        "remap_pending",
        "util_gpu_pct",
        "pcie_replay",
    ]
)
_TOP = st.sampled_from(["ts", "seq", "host", "schema", "gpus", "extra"])


@st.composite
def _spoiled(draw: st.DrawFn, raw: bytes) -> bytes | None:
    how = draw(st.sampled_from(["gpu field", "top field", "drop", "bytes", "counter", "ts", "keep"]))
    obj = orjson.loads(raw)
    if how == "gpu field":
        obj["gpus"][draw(st.integers(0, 7))][draw(_FIELDS)] = draw(_JSON)
    elif how == "top field":
        obj[draw(_TOP)] = draw(_JSON)
    elif how == "drop":
        obj["gpus"][draw(st.integers(0, 7))].pop(draw(_FIELDS), None)
    elif how == "counter":  # any counter, any value a JSON number can be (decreases and huge ones included)
        counter = draw(st.sampled_from(sorted(ALL_COUNTERS)))
        obj["gpus"][draw(st.integers(0, 7))][counter] = draw(st.floats(min_value=-1e20, max_value=1e20))
    elif how == "ts":
        obj["ts"] = obj["ts"] + draw(st.floats(min_value=-40 * 86400.0, max_value=2 * 86400.0))
    elif how == "bytes":
        data = bytearray(raw)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return orjson.dumps(obj)


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(st.data())
def test_fuzzed_snapshots_never_crash_and_rejections_leave_no_trace(data: st.DataObject) -> None:
    """Random corruption of a real feed: the batch step never raises, every message is either folded (its GPUs
    accepted or rejected one by one) or dead-lettered whole with a reason, the windows stay finite, and a
    processor fed only the messages that were not dead-lettered ends in exactly the same state."""
    fuzzed, kept = _processor(rescore_s=1e9), _processor(rescore_s=1e9)  # windows only: scoring is slow
    for i, raw in enumerate(_GOOD):
        msg = data.draw(_spoiled(raw)) if data.draw(st.booleans()) else raw
        result = fuzzed.process([Inbound(msg, "samples", 0, i)], now=NOW)
        gpus = result.samples + result.rejected_samples
        if gpus == 0:  # dead-lettered whole
            (letter,) = [decode_deadletter(d) for d in result.deadletters]
            assert letter.error and letter.original == (msg or b"")
            continue
        assert len(result.deadletters) == (1 if result.rejected_samples else 0)
        mirror = kept.process([Inbound(msg, "samples", 0, i)], now=NOW)
        assert (mirror.samples, mirror.rejected_samples) == (result.samples, result.rejected_samples)
    _assert_finite(fuzzed)
    _assert_same_windows(fuzzed, kept)


@pytest.mark.slow
@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
@given(st.lists(st.tuples(st.integers(0, len(_GOOD) - 1), st.binary(max_size=64)), min_size=1, max_size=8))
def test_fuzz_run_of_byte_level_garbage_around_real_snapshots(cuts: list[tuple[int, bytes]]) -> None:
    """Splices of random bytes into real snapshots: never a crash, never an 'internal' codec error."""
    proc = _processor(rescore_s=1e9)
    for i, junk in cuts:
        raw = _GOOD[i]
        at = len(junk) % len(raw)
        result = proc.process([Inbound(raw[:at] + junk + raw[at + len(junk) :])], now=NOW)
        for letter in map(decode_deadletter, result.deadletters):
            assert letter.error and "a bug in gpuwatch" not in letter.error
    _assert_finite(proc)


# ---------------------------------------------------------------- the same through a real worker


def _read(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    n = partition_count(settings, topic)
    return read_partitions_to_end(settings, topic, list(range(n))) if n else []


@pytest.mark.slow
def test_a_worker_dead_letters_each_bad_kind_keeps_going_and_scores_as_if_it_never_came(
    settings: Settings,
) -> None:
    settings = settings.replace(rescore_interval_s=1.0, partitions=2)
    ensure_topics(settings, [settings.topic_samples, settings.topic_risk, settings.topic_deadletter])
    good = _snapshots(30)
    kinds = [k for k in BAD if k != "tombstone"] + ["tombstone"]
    bad = [BAD[k][0](good[20], good[12]) for k in kinds]
    producer = make_producer(settings, **{"message.max.bytes": 4 << 20})  # the oversized one is over 1 MiB
    for raw in good[:20] + bad + good[20:]:
        producer.produce(settings.topic_samples, key=b"node-0000", value=raw)
    assert producer.flush(30) == 0

    last_ts = orjson.loads(good[-1])["ts"]

    def letters_if_all_there() -> list[tuple[bytes | None, bytes | None]]:
        found = _read(settings, settings.topic_deadletter)
        return found if len(found) >= len(bad) else []

    def risk_if_last_scored() -> list[tuple[bytes | None, bytes | None]]:
        found = _read(settings, settings.topic_risk)
        return found if any(decode_risk(v).ts == last_ts for _, v in found) else []

    worker = start_stream_worker(settings, "fuzz-worker")
    try:
        letters = wait_for(letters_if_all_there, timeout=120, what="a dead letter for every bad message")
        risk = wait_for(risk_if_last_scored, timeout=60, what="the scores of the last snapshot")
        assert worker.alive(), worker.log_tail()
    finally:
        worker.stop()

    ordered = sorted((decode_deadletter(v) for _, v in letters), key=lambda d: d.source.offset)
    errors = [d.error for d in ordered]
    assert len(errors) == len(bad), errors
    for kind, error in zip(kinds, errors, strict=True):  # one partition: dead letters in offset order
        assert BAD[kind][1] in error, (kind, error)
    reference = RiskProcessor.from_settings(SCORER, settings)  # the worker's: risk at the fleet's failure rate
    expected = {
        (r.uuid, r.ts): r.risk
        for i, m in enumerate(good)
        for _, v in reference.process([Inbound(m, "samples", 0, i)], now=time.time()).risk
        for r in [decode_risk(v)]
    }
    published = [decode_risk(v) for _, v in risk]
    assert published and {(r.uuid, r.ts) for r in published} <= set(expected)
    for r in published:  # the worker's scores after the bad input are those of a run that never saw it
        assert r.risk == pytest.approx(expected[(r.uuid, r.ts)], abs=1e-5)
