"""The stream's decisions in each risk record: alarm and drain at the model's operating points, a failed GPU
is not a prediction, and risk at the fleet's own failure rate (docs/model.md, "From score to action")."""

from __future__ import annotations

import dataclasses

import msgspec
import numpy as np
import orjson
import pytest

from gpuwatch.config import ConfigError, Settings
from gpuwatch.schemas.codecs import decode_risk, encode_snapshot
from gpuwatch.schemas.records import Risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.model import OperatingPoint, Scorer, at_prevalence, load_artifact, prevalence
from gpuwatch.streams.operating_point import MIN_RECORDS
from gpuwatch.streams.processor import Inbound, RiskProcessor, chosen_for_other_settings, operating_points

ARTIFACT = load_artifact()
SCORER = Scorer(ARTIFACT, device="cpu")
EVERY = OperatingPoint(1e-300, 3)  # every score reaches it (after a gap the model scores ~1e-15): only the run decides
NEVER = OperatingPoint(1.0, 1)


class Host:
    """One simulated host, stepped at 1 Hz; `step(edit)` lets a test change a GPU's sample before it is sent."""

    def __init__(self, seed: int = 4) -> None:
        self.sim = FleetSimulator(FleetConfig(hosts=1, seed=seed, start_ts=1.7e9))
        self.n = 0

    def step(self, edit=None) -> list[Inbound]:  # type: ignore[no-untyped-def]
        out = []
        for snap in self.sim.step():
            if edit is not None:
                edit(snap["gpus"][0])
            out.append(Inbound(encode_snapshot(snap), "samples", 0, self.n))
            self.n += 1
        return out


def gpu0(result) -> list[Risk]:  # type: ignore[no-untyped-def]
    return [r for r in (decode_risk(v) for _, v in result.risk) if r.gpu_index == 0]


def run(proc: RiskProcessor, host: Host, seconds: int, edit=None) -> list[Risk]:  # type: ignore[no-untyped-def]
    out: list[Risk] = []
    for _ in range(seconds):
        out += gpu0(proc.process(host.step(edit)))
    return out


def test_alarm_needs_the_operating_points_run_of_scorings_in_a_row() -> None:
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0, alarm_op=EVERY, drain_op=NEVER)
    recs = run(proc, Host(), 21)  # scored at 0, 5, 10, 15, 20 s
    assert [r.alarm for r in recs] == [False, False, True, True, True]
    assert {r.op for r in recs} == {"model:1e-300x3"} and not any(r.drain for r in recs)
    # Re-publishing a silent GPU (no new sample) does not extend the run
    again = gpu0(proc.refresh_silent(recs[-1].scored_at + 11.0, max_age_s=10.0))
    assert [r.alarm for r in again] == [True]
    assert proc.store.alarm_run[proc.store.slot_of[recs[0].uuid]] == 5


def test_drain_holds_only_while_the_alarm_does() -> None:
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0, alarm_op=EVERY, drain_op=OperatingPoint(1e-300, 1))
    recs = run(proc, Host(), 21)
    assert [(r.alarm, r.drain) for r in recs] == [(False, False)] * 2 + [(True, True)] * 3


def test_a_gap_longer_than_three_minutes_restarts_the_run() -> None:
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0, alarm_op=EVERY)
    host = Host()
    run(proc, host, 16)
    for _ in range(200):
        host.sim.step()  # 200 s of samples lost on the way
    recs = run(proc, host, 11)
    assert [r.alarm for r in recs] == [False, False, True]


def run_every(proc: RiskProcessor, host: Host, interval: int, samples: int) -> list[dict]:
    """Send one snapshot every `interval` seconds of the host's clock (an agent set to a slower interval)."""
    out: list[dict] = []
    for _ in range(samples):
        out += gpu0(proc.process(host.step()))
        for _ in range(interval - 1):
            host.sim.step()
    return out


@pytest.mark.parametrize(("interval", "expected"), [
    (1, [False] * 6 + [True] * 2),  # scored every 5 s: held 30 s at the 7th scoring
    (60, [False, True, True]),
    (240, [False, True, True]),  # an agent sampling every 4 min still alarms: its runs are not cut by gaps
])  # fmt: skip
def test_persistence_in_seconds_means_the_same_at_any_sampling_interval(interval: int, expected: list) -> None:
    op = OperatingPoint(1e-300, 1, for_s=30.0)
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0, alarm_op=op)
    recs = run(proc, Host(), 36) if interval == 1 else run_every(proc, Host(), interval, len(expected))
    assert [r.alarm for r in recs] == expected
    assert {r.op for r in recs} == {"model:1e-300x1/30s"}
    assert OperatingPoint.parse("model:1e-300x1/30s") == op


@pytest.mark.parametrize(("interval", "expected"), [
    (30, [False, False, False, True, True]),  # 90 s held at the 4th scoring: MIN_RECORDS changes nothing
    (120, [False, False, True, True, True]),  # 90 s held at the 2nd scoring, but 3 scorings are needed
])  # fmt: skip
def test_the_models_points_hold_for_at_least_min_records_scorings(interval: int, expected: list) -> None:
    assert ARTIFACT.alarm_op.records == MIN_RECORDS == 3
    assert ARTIFACT.migrate_op is not None and ARTIFACT.migrate_op.records == MIN_RECORDS
    op = OperatingPoint(1e-300, MIN_RECORDS, for_s=90.0)
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0, alarm_op=op)
    assert [r.alarm for r in run_every(proc, Host(), interval, len(expected))] == expected


def test_a_lost_gpu_is_failed_not_at_risk_until_it_answers_again() -> None:
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0, alarm_op=EVERY)
    host = Host()
    run(proc, host, 16)

    def lost(g: dict) -> None:
        for k in list(g):
            if k not in ("gpu_index", "uuid", "xid", "throttle_reasons"):
                g[k] = None
        g.update(lost=True, xid=[79] if g["xid"] == [] else g["xid"], throttle_reasons=0)

    down = run(proc, host, 20, lost)
    assert down and all(r.failed and r.risk == 1.0 and not r.alarm and r.score is msgspec.UNSET for r in down)
    [since] = {r.failed_since for r in down}  # the first sample that showed it (before the next scoring)
    assert down[0].ts - 5 < since <= down[0].ts
    back = run(proc, host, 16)
    assert back and not any(r.failed for r in back)
    assert [r.alarm for r in back][:3] == [False, False, True]  # the run restarted after the failure


def test_a_fatal_xid_fails_a_gpu_that_keeps_reporting_until_it_is_reset() -> None:
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0)
    host = Host()
    run(proc, host, 6)
    first = [True]

    def fatal_idle(g: dict) -> None:  # XID 48 (DBE) once, then idle in the fatal state
        g.update(util_gpu_pct=0, xid=[48, 63] if first[0] else [])
        first[0] = False

    down = run(proc, host, 120, fatal_idle)
    assert all(r.failed for r in down) and down[0].mode == "memory"

    def reset(g: dict) -> None:  # volatile counters cleared by a GPU reset
        g.update(util_gpu_pct=0, ecc_sbe_volatile=0, ecc_dbe_volatile=0, pcie_replay=0, power_violation_us=0,
                 thermal_violation_us=0)

    proc2 = RiskProcessor(SCORER, rescore_interval_s=5.0)
    host2 = Host(seed=5)
    run(proc2, host2, 6, lambda g: g.update(power_violation_us=10**6))
    first[0] = True
    assert all(r.failed for r in run(proc2, host2, 30, lambda g: (fatal_idle(g), g.update(power_violation_us=10**6))))
    assert not any(r.failed for r in run(proc2, host2, 6, reset))


def test_a_gpu_back_at_work_after_a_fatal_xid_was_reset() -> None:
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0)
    host = Host()
    run(proc, host, 6)
    state = {"t": 0}

    def fatal_then_busy(g: dict) -> None:
        state["t"] += 1
        g.update(xid=[62] if state["t"] == 1 else [], util_gpu_pct=0 if state["t"] < 70 else 95)

    recs = run(proc, host, 90, fatal_then_busy)
    failed = [r.failed for r in recs]
    assert failed[0] and not failed[-1]
    assert all(r.ts - recs[0].ts >= 60 for r in recs if not r.failed)


def test_risk_is_the_score_restated_at_the_fleets_failure_rate() -> None:
    proc = RiskProcessor(SCORER, rescore_interval_s=5.0, failures_per_gpu_day=1.943e-4)
    recs = run(proc, Host(), 6)
    score = np.array([r.score for r in recs])
    risk = np.array([r.risk for r in recs])
    expected = at_prevalence(score, ARTIFACT.calibration_prevalence, prevalence(1.943e-4, 3600.0))
    assert risk == pytest.approx(expected) and (risk < score).all()
    # About 5,000 times lower odds than on the training fleets
    odds = lambda p: p / (1 - p)  # noqa: E731
    assert odds(risk[0]) / odds(score[0]) == pytest.approx(prevalence(1.943e-4, 3600) / ARTIFACT.calibration_prevalence
                                                           * (1 - ARTIFACT.calibration_prevalence), rel=1e-3)
    # Without a fleet rate the score is the risk (offline evaluation on fleets like the training ones)
    plain = run(RiskProcessor(SCORER, rescore_interval_s=5.0), Host(), 6)
    assert all(r.risk == r.score for r in plain)


def test_settings_override_the_models_operating_points() -> None:
    alarm, drain = operating_points(ARTIFACT, Settings())
    assert (alarm, drain) == (ARTIFACT.alarm_op, ARTIFACT.migrate_op)
    alarm, _ = operating_points(ARTIFACT, Settings(alarm_threshold=0.9))
    assert (alarm.threshold, alarm.records, alarm.source) == (0.9, ARTIFACT.alarm_records, "override")
    assert alarm.for_s == ARTIFACT.alarm_for_s  # what the override does not name stays the model's
    assert alarm.name == OperatingPoint(0.9, ARTIFACT.alarm_records, "override", for_s=ARTIFACT.alarm_for_s,
                                        bridge_s=ARTIFACT.alarm_bridge_s).name  # fmt: skip
    _, drain = operating_points(ARTIFACT, Settings(migrate_threshold=0.99, migrate_records=4))
    assert drain is not None and (drain.threshold, drain.records) == (0.99, 4)
    proc = RiskProcessor.from_settings(SCORER, Settings(alarm_threshold=0.5, alarm_records=3, alarm_for_s=0.0))
    assert proc.alarm_op.name == "override:0.5x3" and proc.deployed_at == prevalence(1.943e-4, 3600.0)
    held, _ = operating_points(ARTIFACT, Settings(alarm_for_s=120.0))
    assert (held.threshold, held.for_s, held.source) == (ARTIFACT.threshold, 120.0, "override")
    assert "/120s" in held.name and OperatingPoint.parse(held.name) == held
    with pytest.raises(ValueError):
        OperatingPoint(0.0, 1)
    assert orjson.loads(orjson.dumps(alarm.to_dict())) == {"threshold": 0.9, "records": ARTIFACT.alarm_records,
                                                           "for_s": ARTIFACT.alarm_for_s,
                                                           "bridge_s": ARTIFACT.alarm_bridge_s}  # fmt: skip


def test_an_operating_points_bridged_dips_are_shorter_than_its_hold() -> None:
    """A bridge at least as long as the hold would let one high scoring alarm on its own: refused with the
    setting to change, and a model's bridge is dropped with a hold overridden to no longer than it."""
    bridged = dataclasses.replace(ARTIFACT, alarm_for_s=90.0, alarm_bridge_s=45.0)
    assert bridged.alarm_op.name.endswith("/90s~45s") and OperatingPoint.parse(bridged.alarm_op.name) == bridged.alarm_op
    with pytest.raises(ValueError, match="shorter than its persistence"):
        OperatingPoint(0.9, for_s=30.0, bridge_s=30.0)
    alarm, _ = operating_points(bridged, Settings(alarm_for_s=30.0))
    assert (alarm.for_s, alarm.bridge_s) == (30.0, 0.0)
    alarm, _ = operating_points(bridged, Settings(alarm_for_s=300.0))
    assert (alarm.for_s, alarm.bridge_s) == (300.0, 45.0)
    alarm, _ = operating_points(bridged, Settings(alarm_bridge_s=0.0))
    assert (alarm.for_s, alarm.bridge_s, alarm.source) == (90.0, 0.0, "override")
    with pytest.raises(ConfigError, match="set alarm_bridge_s below alarm_for_s"):
        operating_points(bridged, Settings(alarm_bridge_s=120.0))


def test_a_worker_says_when_its_settings_are_not_those_the_operating_points_were_chosen_for() -> None:
    artifact = load_artifact()
    artifact.metrics["operating_points_chosen_for"] = {"failures_per_gpu_day": 1.943e-4, "costs": {"job_gpus": 1024}}
    assert chosen_for_other_settings(artifact, Settings()) is None
    said = chosen_for_other_settings(artifact, Settings(policy_job_gpus=64, fleet_failure_rate_per_gpu_day=1e-3))
    assert said is not None and "job_gpus 1024 -> 64" in said and "failures_per_gpu_day 0.0001943 -> 0.001" in said
