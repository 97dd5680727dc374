"""Scoring what the policy did (training/actions.py) and choosing operating points by their value at the real
failure rate (training/operating_points.py), on a small fleet worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.costs import CostModel
from gpuwatch.training.actions import action_report, classify, poisson_upper
from gpuwatch.training.dataset import Failures
from gpuwatch.training.evaluate import RiskTable, join_labels
from gpuwatch.training.operating_points import choose, simulated_events

DAY = 86_400.0
COSTS = CostModel()


def _lab(tmp_path: Path, days: float = 1.0, b_peak: float = 0.95):  # type: ignore[no-untyped-def]
    """GPUs A, B, C scored every 60 s. A fails at 50,000 (memory, precursor from 45,000, down until 53,600).
    C fails at 80,000 (thermal, precursor from 70,000: the alarm at 60,000 is before it, plain false).
    B never fails; it is a 'look-alike' GPU."""
    ts = np.arange(0.0, days * DAY, 60.0)
    uuid, t_all, risk = [], [], []
    for g in ("A", "B", "C"):
        r = np.full(len(ts), 0.01)
        if g == "A":
            r[(ts >= 47_000) & (ts < 50_000)] = 0.9
        if g == "B":
            r[(ts >= 10_000) & (ts <= 12_000)] = b_peak  # too long for any persistence to tell it apart
        if g == "C":
            r[(ts >= 75_000) & (ts < 80_000)] = 0.7
        uuid += [g] * len(ts)
        t_all.append(ts)
        risk.append(r)
    table = RiskTable.from_columns(uuid, np.concatenate(t_all), {"m": np.concatenate(risk)},
                                   {"m": np.zeros(3 * len(ts), dtype=np.int64)})  # fmt: skip
    path = tmp_path / "labels.jsonl"
    rows = [
        {"uuid": "A", "fail_ts": 50_000.0, "mode": "memory", "precursor_start_ts": 45_000.0, "repair_end_ts": 53_600.0},
        {"uuid": "C", "fail_ts": 80_000.0, "mode": "thermal", "precursor_start_ts": 70_000.0, "repair_end_ts": 80_500.0},
    ]  # fmt: skip
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return table, join_labels(table, Failures.load(path), 3600.0)


def ev(action: str, ts: float, uuid: str) -> dict:
    return {"action": action, "ts": ts, "uuid": uuid}


def test_events_are_classified_by_what_happened_to_their_gpu(tmp_path: Path) -> None:
    table, lab = _lab(tmp_path)
    events = [
        ev("checkpoint", 47_000, "A"),  # A fails 3,000 s later: true
        ev("migrate", 48_000, "A"),  # true
        ev("checkpoint", 51_000, "A"),  # A is down (failed at 50,000, repaired at 53,600): after failure
        ev("repair", 50_005, "A"),  # the right answer to the failure
        ev("checkpoint", 10_000, "B"),  # B never fails, a look-alike GPU
        ev("checkpoint", 71_000, "C"),  # C's precursor runs, but its failure is 9,000 s away: early
        ev("checkpoint", 60_000, "C"),  # before C's precursor: plain false
    ]
    kinds = classify(events, lab, table.uuids, lookalike={"B"}).kind.tolist()
    assert kinds == ["true", "true", "after_failure", "after_failure", "look-alike", "early", "plain"]


def test_the_report_counts_recall_lead_false_actions_and_actions_after_failure(tmp_path: Path) -> None:
    table, lab = _lab(tmp_path)
    events = [ev("checkpoint", 47_000, "A"), ev("migrate", 48_000, "A"), ev("repair", 50_005, "A"),
              ev("checkpoint", 10_000, "B"), ev("migrate", 10_100, "B"), ev("checkpoint", 51_000, "A")]  # fmt: skip
    rep = action_report(events, lab, table.uuids, COSTS, real_failures_per_gpu_day=1.943e-4, lookalike={"B"})
    ck, mg = rep["actions"]["checkpoint"], rep["actions"]["migrate"]
    assert (ck["failures_with_precursor"], ck["got_it_before_failing"], ck["recall"]) == (2, 1, 0.5)
    assert ck["median_lead_min"] == pytest.approx(50.0) and mg["median_lead_min"] == pytest.approx(2000 / 60)
    assert ck["false_by_cause"] == {"look-alike": 1, "early": 0, "plain": 0} and ck["after_failure"] == 1
    days = lab.gpu_days
    assert ck["false_healthy_per_1000_gpu_days"] == pytest.approx(1 / days * 1000)
    assert ck["false_healthy_per_1000_gpu_days_upper95"] == pytest.approx(poisson_upper(1) / days * 1000)
    assert rep["actions"]["repair"]["repairs_of_failures"] == 1
    v = rep["value"]
    # A: checkpoint 3,000 s and migrate 2,000 s ahead; the 1,000 s between them is lost (at most half an interval)
    saved = COSTS.saved(3000.0, 2000.0)
    assert v["saved_gpu_h"] == pytest.approx(saved)
    true_cost = COSTS.action_cost("checkpoint", real=True) + COSTS.action_cost("migrate", real=True)
    after = COSTS.action_cost("checkpoint", real=False)
    false_cost = COSTS.action_cost("checkpoint", real=False) + COSTS.action_cost("migrate", real=False)
    assert v["net_gpu_h_per_1000_gpu_days_fleet"] == pytest.approx((saved - true_cost - after - false_cost) / days * 1000)
    # At the real rate the per-failure part shrinks by the ratio of the failure rates; the per-GPU-day part does not
    scale = 1.943e-4 / (2 / days)
    assert v["net_gpu_h_per_1000_gpu_days_real"] == pytest.approx(((saved - true_cost - after) * scale - false_cost) / days * 1000)
    oracle = 2 * (COSTS.saved(1800, 1740) - true_cost)
    assert v["oracle_gpu_h_per_1000_gpu_days_real"] == pytest.approx(oracle * scale / days * 1000)


def test_poisson_upper_bound_matches_known_values() -> None:
    assert poisson_upper(0) == pytest.approx(2.9957, abs=1e-3)  # the "rule of three"
    assert poisson_upper(1) == pytest.approx(4.7439, abs=1e-3)
    assert poisson_upper(10) == pytest.approx(16.9622, abs=1e-3)  # chi2.ppf(0.95, 22) / 2


def test_simulated_events_checkpoint_each_episode_and_migrate_after_the_grace(tmp_path: Path) -> None:
    table, lab = _lab(tmp_path)
    alarm = lab.risk["m"] >= 0.6
    drain = lab.risk["m"] >= 0.85
    events = simulated_events(lab, table.uuids, alarm, drain, merge_gap_s=600.0)
    got = sorted((e["uuid"], e["action"], e["ts"]) for e in events)
    # B's episode starts at 10,020 (the first 60 s record at or after 10,000); its drain rows 60 s later
    assert got == [("A", "checkpoint", 47_040.0), ("A", "migrate", 47_100.0), ("B", "checkpoint", 10_020.0),
                   ("B", "migrate", 10_080.0), ("C", "checkpoint", 75_000.0)]  # fmt: skip


def test_choice_acts_only_where_it_pays_at_the_real_rate(tmp_path: Path) -> None:
    # 3 GPU-days with one look-alike above A's score: at the real failure rate one false checkpoint in 3 GPU-days
    # costs far more than catching A saves, so the best operating point alarms on nothing.
    table, lab = _lab(tmp_path)
    alarm, drain = choose(lab, table.uuids, lab.risk["m"], COSTS, 1.943e-4)
    assert alarm.threshold > 0.95 and alarm.value["net_gpu_h_per_1000_gpu_days_real"] == 0.0 and drain is None
    # Without the look-alike (B peaks at 0.5), alarming at A's 0.9 and draining it pays (a checkpoint alone 49 min
    # ahead saves nothing: the job would have checkpointed on its own by then).
    table, lab = _lab(tmp_path, b_peak=0.5)
    alarm, drain = choose(lab, table.uuids, lab.risk["m"], COSTS, 1.943e-4)
    assert 0.7 < alarm.threshold <= 0.9 and alarm.value["net_gpu_h_per_1000_gpu_days_real"] < 0
    assert drain is not None and drain.threshold >= alarm.threshold and drain.for_s >= alarm.for_s
    assert drain.value["net_gpu_h_per_1000_gpu_days_real"] > 0


def test_the_alarm_takes_the_highest_recall_within_the_service_levels(tmp_path: Path) -> None:
    from gpuwatch.training.operating_points import ServiceLevels

    table, lab = _lab(tmp_path, b_peak=0.5)
    # C's precursor (from 70,000) alarms at 0.7 from 75,000: more than the horizon before its failure at 80,000,
    # so an alarm at 0.7 is early (false). A at 0.9 is the only catch: recall 0.5 at best, precision 1 above 0.7.
    alarm, _ = choose(lab, table.uuids, lab.risk["m"], COSTS, 1.943e-4)
    assert 0.7 < alarm.threshold <= 0.9
    # Demand a precision nothing meets: the choice falls back to the most GPU-hours
    strict = ServiceLevels(min_alarm_precision=1.01)
    fallback, _ = choose(lab, table.uuids, lab.risk["m"], COSTS, 1.943e-4, levels=strict)
    assert fallback.value["net_gpu_h_per_1000_gpu_days_real"] >= alarm.value["net_gpu_h_per_1000_gpu_days_real"]
