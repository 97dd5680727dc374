"""Why this GPU (issue 17 part 3): every alarm says which signals drive the risk, in operator words and numbers,
and the stated reason matches the precursor the simulator injected."""

from __future__ import annotations

import re

import jsonschema
import msgspec
import numpy as np
import orjson
import pytest
import redis

from gpuwatch.archive.tables import RECORD_TABLES, RISK, decode_message, record_dicts, to_arrow
from gpuwatch.metrics import FleetRiskCollector
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import DecodeError, decode_risk, decode_snapshot, encode_risk, load_schema
from gpuwatch.schemas.records import AuditEntry, Reason, Risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy
from gpuwatch.sinks.redis_writer import RiskWriter
from gpuwatch.sinks.risk_client import RiskClient
from gpuwatch.sinks.top import Frame, render
from gpuwatch.streams.explain import MIN_SEVERITY, SIGNAL_MODE, SIGNALS, explain, reason_text, severities
from gpuwatch.streams.window import WindowStore
from gpuwatch.training import explain_eval

T0 = 1_700_000_000.0
WHY = [Reason(signal="sbe_rate", text="SBE rate 410/h, 120x its own baseline (3.3/h)", value=410.0, reference=3.3,
              severity=2.3),
       Reason(signal="row_remaps", text="row remaps / retired pages: 1.9/h over the last hour", value=1.9,
              reference=0.0, severity=1.5)]  # fmt: skip


def _risk(ts: float = T0, why: list[Reason] | msgspec.UnsetType = msgspec.UNSET, alarm: bool = True) -> Risk:
    return Risk(host="node-0001", gpu_index=3, uuid="GPU-3", ts=ts, risk=2e-3, horizon_s=3600.0, mode="memory",
                model="m", scored_at=ts, score=0.9, alarm=alarm, op="model:0.5x1", why=why)  # fmt: skip


# ---------------------------------------------------------------- the figure


def test_the_stated_reason_matches_the_injected_precursor_for_every_mode() -> None:
    """Simulated failures of every mode through the stream's own window: the precursor's signal ranks first or
    second in at least 90 % of them, at the last sample before the failure (sudden failures have none)."""
    ev = explain_eval.run(hosts=8, per_host=2, seed=0, fractions=(1.0,), interval_s=20.0)
    per_mode = {m: (ev.count(m), ev.hit_rate(1.0, m)) for m in explain_eval.PRECURSOR_MODES}
    print("explanation hit rate (rank <= 2) per mode:", per_mode, "overall", ev.hit_rate(1.0))
    assert all(n >= 3 for n, _ in per_mode.values()), per_mode
    assert any(c.mode == "sudden" for c in ev.cases)
    assert ev.hit_rate(1.0) >= 0.9, [(c.mode, c.ranks, c.top) for c in ev.cases]


def test_rank_of_mode_counts_ties_against_the_mode() -> None:
    sev = np.zeros((2, len(SIGNALS)))
    sev[0, SIGNALS.index("sbe_rate")] = 2.0
    sev[0, SIGNALS.index("xids")] = 3.0
    rank, top = explain_eval.rank_of_mode(sev, ["memory", "power"])
    others = sum(SIGNAL_MODE[s] != "power" for s in SIGNALS)
    assert rank.tolist() == [2, 1 + others]  # power: all zero, tied with every other signal
    assert SIGNALS[top[0]] == "xids"
    assert {SIGNAL_MODE[s] for s in SIGNALS} >= set(explain_eval.PRECURSOR_MODES)


# ---------------------------------------------------------------- the explanation itself


def _fleet_with_memory_precursor() -> tuple[WindowStore, int, int]:
    """One host of 8 GPUs, GPU 2 in the last minutes of a memory precursor; (store, its slot, a healthy slot)."""
    sim = FleetSimulator(FleetConfig(hosts=1, seed=4, interval_s=20.0, start_ts=T0))
    sim.schedule_failure(0, 2, "memory", 2400.0, 1200.0, strength=0.6)
    store = WindowStore(capacity=8)
    for _ in range(115):
        [snap] = [decode_snapshot(raw) for _, raw in sim.step_json()]
        slots = store.slots_for(snap.uuids, [snap.host] * len(snap.uuids), snap.gpu_index)
        store.update(slots, np.full(len(slots), snap.ts), snap.numeric, snap.flags, snap.throttle, snap.xids)
    return store, store.slot_of[sim.uuids[2]], store.slot_of[sim.uuids[5]]


def test_an_explanation_names_the_moving_signal_in_operator_words_most_severe_first() -> None:
    store, failing, healthy = _fleet_with_memory_precursor()
    [why, calm] = explain(store, np.array([failing, healthy]))
    assert SIGNAL_MODE[why[0].signal] == "memory", why
    [sbe] = [r for r in why if r.signal == "sbe_rate"]
    assert re.fullmatch(r"SBE rate [\d.]+/h, [\d.]+x its own baseline \([\d.]+/h\)", sbe.text), sbe.text
    assert sbe.value > 10 * sbe.reference
    assert [r.severity for r in why] == sorted((r.severity for r in why), reverse=True)
    assert all(r.severity >= MIN_SEVERITY for r in why + calm) and len(why) <= 3
    sev, _, _ = severities(store, np.array([failing, healthy]))
    assert sev[0].max() > sev[1].max()  # the failing GPU is further from normal than its healthy neighbour
    assert explain(store, np.array([], dtype=np.int64)) == []


def test_every_signal_has_a_sentence_and_an_unknown_one_is_named() -> None:
    for name in SIGNALS:
        assert reason_text(name, 12.0, 3.0)
    assert reason_text("hotter_than_peers", 9.2, 0.0).startswith("runs 9.2 °C hotter than its neighbours")
    with pytest.raises(ValueError, match="unknown signal 'nope'; expected one of"):
        reason_text("nope", 1.0, 0.0)


# ---------------------------------------------------------------- the record and where it goes


def test_why_is_an_additive_optional_field_of_the_risk_record() -> None:
    validator = jsonschema.Draft202012Validator(load_schema("risk"))
    with_why = encode_risk(_risk(why=WHY))
    validator.validate(orjson.loads(with_why))
    assert decode_risk(with_why).why == WHY
    without = encode_risk(_risk())
    assert b'"why"' not in without and decode_risk(without).why is msgspec.UNSET  # old records decode
    bad = orjson.loads(with_why)
    bad["why"][0]["severity"] = -1
    with pytest.raises(DecodeError, match=r"why\[0\]\.severity"):
        decode_risk(orjson.dumps(bad))


def test_the_policy_reason_and_the_audit_entry_carry_the_reason() -> None:
    audit: list[AuditEntry] = []
    policy = RemediationPolicy(PolicyRules(), killswitch=lambda: False, audit=audit.extend)
    [event] = policy.observe([_risk(why=WHY)], now=T0)
    assert event.action == "checkpoint" and event.reason.endswith(f", why: {WHY[0].text}")
    assert audit[-1].why == [r.text for r in WHY]
    plain_audit: list[AuditEntry] = []
    plain_policy = RemediationPolicy(PolicyRules(), killswitch=lambda: False, audit=plain_audit.extend)
    [plain] = plain_policy.observe([_risk()], now=T0)
    assert "why" not in plain.reason and plain_audit[-1].why == []


def test_the_dashboard_metric_has_one_series_per_reason_of_a_gpu_in_alarm() -> None:
    collector = FleetRiskCollector()
    collector.update([_risk(why=WHY), Risk(**{**msgspec.structs.asdict(_risk(why=WHY)), "gpu_index": 4,
                                              "alarm": False})])  # fmt: skip
    [family] = [m for m in collector.collect() if m.name == "gpuwatch_gpu_alarm_reason"]
    got = [(s.labels["gpu"], s.labels["rank"], s.labels["signal"], s.labels["reason"], s.value) for s in family.samples]
    assert got == [("3", "1", "sbe_rate", WHY[0].text, 2.3), ("3", "2", "row_remaps", WHY[1].text, 1.5)]


def test_the_archive_keeps_the_reasons() -> None:
    raw = encode_risk(_risk(why=WHY))
    table = to_arrow(RISK, [decode_message(RISK, "risk", 0, 7, b"node-0001", raw)])
    [back] = record_dicts(table, RECORD_TABLES[RISK])
    assert decode_risk(orjson.dumps(back)) == decode_risk(raw)
    old = table.drop_columns(["why"])  # a file written before the field
    assert "why" not in record_dicts(old, RECORD_TABLES[RISK])[0]


def test_redis_risk_and_top_show_why(redis_client: redis.Redis) -> None:
    RiskWriter(redis_client).write_batch([_risk(why=WHY), Risk(**{**msgspec.structs.asdict(_risk()), "gpu_index": 4,
                                                                   "risk": 1e-6, "alarm": False})], written_at=T0)
    client = RiskClient(redis_client, clock=lambda: T0)
    assert client.risk("node-0001", 3).why == [r.text for r in WHY]  # type: ignore[union-attr]
    assert client.risk("node-0001", 4).why == []  # type: ignore[union-attr]
    assert redis_client.hget(k.gpu_key("node-0001", 3), "why") == k.why_text(WHY).encode()
    table = render(Frame(client.top(2), 2, 0, 1, 0, None, T0), n=2)
    assert "WHY" in table.splitlines()[2] and WHY[0].text in table.splitlines()[3]
