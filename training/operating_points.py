"""Choosing the operating points on validation data: the alarm's (checkpoint) and the drain's (migrate).

Each is a score threshold, how many seconds of sample time the score must hold (`PERSISTENCE_CHOICES_S`) and how
long a dip below the threshold may last without breaking the hold (`BRIDGE_CHOICES_S`). The alarm's must meet service levels on the
validation fleets (`ServiceLevels`: alarm precision, false checkpoints per 1,000 healthy GPU-days) and has the
highest recall that does. The drain's must keep false drains per 1,000 healthy GPU-days under its level and
saves the most GPU-hours per 1,000 GPU-days on a fleet failing at the real rate, under the cost model
(`gpuwatch.costs`). Neither is the best F1 on a fleet failing thousands of times more often: there a false
alarm costs almost nothing next to the failures it sits among, on a real fleet it is most of what the product
does. The healthy GPU-days come mostly from val-healthy, a fleet at the real failure rate.

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
from gpuwatch.streams.operating_point import MIN_RECORDS
from gpuwatch.training.actions import classify, net_value
from gpuwatch.training.evaluate import PERSISTENCE_CHOICES_S, Labelled, event_metrics, sustained_risk

# Dips a hold may bridge (seconds; each used only with a longer persistence): a score that flickers about the
# threshold near a failure (scripts/precursor-sweep.py found most missed failures there) can still alarm.
BRIDGE_CHOICES_S = (0.0, 15.0, 45.0, 120.0)


@dataclass(frozen=True)
class Choice:
    threshold: float
    for_s: float
    value: dict[str, Any]
    bridge_s: float = 0.0


# Every candidate the alarm search valued (threshold, seconds held, net GPU-hours with checkpoints alone and with a
# migration at the same point, false healthy actions): kept in the artifact, so the choice can be inspected.
Curve = list[dict[str, Any]]


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


@dataclass(frozen=True)
class ServiceLevels:
    """What the operating points must meet on the validation fleets (the issue's figures, as design goals):
    alarm precision over episodes, and false checkpoints and drains per 1,000 healthy GPU-days."""

    min_alarm_precision: float = 0.9
    max_false_checkpoints: float = 1.0
    max_false_drains: float = 0.05


def _healthy_false(ev: Any, action: str, days: float) -> float:
    """False actions of `action` on healthy GPUs (plain or look-alike), per 1,000 GPU-days."""
    mine = ev.action == action
    return float(((ev.kind == "plain") | (ev.kind == "look-alike"))[mine].sum()) / max(days, 1e-9) * 1000.0


def choose(
    lab: Labelled, uuids: Sequence[str], risk: np.ndarray, costs: CostModel, real_failures_per_gpu_day: float,
    merge_gap_s: float = 600.0, choices: tuple[float, ...] = PERSISTENCE_CHOICES_S, curve: Curve | None = None,
    levels: ServiceLevels = ServiceLevels(), bridges: tuple[float, ...] = BRIDGE_CHOICES_S,
) -> tuple[Choice, Choice | None]:  # fmt: skip
    """(alarm, drain) operating points on `lab`, the validation fleets pooled.

    The alarm's (the first action, a checkpoint, and the alerts): the highest recall of failures with a precursor
    among the candidates whose alarm precision is at least `levels.min_alarm_precision` and whose false
    checkpoints on healthy GPUs are at most `levels.max_false_checkpoints` per 1,000 GPU-days; ties go to the
    most net GPU-hours at the real failure rate. Without such a candidate, the one with the most net GPU-hours.
    The drain's (migrate, then reboot), at least as strict: the most net GPU-hours at the real failure rate among
    those with at most `levels.max_false_drains` false drains per 1,000 GPU-days, if any beats checkpoints alone
    (else None: the model never drains). Every alarm candidate lands in `curve`."""
    sustained = {(k, b): sustained_risk(lab, risk, MIN_RECORDS, for_s=k, bridge_s=b)
                 for k in sorted(choices) for b in sorted(bridges) if b == 0 or b < k}  # fmt: skip
    key = "net_gpu_h_per_1000_gpu_days_real"
    days = lab.gpu_days
    curve = [] if curve is None else curve
    candidates = []
    for (k, b), s in sustained.items():
        for thr in _grid(risk)[::-1]:
            rows = s >= thr
            ev = classify(simulated_events(lab, uuids, rows, None, merge_gap_s), lab, uuids)
            v = net_value(ev, lab, costs, real_failures_per_gpu_day)
            m = event_metrics(lab, s, float(thr), merge_gap_s)
            entry = {"threshold": float(thr), "for_s": k, "bridge_s": b, "precision": m["precision"],
                     "recall": m["recall"], "median_lead_min": m["median_lead_min"],
                     "false_checkpoints_per_1000_gpu_days": _healthy_false(ev, "checkpoint", days),
                     "net_checkpoint": v[key]}  # fmt: skip
            curve.append(entry)
            candidates.append((entry, Choice(float(thr), k, v, b)))
    ok = [(e, c) for e, c in candidates if np.nan_to_num(e["precision"]) >= levels.min_alarm_precision
          and e["false_checkpoints_per_1000_gpu_days"] <= levels.max_false_checkpoints]  # fmt: skip
    if ok:
        alarm = max(ok, key=lambda ec: (round(ec[0]["recall"], 6), ec[1].value[key]))[1]
    else:
        alarm = max(candidates, key=lambda ec: ec[1].value[key])[1]
    alarm_rows = sustained[alarm.for_s, alarm.bridge_s] >= alarm.threshold
    drain: Choice | None = None
    for (k, b), s in sustained.items():
        if k < alarm.for_s:
            continue  # the drain operating point is the stricter one: never drain what is not in alarm
        for thr in _grid(risk)[::-1]:
            if thr < alarm.threshold:
                continue
            events = simulated_events(lab, uuids, alarm_rows, (s >= thr) & alarm_rows, merge_gap_s)
            ev = classify(events, lab, uuids)
            if _healthy_false(ev, "migrate", days) > levels.max_false_drains:
                continue
            v = net_value(ev, lab, costs, real_failures_per_gpu_day)
            if v[key] > (drain.value[key] if drain else alarm.value[key]) + 1e-9:
                drain = Choice(float(thr), k, v, b)
    return alarm, drain


def describe(lab: Labelled, risk: np.ndarray, choice: Choice, merge_gap_s: float) -> dict[str, Any]:
    """The event-level figures (precision, recall, F1, leads) of an operating point, for the artifact's metrics."""
    m = event_metrics(lab, sustained_risk(lab, risk, MIN_RECORDS, for_s=choice.for_s, bridge_s=choice.bridge_s),
                      choice.threshold, merge_gap_s)  # fmt: skip
    return {**m, "alarm_records": MIN_RECORDS, "alarm_for_s": choice.for_s, "alarm_bridge_s": choice.bridge_s,
            "value": choice.value}  # fmt: skip
