"""What the product did, scored: the remediation events the real policy emitted on a replayed recording.

`gpuwatch eval` replays a recording through the stream's `RiskProcessor` and the real `RemediationPolicy`
on the recording's clock, with production defaults, and hands the events here with the labels. Per action:

- an event is *true* when its GPU fails within the horizon after it (what the alarm claimed);
- *after failure* when its GPU was down (between a failure and the end of its repair): a ladder action
  there acts on the dead and must never happen; a `repair` there is the right answer to a failure;
- *early* when the precursor of the GPU's next failure was already running, more than the horizon before
  that failure (too early for the claim, but not set off by a healthy GPU);
- *look-alike* when the GPU carried a benign look-alike the simulator recorded (meta.json), else *plain*.

The net GPU-hours saved use the cost model (`gpuwatch.costs`). Per failure: what the first true checkpoint
and migration before it saved, less the cost of the true actions, less the cost of early actions; per
healthy GPU-day: the cost of the look-alike and plain false actions. Restated at another failure rate
(the real fleet's), the per-failure part scales with the failure rate and the per-GPU-day part does not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuwatch.costs import CostModel
from gpuwatch.schemas.fields import ACTIONS
from gpuwatch.training.evaluate import Labelled, eligible_failures

CAUSES = ("look-alike", "early", "plain")
ORACLE_LEAD_S = 1800.0  # the oracle checkpoints every precursor failure 30 min ahead and migrates a minute later


def poisson_upper(count: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound of a Poisson mean after observing `count` events."""
    if count < 0:
        raise ValueError("count must be >= 0")
    # Upper bound = chi2.ppf(confidence, 2 (count + 1)) / 2, found by bisection on the Poisson CDF.
    lo, hi = float(count), float(count) + 10.0 + 10.0 * math.sqrt(count + 1)
    for _ in range(200):
        mid = (lo + hi) / 2
        if _poisson_cdf(count, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def _poisson_cdf(k: int, mu: float) -> float:
    term = total = math.exp(-mu)
    for i in range(1, k + 1):
        term *= mu / i
        total += term
    return total


@dataclass
class ClassifiedEvents:
    """The events of one recording, one row each: action, ts, GPU code, next failure index, class."""

    action: np.ndarray  # str
    ts: np.ndarray
    gpu: np.ndarray
    next_fail: np.ndarray  # index into lab.failures, -1 when none
    kind: np.ndarray  # true, after_failure, look-alike, early, plain


def classify(
    events: Sequence[Mapping[str, Any]], lab: Labelled, uuids: Sequence[str], lookalike: set[str] | None = None
) -> ClassifiedEvents:
    """Classifies each event (see the module docstring). `uuids` names the GPU codes of `lab` (RiskTable.uuids);
    `lookalike` holds the uuids of GPUs the simulator gave a benign look-alike."""
    code = {u: i for i, u in enumerate(uuids)}
    ft = lab.failures
    by_gpu: dict[int, np.ndarray] = {}
    order = np.argsort(ft.gpu, kind="stable")
    for g, idx in zip(*np.unique(ft.gpu[order], return_index=True)):
        by_gpu[int(g)] = order[idx : idx + int(np.sum(ft.gpu == g))]
    none = np.zeros(0, dtype=np.int64)
    rows = []
    for e in events:
        g = code.get(str(e.get("uuid", "")), -1)
        ts = float(e["ts"])
        mine = by_gpu.get(g, none) if g >= 0 else none
        after = mine[ft.fail_ts[mine] > ts]
        nxt = int(after[np.argmin(ft.fail_ts[after])]) if len(after) else -1
        down = mine[(ft.fail_ts[mine] <= ts) & (ts < ft.repair_end[mine])]
        if len(down):
            kind = "after_failure"
        elif nxt >= 0 and ft.fail_ts[nxt] - ts <= lab.horizon_s:
            kind = "true"
        elif nxt >= 0 and ft.precursor[nxt] and ft.precursor_start[nxt] <= ts:
            kind = "early"
        elif lookalike and str(e.get("uuid", "")) in lookalike:
            kind = "look-alike"
        else:
            kind = "plain"
        rows.append((str(e["action"]), ts, g, nxt, kind))
    if not rows:
        z = np.zeros(0)
        return ClassifiedEvents(z.astype(str), z, z.astype(np.int64), z.astype(np.int64), z.astype(str))
    a, t, g, n, k = zip(*rows)
    return ClassifiedEvents(np.array(a), np.array(t, dtype=np.float64), np.array(g, dtype=np.int64),
                            np.array(n, dtype=np.int64), np.array(k))  # fmt: skip


def _first_true(ev: ClassifiedEvents, action: str, n_fail: int) -> np.ndarray:
    """Per failure: ts of the first true event of `action` before it (inf when none)."""
    first = np.full(n_fail, np.inf)
    sel = (ev.action == action) & (ev.kind == "true")
    np.minimum.at(first, ev.next_fail[sel], ev.ts[sel])
    return first


def action_report(
    events: Sequence[Mapping[str, Any]],
    lab: Labelled,
    uuids: Sequence[str],
    costs: CostModel,
    *,
    real_failures_per_gpu_day: float,
    lookalike: set[str] | None = None,
) -> dict[str, Any]:
    """Per action: share of failures with a precursor that got it before failing, its lead, false actions per
    1,000 healthy GPU-days by cause (with a 95 % upper bound), actions after failure; then the net GPU-hours
    saved per 1,000 GPU-days on this fleet and at `real_failures_per_gpu_day`, next to the oracle's."""
    ev = classify(events, lab, uuids, lookalike)
    ft = lab.failures
    n_fail = len(ft.gpu)
    eligible = eligible_failures(lab)
    target = eligible & ft.precursor
    days = max(lab.gpu_days, 1e-9)
    per_action: dict[str, Any] = {}
    for action in ACTIONS:
        mine = ev.action == action
        if action == "repair":
            down = mine & (ev.kind == "after_failure")
            per_action[action] = {"events": int(mine.sum()), "repairs_of_failures": int(down.sum()),
                                  "repairs_not_after_a_failure": int((mine & ~down).sum())}  # fmt: skip
            continue
        first = _first_true(ev, action, n_fail)
        got = np.isfinite(first) & target
        leads = (ft.fail_ts - first)[got] / 60.0
        false_counts = {c: int((mine & (ev.kind == c)).sum()) for c in CAUSES}
        healthy_false = false_counts["look-alike"] + false_counts["plain"]
        per_action[action] = {
            "events": int(mine.sum()),
            "true": int((mine & (ev.kind == "true")).sum()),
            "failures_with_precursor": int(target.sum()),
            "got_it_before_failing": int(got.sum()),
            "recall": float(got.sum() / max(target.sum(), 1)),
            "median_lead_min": float(np.median(leads)) if len(leads) else float("nan"),
            "p10_lead_min": float(np.percentile(leads, 10)) if len(leads) else float("nan"),
            "p90_lead_min": float(np.percentile(leads, 90)) if len(leads) else float("nan"),
            "false_by_cause": false_counts,
            "false_per_1000_gpu_days": {c: n / days * 1000.0 for c, n in false_counts.items()},
            "false_healthy_per_1000_gpu_days": healthy_false / days * 1000.0,
            "false_healthy_per_1000_gpu_days_upper95": poisson_upper(healthy_false) / days * 1000.0,
            "after_failure": int((mine & (ev.kind == "after_failure")).sum()),
        }
    value = net_value(ev, lab, costs, real_failures_per_gpu_day)
    return {"actions": per_action, "value": value, "gpu_days": lab.gpu_days,
            "failures": int(eligible.sum()), "failures_with_precursor": int(target.sum())}  # fmt: skip


def net_value(ev: ClassifiedEvents, lab: Labelled, costs: CostModel, real_failures_per_gpu_day: float) -> dict:
    """Net GPU-hours saved per 1,000 GPU-days: on this fleet, restated at the real failure rate, and the oracle's."""
    ft = lab.failures
    n_fail = len(ft.gpu)
    eligible = eligible_failures(lab)
    days = max(lab.gpu_days, 1e-9)
    ckpt, mig = _first_true(ev, "checkpoint", n_fail), _first_true(ev, "migrate", n_fail)
    saved = sum(
        costs.saved(None if math.isinf(ckpt[i]) else ft.fail_ts[i] - ckpt[i],
                    None if math.isinf(mig[i]) else ft.fail_ts[i] - mig[i])  # fmt: skip
        for i in np.flatnonzero(eligible)
    )
    per_failure_cost = sum(costs.action_cost(a, real=True) for a, k in zip(ev.action, ev.kind) if k == "true")
    per_failure_cost += sum(costs.action_cost(a, real=False) for a, k in zip(ev.action, ev.kind)
                            if k in ("early", "after_failure") and a != "repair")  # fmt: skip
    per_day_cost = sum(costs.action_cost(a, real=False) for a, k in zip(ev.action, ev.kind) if k in ("look-alike", "plain"))
    target = eligible & ft.precursor
    oracle = float(target.sum()) * (
        costs.saved(ORACLE_LEAD_S, ORACLE_LEAD_S - 60.0)
        - costs.action_cost("checkpoint", real=True)
        - costs.action_cost("migrate", real=True)
    )
    n = max(int(eligible.sum()), 1)
    fleet_rate = eligible.sum() / days
    scale = real_failures_per_gpu_day / fleet_rate if fleet_rate > 0 else 0.0
    net_fleet = (saved - per_failure_cost - per_day_cost) / days * 1000.0
    net_real = (saved - per_failure_cost) / days * 1000.0 * scale - per_day_cost / days * 1000.0
    oracle_real = oracle / days * 1000.0 * scale
    return {
        "saved_gpu_h": float(saved),
        "true_and_early_action_cost_gpu_h": float(per_failure_cost),
        "false_action_cost_gpu_h": float(per_day_cost),
        "saved_per_failure_gpu_h": float(saved / n),
        "net_gpu_h_per_1000_gpu_days_fleet": float(net_fleet),
        "oracle_gpu_h_per_1000_gpu_days_fleet": float(oracle / days * 1000.0),
        "real_failures_per_gpu_day": real_failures_per_gpu_day,
        "net_gpu_h_per_1000_gpu_days_real": float(net_real),
        "oracle_gpu_h_per_1000_gpu_days_real": float(oracle_real),
        "share_of_oracle_real": float(net_real / oracle_real) if oracle_real > 0 else float("nan"),
    }
