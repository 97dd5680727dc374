"""The evaluation metrics on hand-made inputs whose answers are worked out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from gpuwatch.training.dataset import Failures
from gpuwatch.training.evaluate import (
    RiskTable,
    alarm_episodes,
    average_precision,
    best_operating_point,
    brier_score,
    concat_labelled,
    event_metrics,
    event_pr_auc,
    expected_calibration_error,
    join_labels,
    sustained_risk,
)

H = 3600.0
DAY = 86400.0


def test_average_precision_matches_the_hand_computed_step_sum() -> None:
    # Ranked: pos (P 1, R .5), neg, pos (P 2/3, R 1), neg -> .5 * 1 + .5 * 2/3
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx(5 / 6)
    # Perfect ranking is 1; all scores tied gives the base rate.
    assert average_precision(np.array([0, 1, 1]), np.array([0.1, 0.8, 0.9])) == pytest.approx(1.0)
    assert average_precision(np.array([1, 0, 0, 0]), np.full(4, 0.5)) == pytest.approx(0.25)


def test_ece_and_brier_on_constant_predictions() -> None:
    y = np.array([1, 1] + [0] * 8)
    assert expected_calibration_error(y, np.full(10, 0.2)) == pytest.approx(0.0)
    assert expected_calibration_error(y, np.full(10, 0.9)) == pytest.approx(0.7)
    # Two bins: 0.1 predicted where 1 of 2 fail (gap .4), 0.95 where 2 of 2 fail (gap .05) -> (2*.4 + 2*.05) / 4
    y2, p2 = np.array([1, 0, 1, 1]), np.array([0.1, 0.1, 0.95, 0.95])
    assert expected_calibration_error(y2, p2) == pytest.approx(0.225)
    assert brier_score(np.array([1, 0]), np.array([0.75, 0.25])) == pytest.approx(0.0625)


def _labels(tmp_path: Path, rows: list[dict]) -> Failures:
    path = tmp_path / "labels.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return Failures.load(path)


def _fleet(tmp_path: Path) -> tuple[RiskTable, Failures]:
    """Three GPUs scored every 60 s for one day.

    A fails at 50,000 s (memory, precursor from 45,000), alarmed 47,040..49,980 with a 300 s dip: one
      episode, lead 2,960 s; down until 53,600 with risk 1.0 (not predictions).
    B never fails: alarms 10,000..10,300 and 30,000..30,060 (two false episodes, > merge gap apart).
    C fails suddenly at 70,000 and is never alarmed; it also has a precursor failure at 80,000 that
      is missed (alarm only at 60,000, more than the horizon before: a false alarm).
    """
    ts = np.arange(0.0, DAY, 60.0)
    uuid, t_all, risk = [], [], []
    for g in ("A", "B", "C"):
        r = np.full(len(ts), 0.01)
        if g == "A":
            r[(ts >= 47_000) & (ts < 50_000)] = 0.9
            r[(ts >= 48_000) & (ts < 48_300)] = 0.2  # a dip shorter than the merge gap
            r[(ts >= 50_000) & (ts < 53_600)] = 1.0  # failed state: must be ignored
        if g == "B":
            r[(ts >= 10_000) & (ts <= 10_300)] = 0.95
            r[(ts >= 30_000) & (ts <= 30_060)] = 0.95
        if g == "C":
            r[ts == 60_000] = 0.99
        uuid += [g] * len(ts)
        t_all.append(ts)
        risk.append(r)
    table = RiskTable.from_columns(uuid, np.concatenate(t_all), {"m": np.concatenate(risk)},
                                   {"m": np.zeros(3 * len(ts), dtype=np.int64)})  # fmt: skip
    failures = _labels(tmp_path, [
        {"uuid": "A", "fail_ts": 50_000.0, "mode": "memory", "precursor_start_ts": 45_000.0, "repair_end_ts": 53_600.0},
        {"uuid": "C", "fail_ts": 70_000.0, "mode": "sudden", "precursor_start_ts": None, "repair_end_ts": 70_100.0},
        {"uuid": "C", "fail_ts": 80_000.0, "mode": "thermal", "precursor_start_ts": 79_000.0, "repair_end_ts": 80_500.0},
    ])  # fmt: skip
    return table, failures


def test_event_metrics_count_episodes_catches_and_lead_time(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    m = event_metrics(lab, lab.risk["m"], 0.5, merge_gap_s=600.0)
    assert m["alarm_episodes"] == 4  # A (one, despite the dip), B twice, C once
    assert m["true_episodes"] == 1
    assert m["precision"] == pytest.approx(0.25)
    assert m["failures_with_precursor"] == 2 and m["caught_with_precursor"] == 1
    assert m["recall"] == pytest.approx(0.5)
    assert m["recall_all"] == pytest.approx(1 / 3)  # the sudden failure counts only here
    assert m["f1"] == pytest.approx(2 * 0.25 * 0.5 / 0.75)
    assert m["median_lead_min"] == pytest.approx(2960 / 60)
    assert m["recall_by_mode"]["memory"]["recall"] == 1.0 and m["recall_by_mode"]["thermal"]["recall"] == 0.0
    assert m["recall_by_mode"]["sudden"] == {"failures": 1, "caught": 0, "recall": 0.0}
    # Observed time: gaps between records (capped at 60 s), so A's and C's down times do not count.
    assert lab.gpu_days == pytest.approx((3 * (DAY - 60) - 3600 - 120 - 480) / DAY)
    assert m["false_alarms_per_1000_gpu_days"] == pytest.approx(3 / lab.gpu_days * 1000)


def test_a_short_merge_gap_splits_an_episode_at_the_dip(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    ep = alarm_episodes(lab, lab.risk["m"], 0.5, merge_gap_s=120.0)
    # A's alarm splits in two at the 300 s dip; both precede the failure within the horizon.
    a = ep.gpu == table.uuids.index("A")
    assert a.sum() == 2 and ep.true[a].all()
    m = event_metrics(lab, lab.risk["m"], 0.5, merge_gap_s=120.0)
    assert m["median_lead_min"] == pytest.approx(2960 / 60)  # lead counts from the earliest true episode


def test_failed_state_records_are_not_predictions(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    a = table.uuids.index("A")
    down = (lab.gpu == a) & (lab.ts >= 50_000) & (lab.ts < 53_600)
    assert not down.any()
    assert lab.y[(lab.gpu == a) & (lab.ts >= 46_400) & (lab.ts < 50_000)].all()
    assert not lab.y[(lab.gpu == a) & (lab.ts < 46_400)].any()


def test_event_pr_auc_is_one_for_a_perfect_scorer_and_lower_with_false_alarms(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    perfect = np.where(lab.visible, 0.99, 0.01)  # alarms exactly while a precursor is visible
    assert event_pr_auc(lab, perfect, 600.0) == pytest.approx(1.0)
    assert event_pr_auc(lab, lab.risk["m"], 600.0) < 0.5


def test_alarming_all_the_time_does_not_pay(tmp_path: Path) -> None:
    """Every record alarmed: each failure is caught, but every stretch outside the hour before one is false."""
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    m = event_metrics(lab, np.ones(len(lab.ts)), 0.5, merge_gap_s=600.0)
    assert m["recall"] == 1.0 and m["recall_all"] == 1.0
    # True: the hour before A's, C's sudden and C's thermal failure. False: A before that hour and after
    # its repair, B all day, C before its first failure's hour, between its repair and the next hour, and after.
    assert (m["true_episodes"], m["false_alarms"]) == (3, 6)
    assert m["precision"] == pytest.approx(3 / 9)
    assert m["median_lead_min"] == pytest.approx(60.0, abs=1.0)  # capped at the horizon


def test_sustained_risk_needs_records_in_a_row_of_one_gpu(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    a, c = table.uuids.index("A"), table.uuids.index("C")
    assert np.array_equal(sustained_risk(lab, lab.risk["m"], 1), lab.risk["m"])
    two = sustained_risk(lab, lab.risk["m"], 2)
    # C's single-record alarm is gone; a GPU's first record has no predecessor of its own (not A's last).
    assert two[(lab.gpu == c) & (lab.ts == 60_000)].item() == pytest.approx(0.01)
    assert (two[np.r_[True, lab.gpu[1:] != lab.gpu[:-1]]] == 0).all()
    # A alarms one scoring later: the lead shrinks by one interval, and the dip still merges into one episode.
    m = event_metrics(lab, two, 0.5, merge_gap_s=600.0)
    assert m["alarm_episodes"] == 3 and m["true_episodes"] == 1
    assert m["median_lead_min"] == pytest.approx((2960 - 60) / 60)
    first_alarm = lab.ts[(lab.gpu == a) & (two >= 0.5)].min()
    assert first_alarm == 47_100
    # Records 60 s apart stay linked under a shorter max_gap_s: a gap up to twice the usual interval is fine.
    short = sustained_risk(lab, lab.risk["m"], 2, max_gap_s=30.0)
    assert np.array_equal(short, two)
    # A failure ends a run whatever the gap: C's first record after its repair has no predecessor of its own.
    after = np.flatnonzero((lab.gpu == c) & (lab.ts > 70_000))[0]
    assert lab.ts[after] == 70_140 and two[after] == 0


def _one_gpu(tmp_path: Path, ts: np.ndarray, risk: np.ndarray):  # type: ignore[no-untyped-def]
    table = RiskTable.from_columns(["G"] * len(ts), ts, {"m": risk}, {"m": np.zeros(len(ts), dtype=np.int64)})
    return join_labels(table, _labels(tmp_path, []), H)


def test_a_gap_past_the_limit_restarts_a_run_and_a_slow_agent_still_alarms(tmp_path: Path) -> None:
    ts = np.r_[np.arange(0.0, 600.0, 60.0), np.arange(840.0, 1200.0, 60.0)]  # a 300 s hole after 540 s
    lab = _one_gpu(tmp_path, ts, np.full(len(ts), 0.9))
    two = sustained_risk(lab, lab.risk["m"], 2)
    assert two[ts == 0.0] == 0 and two[ts == 840.0] == 0  # past max(180 s, 2 x 60 s): a new run
    assert (two[(ts != 0.0) & (ts != 840.0)] == 0.9).all()
    slow = np.arange(0.0, 2400.0, 240.0)  # an agent sampling every 4 min: 240 s <= 2 x its usual interval
    lab = _one_gpu(tmp_path, slow, np.full(len(slow), 0.9))
    assert (sustained_risk(lab, lab.risk["m"], for_s=200.0)[1:] == 0.9).all()


def test_a_failure_ends_a_run_and_a_bridge_does_not_reach_across_it(tmp_path: Path) -> None:
    """High scores right before a failure, a repair within the gap limit, then quiet scores: the quiet GPU is
    not in alarm (the stream ends a failed GPU's runs, `_end_runs`), however long the bridge."""
    ts = np.arange(0.0, 1200.0, 5.0)
    risk = np.where(ts < 500.0, 0.99, 0.01)
    table = RiskTable.from_columns(["G"] * len(ts), ts, {"m": risk}, {"m": np.zeros(len(ts), dtype=np.int64)})
    lab = join_labels(table, _labels(tmp_path, [{"uuid": "G", "fail_ts": 502.0, "mode": "memory",
                                                 "precursor_start_ts": 0.0, "repair_end_ts": 560.0}]), H)  # fmt: skip
    assert lab.ts[lab.ts > 500.0].min() == 560.0  # down 500..560: 60 s, within the 180 s gap limit
    held = sustained_risk(lab, lab.risk["m"], for_s=45.0, bridge_s=30.0) >= 0.5
    assert held[lab.ts < 500.0].any() and not held[lab.ts >= 560.0].any()


def test_persistence_in_seconds_holds_the_same_time_at_any_interval(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    a, b = table.uuids.index("A"), table.uuids.index("B")
    held = sustained_risk(lab, lab.risk["m"], for_s=120.0)
    assert lab.ts[(lab.gpu == a) & (held >= 0.5)].min() == 47_040 + 120  # 120 s after A's first alarm record
    assert lab.ts[(lab.gpu == b) & (held >= 0.5)].tolist() == [10_140, 10_200, 10_260]  # B's 60 s blip is gone
    assert not (held[lab.gpu == table.uuids.index("C")] >= 0.5).any()
    # The same 120 s at 5 s scorings: 25 records in a row.
    ts = np.arange(0.0, 600.0, 5.0)
    fast = _one_gpu(tmp_path, ts, np.where(ts >= 100.0, 0.9, 0.1))
    assert fast.ts[sustained_risk(fast, fast.risk["m"], for_s=120.0) >= 0.5].min() == 220.0


def test_offline_persistence_is_exactly_the_streams(tmp_path: Path) -> None:
    """`sustained_risk(...) >= threshold` gives the alarms `RiskProcessor._run` gives, scoring by scoring, for
    random scores, sampling intervals, holes and operating points."""
    from gpuwatch.streams.operating_point import OperatingPoint
    from gpuwatch.streams.processor import RiskProcessor

    rng = np.random.default_rng(7)
    bridged = 0
    for trial in range(60):
        interval = float(rng.choice([1.0, 5.0, 30.0, 60.0, 120.0]))
        steps = rng.choice([1, 1, 1, 1, 2, 3, 5], size=300) * interval  # some samples lost
        ts = 1e6 + np.cumsum(steps)
        score = np.clip(rng.normal(0.5, 0.3, len(ts)).cumsum() * 0.05 + rng.normal(0.5, 0.2, len(ts)), 0, 1)
        for_s = float(rng.choice([0.0, 10.0, 45.0, 150.0, 300.0]))
        bridge_s = float(rng.choice([b for b in (0.0, 5.0, 30.0, 120.0) if b == 0 or b < for_s]))
        op = OperatingPoint(float(rng.uniform(0.3, 0.7)), int(rng.integers(1, 4)), for_s=for_s, bridge_s=bridge_s)
        lab = _one_gpu(tmp_path, ts, score)
        usual = np.median(np.diff(ts))
        runs, since, last_hit = np.zeros(1, np.int16), np.zeros(1), np.zeros(1)
        online = []
        prev = -np.inf
        for t, sc in zip(ts, score):
            held = RiskProcessor._run(runs, since, last_hit, np.zeros(1, np.int64), np.array([sc]), op,
                                      np.array([True]), np.array([t - prev]), np.array([usual]), np.array([t]))  # fmt: skip
            online.append(bool(held[0]))
            prev = t
        offline = sustained_risk(lab, lab.risk["m"], op.records, for_s=op.for_s, bridge_s=op.bridge_s) >= op.threshold
        assert online == offline.tolist(), (trial, op, interval)
        unbridged = sustained_risk(lab, lab.risk["m"], op.records, for_s=op.for_s) >= op.threshold
        bridged += bool((offline != unbridged).any())
    assert bridged >= 10  # in that many trials a bridged dip changed the alarms


def test_operating_point_picks_the_persistence_with_the_best_f1(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    # Up to 4 records, the best F1 is 1/2 (alarming everywhere catches both failures with precursors at
    # precision 1/3); 6 records drop B's 5-record false alarm too, leaving A only (precision 1, recall 1/2).
    thr, records, m = best_operating_point(lab, lab.risk["m"], 600.0)
    assert records == 6 and m["alarm_records"] == 6
    assert m["f1"] == pytest.approx(2 / 3) and m["precision"] == 1.0
    assert 0.01 < thr <= 0.9  # above the quiet level, at most A's alarm level
    _, records, m = best_operating_point(lab, lab.risk["m"], 600.0, choices=(4, 2, 1, 3))
    assert records == 1 and m["f1"] == pytest.approx(0.5)  # a tie: the shortest persistence wins


def test_an_alarm_in_a_running_precursor_but_too_early_is_false_and_counted_apart(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    lab = join_labels(table, failures, H)
    a = table.uuids.index("A")
    risk = lab.risk["m"].copy()
    # A alarms from 45,600 s: its precursor runs from 45,000, but the failure at 50,000 is more than an hour
    # away until 46,400. One false episode (early), then one true one; B's two and C's one stay look-alikes.
    risk[(lab.gpu == a) & (lab.ts >= 45_600) & (lab.ts < 50_000)] = 0.9
    m = event_metrics(lab, risk, 0.5, merge_gap_s=600.0)
    assert (m["alarm_episodes"], m["true_episodes"]) == (5, 1)
    assert m["false_alarms_in_precursor"] == 1
    assert m["precision"] == pytest.approx(1 / 5)
    assert m["precision_counting_early_alarms"] == pytest.approx(2 / 5)
    assert m["median_lead_min"] == pytest.approx((50_000 - 46_440) / 60)  # the first record within the hour
    # The unchanged fleet: C's alarm at 60,000 s comes before its thermal precursor starts (79,000 s).
    assert event_metrics(lab, lab.risk["m"], 0.5, merge_gap_s=600.0)["false_alarms_in_precursor"] == 0


def test_pooled_fleets_count_as_one_recording(tmp_path: Path) -> None:
    table, failures = _fleet(tmp_path)
    one = join_labels(table, failures, H)
    # The second fleet: the same GPUs with B's false alarms removed, so the pool is not just a double.
    quiet = {"m": np.where(np.asarray(table.uuids)[table.gpu] == "B", 0.01, table.risk["m"])}
    other = join_labels(RiskTable(table.uuids, table.gpu, table.ts, quiet, table.mode), failures, H)
    pooled = concat_labelled([one, other])
    m1 = event_metrics(one, one.risk["m"], 0.5, 600.0)
    m2 = event_metrics(other, other.risk["m"], 0.5, 600.0)
    mp = event_metrics(pooled, pooled.risk["m"], 0.5, 600.0)
    counts = ("alarm_episodes", "true_episodes", "failures_with_precursor", "caught_with_precursor", "failures_all")
    for key in counts:
        assert mp[key] == m1[key] + m2[key], key
    assert (mp["alarm_episodes"], mp["true_episodes"]) == (6, 2)
    assert pooled.gpu_days == pytest.approx(2 * one.gpu_days)
    assert mp["median_lead_min"] == pytest.approx(2960 / 60)
    # GPUs of the two fleets stay apart: no episode spans them, and sustained risk does not link them.
    assert len(np.unique(pooled.gpu)) == 6
    assert np.array_equal(sustained_risk(pooled, pooled.risk["m"], 2)[: len(one.ts)],
                          sustained_risk(one, one.risk["m"], 2))  # fmt: skip
    assert concat_labelled([one]) is one


def test_calibration_map_is_increasing_and_follows_the_observed_rates() -> None:
    from gpuwatch.training.calibration import fit_map

    rng = np.random.default_rng(0)
    score = rng.uniform(0, 1, 200_000)
    truth = np.clip(score * 1.4, 0, 1) ** 1.5  # the score is off, most in the upper range
    y = rng.uniform(0, 1, len(score)) < truth
    xs, ys = fit_map(score, y)
    assert list(xs) == sorted(set(xs)) and list(ys) == sorted(set(ys))  # strictly increasing: ranks are kept
    assert ys[0] == 0.0 and ys[-1] == 1.0  # a probability, even where the top bins always failed
    for s in (0.2, 0.5, 0.7, 0.9):
        assert np.interp(s, xs, ys) == pytest.approx(min(s * 1.4, 1.0) ** 1.5, abs=0.03)
    with pytest.raises(ValueError, match="too few records"):
        fit_map(score[:100], y[:100])


def test_the_worst_calibration_gap_above_a_half_ignores_thin_bins() -> None:
    from gpuwatch.training.evaluate import max_gap_above

    bins = [{"mean_risk": 0.1, "failure_rate": 0.5, "count": 1000},  # below 0.5: not counted
            {"mean_risk": 0.55, "failure_rate": 0.7, "count": 100},
            {"mean_risk": 0.9, "failure_rate": 0.4, "count": 10}]  # too few records to say anything
    assert max_gap_above(bins, 0.5) == pytest.approx(0.15)
    assert np.isnan(max_gap_above(bins[:1], 0.5))
