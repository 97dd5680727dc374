"""Choosing the operating points on validation data: the alarm's (checkpoint) and the drain's (migrate).

Each is a score threshold and a number of scorings in a row. They are chosen for the most GPU-hours saved
per 1,000 GPU-days on a fleet failing at the real rate, under the cost model (`gpuwatch.costs`), not for
the best F1 on a fleet failing thousands of times more often: there a false alarm costs almost nothing
next to the failures it sits among, on a real fleet it is most of what the product does.

The value of a candidate is computed from the validation records without replaying the policy for each
(vectorised): a checkpoint at the first alarm of each alarm episode (alarms less than `merge_gap_s` apart),
a migration at the episode's first drain-level record at least `grace_s` after its checkpoint; then the
events are classified and valued as the evaluation does (`training/actions.py`). The cooldown between
episodes is left out here; `gpuwatch eval` replays the real policy and reports what it really does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuwatch.costs import CostModel
from gpuwatch.training.actions import classify, net_value
from gpuwatch.training.evaluate import ALARM_RECORDS_CHOICES, Labelled, event_metrics, sustained_risk


@dataclass(frozen=True)
class Choice:
    threshold: float
    records: int
    value: dict[str, Any]


def _grid(risk: np.ndarray, n: int = 60, floor: float = 0.05) -> np.ndarray:
    """Candidate thresholds: a fixed grid and quantiles of the upper tail of the scores."""
    tail = risk[risk >= floor]
    q = np.quantile(tail, np.linspace(0.0, 1.0, n)) if len(tail) else np.zeros(0)
    return np.unique(np.round(np.r_[np.linspace(floor, 0.995, n), q], 4))


def _episode_starts(lab: Labelled, on: np.ndarray, merge_gap_s: float) -> np.ndarray:
    """Rows (indices) where an episode of `on` rows begins: a GPU's first `on` row or one after a long gap."""
    rows = np.flatnonzero(on)
    if not len(rows):
        return rows
    g, t = lab.gpu[rows], lab.ts[rows]
    new = np.r_[True, (g[1:] != g[:-1]) | (np.diff(t) > merge_gap_s)]
    return rows[new]


def simulated_events(
    lab: Labelled, uuids: Sequence[str], alarm: np.ndarray, drain: np.ndarray | None, merge_gap_s: float,
    grace_s: float = 60.0,
) -> list[dict[str, Any]]:  # fmt: skip
    """The policy's checkpoint and migrate events for boolean alarm and drain series over `lab`'s rows."""
    on = alarm | drain if drain is not None else alarm
    starts = _episode_starts(lab, on, merge_gap_s)
    events = [{"action": "checkpoint", "ts": float(lab.ts[r]), "uuid": uuids[int(lab.gpu[r])]} for r in starts]
    if drain is not None and drain.any() and len(starts):
        # Each drain row belongs to the episode that started last on its GPU at or before it.
        d = np.flatnonzero(drain)
        ep = np.searchsorted(starts, d, side="right") - 1
        ok = (ep >= 0) & (lab.gpu[starts[np.maximum(ep, 0)]] == lab.gpu[d])
        ok &= lab.ts[d] - lab.ts[starts[np.maximum(ep, 0)]] >= grace_s
        # Same episode: no gap longer than merge_gap_s between its start and the drain row.
        seen: set[int] = set()
        on_rows = np.flatnonzero(on)
        for row, e in zip(d[ok].tolist(), ep[ok].tolist()):
            if e in seen:
                continue
            between = on_rows[(on_rows >= starts[e]) & (on_rows <= row)]
            if len(between) and np.diff(lab.ts[between]).max(initial=0.0) > merge_gap_s:
                continue
            seen.add(e)
            events.append({"action": "migrate", "ts": float(lab.ts[row]), "uuid": uuids[int(lab.gpu[row])]})
    return events


def value(
    lab: Labelled, uuids: Sequence[str], alarm: np.ndarray, drain: np.ndarray | None, costs: CostModel,
    real_failures_per_gpu_day: float, merge_gap_s: float,
) -> dict[str, Any]:  # fmt: skip
    events = simulated_events(lab, uuids, alarm, drain, merge_gap_s)
    return net_value(classify(events, lab, uuids), lab, costs, real_failures_per_gpu_day)


def choose(
    lab: Labelled, uuids: Sequence[str], risk: np.ndarray, costs: CostModel, real_failures_per_gpu_day: float,
    merge_gap_s: float = 600.0, choices: tuple[int, ...] = ALARM_RECORDS_CHOICES,
) -> tuple[Choice, Choice | None]:  # fmt: skip
    """(alarm, drain) operating points with the most net GPU-hours at the real failure rate on `lab`.

    The alarm's is chosen first, each candidate valued with the better of no migration and a migration at the
    same operating point; then the drain's, at least as strict in threshold and persistence, given the alarm's
    (None when no drain operating point adds value to checkpoints alone). Ties go to the higher threshold and the
    shorter persistence. The returned alarm Choice's value is that of checkpoints alone."""
    sustained = {k: sustained_risk(lab, risk, k) for k in sorted(choices)}
    key = "net_gpu_h_per_1000_gpu_days_real"
    best: Choice | None = None
    # An alarm is worth what it is worth with the best of its follow-ups: nothing, or a migration at the same
    # operating point (a checkpoint alone rarely pays: it saves work only when the failure comes soon after).
    for k, s in sustained.items():
        for thr in _grid(risk)[::-1]:
            rows = s >= thr
            v = max((value(lab, uuids, rows, d, costs, real_failures_per_gpu_day, merge_gap_s) for d in (None, rows)),
                    key=lambda x: x[key])  # fmt: skip
            if best is None or v[key] > best.value[key] + 1e-9:
                best = Choice(float(thr), k, v)
    assert best is not None
    best = Choice(best.threshold, best.records,
                  value(lab, uuids, sustained[best.records] >= best.threshold, None, costs, real_failures_per_gpu_day,
                        merge_gap_s))  # fmt: skip
    alarm_rows = sustained[best.records] >= best.threshold
    drain_best: Choice | None = None
    base = best.value[key]  # checkpoints alone
    for k, s in sustained.items():
        if k < best.records:
            continue  # the drain operating point is the stricter one: never drain what is not in alarm
        for thr in _grid(risk)[::-1]:
            if thr < best.threshold:
                continue
            v = value(lab, uuids, alarm_rows, (s >= thr) & alarm_rows, costs, real_failures_per_gpu_day, merge_gap_s)
            if v[key] > (drain_best.value[key] if drain_best else base) + 1e-9:
                drain_best = Choice(float(thr), k, v)
    return best, drain_best


def describe(lab: Labelled, risk: np.ndarray, choice: Choice, merge_gap_s: float) -> dict[str, Any]:
    """The event-level figures (precision, recall, F1, leads) of an operating point, for the artifact's metrics."""
    m = event_metrics(lab, sustained_risk(lab, risk, choice.records), choice.threshold, merge_gap_s)
    return {**m, "alarm_records": choice.records, "value": choice.value}
