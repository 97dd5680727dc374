"""Metrics of risk records against ground-truth failures: what a user of the risk stream would see.

Input is a `RiskTable` (one row per risk record: GPU, ts, one risk column per scorer) and the
simulator's labels. Record-level metrics (PR-AUC, Brier, ECE) treat each record as a prediction of
"fails within the horizon". Event-level metrics group alarms (risk >= threshold) into episodes:

- an alarm is *true* when its GPU fails within the horizon after it (what the risk claims), else false;
- an alarm *episode* is a run of alarms of one GPU, each within `merge_gap_s` of the previous one, all
  true for the same failure or all false: an alarm that starts more than the horizon before a failure
  and lasts until it is one false episode followed by one true episode (so alarming all the time does
  not pay);
- a failure is *caught* when a true episode precedes it; its *lead time* is the failure ts minus the
  first alarm of the earliest such episode (at most the horizon);
- precision = true episodes / episodes; recall = caught / eligible failures (those with a precursor,
  whose GPU was scored at least once in the horizon before the failure).

Records while a GPU is in a failed state (between a failure and its repair) are not predictions and
are dropped everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.training.dataset import Failures

DAY_S = 86400.0


@dataclass
class FailureTable:
    """All failures, flat and sorted by (gpu, fail_ts); `gpu` uses the RiskTable's GPU codes (-1: never scored)."""

    gpu: np.ndarray
    fail_ts: np.ndarray
    mode: np.ndarray  # index into FAILURE_MODES
    repair_end: np.ndarray
    precursor: np.ndarray  # bool: a precursor preceded the failure
    precursor_start: np.ndarray  # nan where none

    @classmethod
    def build(cls, failures: Failures, gpu_code: dict[str, int]) -> FailureTable:
        rows = []
        for uuid, (fail, mode, repair_end, precursor, pstart) in failures.by_uuid.items():
            g = gpu_code.get(uuid, -1)
            for k in range(len(fail)):
                rows.append((g, fail[k], mode[k], repair_end[k], precursor[k], pstart[k]))
        rows.sort()
        a = np.array(rows, dtype=np.float64).reshape(-1, 6)
        return cls(
            gpu=a[:, 0].astype(np.int64), fail_ts=a[:, 1], mode=a[:, 2].astype(np.int64),
            repair_end=a[:, 3], precursor=a[:, 4].astype(bool), precursor_start=a[:, 5],
        )  # fmt: skip


@dataclass
class RiskTable:
    """Risk records sorted by (gpu, ts): one risk (and mode) column per scorer, same rows for all."""

    uuids: list[str]  # uuid of each GPU code
    gpu: np.ndarray
    ts: np.ndarray
    risk: dict[str, np.ndarray]
    mode: dict[str, np.ndarray]

    @classmethod
    def from_columns(
        cls, uuid: list[str], ts: np.ndarray, risk: dict[str, np.ndarray], mode: dict[str, np.ndarray]
    ) -> RiskTable:
        names, gpu = np.unique(np.asarray(uuid), return_inverse=True)
        order = np.lexsort((ts, gpu))
        return cls(
            uuids=names.tolist(), gpu=gpu[order].astype(np.int64), ts=np.asarray(ts, dtype=np.float64)[order],
            risk={k: np.asarray(v, dtype=np.float64)[order] for k, v in risk.items()},
            mode={k: np.asarray(v, dtype=np.int64)[order] for k, v in mode.items()},
        )  # fmt: skip


@dataclass
class Labelled:
    """A RiskTable joined with the failures: failed-state records removed, next failure per record."""

    gpu: np.ndarray
    ts: np.ndarray
    risk: dict[str, np.ndarray]
    mode: dict[str, np.ndarray]
    next_fail: np.ndarray  # index into `failures`, -1 when the GPU never fails after this record
    to_fail_s: np.ndarray  # seconds to that failure (inf when none)
    y: np.ndarray  # fails within the horizon
    visible: np.ndarray  # positive and the failure's precursor has started (a model could see it)
    failures: FailureTable
    horizon_s: float
    gpu_days: float


def join_labels(table: RiskTable, failures: Failures, horizon_s: float) -> Labelled:
    """Attach the next failure to every record and drop records taken while the GPU was down."""
    ft = FailureTable.build(failures, {u: i for i, u in enumerate(table.uuids)})
    n = len(table.ts)
    t0 = float(table.ts.min()) if n else 0.0
    scale = 1e9  # composite (gpu, ts) key: gpu * 1e9 + seconds since t0 keeps ms precision in float64
    rec_key = table.gpu * scale + (table.ts - t0)
    f_key = ft.gpu * scale + (ft.fail_ts - t0)
    nxt = np.searchsorted(f_key, rec_key, side="right")  # first failure strictly after the record
    has_next = nxt < len(ft.gpu)
    nxt_c = np.minimum(nxt, max(len(ft.gpu) - 1, 0))
    same = has_next & (ft.gpu[nxt_c] == table.gpu) if len(ft.gpu) else np.zeros(n, dtype=bool)
    prev = nxt - 1
    prev_c = np.maximum(prev, 0)
    failed_now = (
        (prev >= 0) & (ft.gpu[prev_c] == table.gpu) & (table.ts < ft.repair_end[prev_c])
        if len(ft.gpu)
        else np.zeros(n, dtype=bool)
    )
    keep = ~failed_now
    next_fail = np.where(same, nxt_c, -1)[keep]
    to_fail = (
        np.where(same, ft.fail_ts[nxt_c] - table.ts, np.inf)[keep]
        if len(ft.gpu)
        else np.full(n, np.inf)[keep]
    )
    ts = table.ts[keep]
    y = to_fail <= horizon_s
    pstart = ft.precursor_start[np.maximum(next_fail, 0)] if len(ft.gpu) else np.full(len(ts), np.nan)
    visible = y & (next_fail >= 0) & np.nan_to_num(ts >= pstart, nan=False).astype(bool)
    gpu = table.gpu[keep]
    same_gpu = np.r_[gpu[1:] == gpu[:-1], False]
    # Observed time: gaps between consecutive records, capped so down time and holes do not count.
    gaps = np.where(same_gpu, np.minimum(np.r_[np.diff(ts), 0.0], 60.0), 0.0)
    return Labelled(
        gpu=gpu, ts=ts, risk={k: v[keep] for k, v in table.risk.items()},
        mode={k: v[keep] for k, v in table.mode.items()}, next_fail=next_fail, to_fail_s=to_fail, y=y,
        visible=visible, failures=ft, horizon_s=horizon_s, gpu_days=float(gaps.sum() / DAY_S),
    )  # fmt: skip


def concat_labelled(labs: list[Labelled]) -> Labelled:
    """Several fleets as one: GPU codes and failure indices of each fleet are offset past the previous ones,
    so episodes, catches and GPU-days add up as if the fleets had been one recording."""
    if len(labs) == 1:
        return labs[0]
    if len({lab.horizon_s for lab in labs}) != 1:
        raise ValueError("fleets scored with different horizons cannot be pooled")
    gpu_off = np.cumsum([0] + [int(lab.gpu.max(initial=-1)) + 1 for lab in labs])
    # Failures of GPUs that were never scored have code -1 and stay so (they are never eligible).
    fail_off = np.cumsum([0] + [len(lab.failures.gpu) for lab in labs])
    ft = [lab.failures for lab in labs]
    names = labs[0].risk.keys()
    return Labelled(
        gpu=np.concatenate([lab.gpu + gpu_off[i] for i, lab in enumerate(labs)]),
        ts=np.concatenate([lab.ts for lab in labs]),
        risk={k: np.concatenate([lab.risk[k] for lab in labs]) for k in names},
        mode={k: np.concatenate([lab.mode[k] for lab in labs]) for k in labs[0].mode},
        next_fail=np.concatenate(
            [np.where(lab.next_fail >= 0, lab.next_fail + fail_off[i], -1) for i, lab in enumerate(labs)]
        ),
        to_fail_s=np.concatenate([lab.to_fail_s for lab in labs]),
        y=np.concatenate([lab.y for lab in labs]),
        visible=np.concatenate([lab.visible for lab in labs]),
        failures=FailureTable(
            gpu=np.concatenate([np.where(f.gpu >= 0, f.gpu + gpu_off[i], -1) for i, f in enumerate(ft)]),
            fail_ts=np.concatenate([f.fail_ts for f in ft]),
            mode=np.concatenate([f.mode for f in ft]),
            repair_end=np.concatenate([f.repair_end for f in ft]),
            precursor=np.concatenate([f.precursor for f in ft]),
            precursor_start=np.concatenate([f.precursor_start for f in ft]),
        ),
        horizon_s=labs[0].horizon_s,
        gpu_days=float(sum(lab.gpu_days for lab in labs)),
    )


# ------------------------------------------------------------------ record-level metrics


def average_precision(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the precision-recall curve as the step sum over distinct scores (sklearn's definition)."""
    y = np.asarray(y, dtype=bool)
    if not y.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="stable")
    s, yy = np.asarray(score)[order], y[order]
    tp = np.cumsum(yy)
    fp = np.cumsum(~yy)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each run of tied scores
    precision = tp[last] / (tp[last] + fp[last])
    recall = tp[last] / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean((np.asarray(p, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2))


def calibration_bins(y: np.ndarray, p: np.ndarray, bins: int = 15) -> list[dict]:
    """Equal-width reliability bins: count, mean predicted risk and observed failure rate per bin."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(y, dtype=np.float64)
    b = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(b, minlength=bins)
    sum_p = np.bincount(b, weights=p, minlength=bins)
    sum_y = np.bincount(b, weights=y, minlength=bins)
    return [
        {"lo": k / bins, "hi": (k + 1) / bins, "count": int(count[k]),
         "mean_risk": float(sum_p[k] / count[k]), "failure_rate": float(sum_y[k] / count[k])}
        for k in range(bins) if count[k]
    ]  # fmt: skip


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 15) -> float:
    """ECE: count-weighted mean |observed rate - mean risk| over equal-width bins."""
    rows = calibration_bins(y, p, bins)
    n = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["failure_rate"] - r["mean_risk"]) for r in rows) / max(n, 1))


# ------------------------------------------------------------------ event-level metrics


@dataclass
class Episodes:
    """Alarm episodes at one threshold, as arrays over episodes."""

    start_ts: np.ndarray
    end_ts: np.ndarray
    gpu: np.ndarray
    next_fail: np.ndarray
    true: np.ndarray
    last_row: np.ndarray  # row (in the Labelled arrays) of each episode's last alarm


def alarm_episodes(lab: Labelled, risk: np.ndarray, threshold: float, merge_gap_s: float) -> Episodes:
    """Group records with risk >= threshold into episodes (see the module docstring)."""
    a = np.flatnonzero(risk >= threshold)
    if len(a) == 0:
        z = np.zeros(0)
        return Episodes(z, z, z.astype(np.int64), z.astype(np.int64), z.astype(bool), z.astype(np.int64))
    g, t, f, y = lab.gpu[a], lab.ts[a], lab.next_fail[a], lab.y[a]
    new = np.r_[True, (g[1:] != g[:-1]) | (np.diff(t) > merge_gap_s) | (f[1:] != f[:-1]) | (y[1:] != y[:-1])]
    first = a[new]
    last = a[np.r_[new[1:], True]]
    end_ts = lab.ts[last]
    true = lab.y[last]
    return Episodes(lab.ts[first], end_ts, lab.gpu[first], lab.next_fail[last], true, last)


def sustained_risk(
    lab: Labelled, risk: np.ndarray, records: int = 1, max_gap_s: float = 180.0, for_s: float = 0.0,
    bridge_s: float = 0.0,
) -> np.ndarray:  # fmt: skip
    """Risk as the stream's operating point sees it (`OperatingPoint`, `RiskProcessor._run`): the least of each
    record and the records before it of the same GPU back to the last one at least `for_s` seconds earlier, and
    at least `records` records in all, each linked to the one before (at most `max_gap_s` or twice the GPU's
    usual scoring interval apart; else 0: the run was broken, so a GPU's first records, or its first after a
    gap, cannot alarm until it has held that long). `value >= threshold` is then exactly the stream's alarm.

    With `bridge_s`, each record first counts as the most of itself and its linked records of the `bridge_s`
    seconds before it, so that a dip below the threshold no longer than that does not break the run: the
    stream tracks this as the ts of the GPU's last scoring at or above the threshold."""
    r = np.asarray(risk, dtype=np.float64)
    n = len(r)
    if n == 0 or (records <= 1 and for_s <= 0 and bridge_s <= 0):
        return r
    linked = _linked(lab, max_gap_s)
    if bridge_s > 0:
        r = _rolling_max(lab, r, linked, bridge_s)
    if records <= 1 and for_s <= 0:
        return r
    out = r.copy()
    whole = np.ones(n, dtype=bool)
    active = np.arange(n)  # rows whose window still reaches further back
    j = 0
    while len(active):
        j += 1
        # Row i-j is needed while fewer than `records` rows are in, or row i-j+1 is still inside the window.
        active = active[(j < records) | (lab.ts[active - j + 1] > lab.ts[active] - for_s)]
        if not len(active):
            break
        head = active - j + 1  # the row that must follow row i-j
        ok = (head > 0) & linked[np.maximum(head, 0)]
        whole[active[~ok]] = False
        active = active[ok]
        out[active] = np.minimum(out[active], r[active - j])
    return np.where(whole, out, 0.0)


def _linked(lab: Labelled, max_gap_s: float) -> np.ndarray:
    """Whether each row follows the row before it in one run of its GPU (gap at most `max_gap_s` or twice the
    GPU's usual scoring interval, and no failure between them: the stream ends a failed GPU's runs)."""
    same = lab.gpu[1:] == lab.gpu[:-1]
    dt = np.diff(lab.ts)
    limit = np.maximum(max_gap_s, 2.0 * _usual_gap(lab.gpu[1:], dt, same))
    return np.r_[False, same & (dt <= limit) & (lab.next_fail[1:] == lab.next_fail[:-1])]


def _rolling_max(lab: Labelled, r: np.ndarray, linked: np.ndarray, window_s: float) -> np.ndarray:
    """The most of each row and the rows of its linked run at most `window_s` seconds before it."""
    out = r.copy()
    active = np.arange(len(r))
    j = 0
    while len(active):
        j += 1
        head = active - j + 1
        active = active[(head > 0) & linked[np.maximum(head, 0)]]
        active = active[lab.ts[active] - lab.ts[active - j] <= window_s]
        out[active] = np.maximum(out[active], r[active - j])
    return out


def _usual_gap(gpu: np.ndarray, dt: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Per gap, the median gap between consecutive scorings of its GPU (its usual scoring interval)."""
    g, d = gpu[same], dt[same]
    out = np.zeros(len(dt))
    if not len(g):
        return out
    order = np.lexsort((d, g))
    gs, ds = g[order], d[order]
    starts = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
    counts = np.diff(np.r_[starts, len(gs)])
    med = ds[starts + counts // 2]
    per_gpu = np.zeros(int(gpu.max()) + 1)
    per_gpu[gs[starts]] = med
    return per_gpu[gpu]


def eligible_failures(lab: Labelled) -> np.ndarray:
    """Bool per failure: its GPU was scored at least once within the horizon before it."""
    seen = np.zeros(len(lab.failures.gpu), dtype=bool)
    seen[lab.next_fail[lab.y & (lab.next_fail >= 0)]] = True
    return seen


def event_metrics(
    lab: Labelled, risk: np.ndarray, threshold: float, merge_gap_s: float, mode: np.ndarray | None = None
) -> dict:
    """Precision, recall (failures with precursors), F1, false alarms per 1,000 GPU-days, lead times, per mode."""
    ep = alarm_episodes(lab, risk, threshold, merge_gap_s)
    ft = lab.failures
    eligible = eligible_failures(lab)
    target = eligible & ft.precursor
    caught = np.zeros(len(ft.gpu), dtype=bool)
    lead = np.full(len(ft.gpu), np.nan)
    if ep.true.any():
        tf = ep.next_fail[ep.true]
        caught[tf] = True
        earliest = np.full(len(ft.gpu), np.inf)
        np.minimum.at(earliest, tf, ep.start_ts[ep.true])
        lead[caught] = ft.fail_ts[caught] - earliest[caught]
    n_ep = len(ep.true)
    n_true = int(ep.true.sum())
    # False episodes that start while the precursor of the GPU's next failure is already running: alarms
    # raised too early for the horizon (the risk claims 'within the horizon'), not raised by a look-alike.
    early = 0
    if len(ft.gpu):
        nf = ep.next_fail[~ep.true]
        early = int(np.sum((nf >= 0) & (ft.precursor_start[np.maximum(nf, 0)] <= ep.start_ts[~ep.true])))
    precision = n_true / n_ep if n_ep else float("nan")
    recall = float(caught[target].sum() / max(target.sum(), 1))
    f1 = 2 * precision * recall / (precision + recall) if n_ep and precision + recall > 0 else 0.0
    leads_min = lead[caught & target] / 60.0
    # The best any detector could do: alarm the moment the precursor starts (at most the horizon before).
    ceiling_min = np.minimum(ft.fail_ts - ft.precursor_start, lab.horizon_s)[target] / 60.0
    by_mode = {}
    for m, name in enumerate(FAILURE_MODES):
        sel = eligible & (ft.mode == m)
        if sel.any():
            by_mode[name] = {"failures": int(sel.sum()), "caught": int(caught[sel].sum()),
                             "recall": float(caught[sel].mean())}  # fmt: skip
    out = {
        "threshold": float(threshold),
        "precision": float(precision),
        "recall": recall,
        "f1": float(f1),
        "alarm_episodes": n_ep,
        "true_episodes": n_true,
        "false_alarms": n_ep - n_true,
        "false_alarms_per_1000_gpu_days": (n_ep - n_true) / max(lab.gpu_days, 1e-9) * 1000.0,
        "false_alarms_in_precursor": early,
        "precision_counting_early_alarms": (n_true + early) / n_ep if n_ep else float("nan"),
        "failures_with_precursor": int(target.sum()),
        "caught_with_precursor": int(caught[target].sum()),
        "failures_all": int(eligible.sum()),
        "caught_all": int(caught[eligible].sum()),
        "recall_all": float(caught[eligible].sum() / max(eligible.sum(), 1)),
        "median_lead_min": float(np.median(leads_min)) if len(leads_min) else float("nan"),
        "p10_lead_min": float(np.percentile(leads_min, 10)) if len(leads_min) else float("nan"),
        "ceiling_median_lead_min": float(np.median(ceiling_min)) if len(ceiling_min) else float("nan"),
        "recall_by_mode": by_mode,
    }
    if mode is not None and ep.true.any():
        # The mode shown at the last alarm before the failure, the best-informed one a user saw.
        got = mode[ep.last_row[ep.true]]
        want = ft.mode[ep.next_fail[ep.true]]
        out["mode_accuracy"] = float(np.mean(got == want))
    return out


def event_pr_curve(
    lab: Labelled, risk: np.ndarray, merge_gap_s: float, n_thresholds: int = 120
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, precision, recall) at event level over a quantile grid of the risk values."""
    r = np.asarray(risk)
    values = np.unique(r)
    if len(values) <= n_thresholds:
        cand = values
    else:
        # Most records sit near zero: a fixed grid plus quantiles of the upper tail cover the useful range.
        tail = r[r >= 0.01]
        q = np.quantile(tail, np.linspace(0.0, 1.0, n_thresholds // 2)) if len(tail) else np.zeros(0)
        cand = np.unique(np.r_[np.linspace(0.01, 0.99, n_thresholds // 2), q, values[0], values[-1]])
    prec, rec = [], []
    for thr in cand:
        m = event_metrics(lab, r, float(thr), merge_gap_s)
        prec.append(m["precision"] if m["alarm_episodes"] else np.nan)
        rec.append(m["recall"])
    return cand, np.asarray(prec), np.asarray(rec)


def event_pr_auc(lab: Labelled, risk: np.ndarray, merge_gap_s: float, n_thresholds: int = 120) -> float:
    """Area under the event-level PR curve: step sum of precision over recall gains, thresholds descending."""
    _, prec, rec = event_pr_curve(lab, risk, merge_gap_s, n_thresholds)
    ok = ~np.isnan(prec)
    prec, rec = prec[ok][::-1], rec[ok][::-1]  # highest threshold first
    if not len(rec):
        return 0.0
    rec = np.maximum.accumulate(rec)  # recall can only grow as the threshold falls, up to episode merging
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


def best_threshold(
    lab: Labelled, risk: np.ndarray, merge_gap_s: float, min_precision: float = 0.0, n_thresholds: int = 120
) -> tuple[float, dict]:
    """Threshold with the best event-level F1 (among those with precision >= min_precision, if any)."""
    thr, prec, rec = event_pr_curve(lab, risk, merge_gap_s, n_thresholds)
    f1 = np.where(
        np.isnan(prec) | (prec + rec == 0), 0.0, 2 * np.nan_to_num(prec) * rec / np.maximum(prec + rec, 1e-12)
    )
    ok = np.nan_to_num(prec) >= min_precision
    k = int(np.argmax(np.where(ok, f1, -1.0))) if ok.any() else int(np.argmax(f1))
    return float(thr[k]), event_metrics(lab, risk, float(thr[k]), merge_gap_s)


ALARM_RECORDS_CHOICES = (1, 2, 3, 4, 6)  # consecutive scorings (5 s apart by default): 0 to 25 s of `for:`
# Seconds of sample time the model's score must hold (its operating points): the same at any sampling interval.
PERSISTENCE_CHOICES_S = (0.0, 10.0, 25.0, 45.0, 90.0, 150.0, 300.0, 600.0, 1200.0)


def best_operating_point(
    lab: Labelled, risk: np.ndarray, merge_gap_s: float, choices: tuple[int, ...] = ALARM_RECORDS_CHOICES
) -> tuple[float, int, dict]:
    """(threshold, alarm_records, metrics) with the best event-level F1 over thresholds and `choices` of how
    many scorings in a row an alarm needs; on a tie the shorter persistence wins (it alarms sooner)."""
    best: tuple[float, int, dict] | None = None
    for records in sorted(choices):
        thr, m = best_threshold(lab, sustained_risk(lab, risk, records), merge_gap_s)
        m["alarm_records"] = records
        if best is None or m["f1"] > best[2]["f1"] + 1e-9:
            best = (thr, records, m)
    assert best is not None
    return best


# A scorer's second column, where its records state risk at another base rate than its score's (`gpuwatch eval`
# states it at the fleet's own failure rate, as the stream does): the record-level and calibration figures read
# it; the alarms read the score, which the operating point compares, as the stream does.
AT_RISK = "@risk"


def scorer_report(
    lab: Labelled, name: str, threshold: float, merge_gap_s: float, alarm_records: int = 1, alarm_for_s: float = 0.0,
    alarm_bridge_s: float = 0.0,
) -> dict:  # fmt: skip
    """Every figure of one scorer: event metrics at `threshold` (alarms need `alarm_records` scorings in a row
    at or above it, for at least `alarm_for_s` seconds, through dips of at most `alarm_bridge_s`), event PR-AUC
    (the same alarms, over thresholds), record-level metrics (the risk: the `AT_RISK` column where there is one)."""
    alarming = sustained_risk(lab, lab.risk[name], alarm_records, for_s=alarm_for_s, bridge_s=alarm_bridge_s)
    risk = lab.risk.get(name + AT_RISK, lab.risk[name])
    out = event_metrics(lab, alarming, threshold, merge_gap_s, lab.mode.get(name))
    out["alarm_records"] = int(alarm_records)
    out["alarm_for_s"] = float(alarm_for_s)
    out["alarm_bridge_s"] = float(alarm_bridge_s)
    out["pr_auc"] = event_pr_auc(lab, alarming, merge_gap_s)
    out["record_pr_auc"] = average_precision(lab.y, risk)
    # Positives whose precursor had not started yet carry no signal; this AP leaves them out.
    drop = lab.y & ~lab.visible
    out["record_pr_auc_visible"] = average_precision(lab.y[~drop], risk[~drop])
    out["brier"] = brier_score(lab.y, risk)
    out["ece"] = expected_calibration_error(lab.y, risk)
    out["calibration"] = calibration_bins(lab.y, risk)
    out["calibration_max_gap_above_half"] = max_gap_above(out["calibration"], 0.5)
    return out


def max_gap_above(bins: list[dict], lo: float, min_count: int = 30) -> float:
    """Largest |observed rate - mean risk| over reliability bins whose mean risk is at least `lo` and that hold
    at least `min_count` records (fewer say nothing); nan when there is no such bin."""
    gaps = [abs(b["failure_rate"] - b["mean_risk"]) for b in bins if b["mean_risk"] >= lo and b["count"] >= min_count]
    return max(gaps) if gaps else float("nan")
