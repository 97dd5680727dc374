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


def weighted_poisson_upper(terms: list[tuple[int, float]], confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of sum(a x mean) for independent Poisson counts, given (count, a) per count
    (the Fay-Feuer gamma method: a gamma with the estimate's mean and variance, widened by the largest `a`).
    Equals `poisson_upper(count) x a` for a single count."""
    if not terms:
        return 0.0
    if any(c < 0 or a < 0 for c, a in terms):
        raise ValueError("counts and weights must be >= 0")
    y = sum(a * c for c, a in terms)
    v = sum(a * a * c for c, a in terms)
    top = max(a for _, a in terms)
    if top == 0:
        return 0.0
    shape, scale = (y + top) ** 2 / (v + top * top), (v + top * top) / (y + top)
    return scale * _gamma_quantile(confidence, shape)


def _gamma_quantile(q: float, shape: float) -> float:
    """The `q` quantile of a gamma of `shape` and scale 1, by bisection on its CDF."""
    lo, hi = 0.0, shape + 10.0 + 10.0 * math.sqrt(shape)
    for _ in range(200):
        mid = (lo + hi) / 2
        if _gamma_cdf(mid, shape) < q:
            lo = mid
        else:
            hi = mid
    return hi


def _gamma_cdf(x: float, shape: float) -> float:
    """The regularised lower incomplete gamma P(shape, x): a series below shape + 1, a continued fraction above."""
    if x <= 0:
        return 0.0
    log_front = shape * math.log(x) - x - math.lgamma(shape)
    if x < shape + 1:
        term = total = 1.0 / shape
        n = shape
        while term > total * 1e-15:
            n += 1
            term *= x / n
            total += term
        return min(1.0, total * math.exp(log_front))
    # Lentz's continued fraction for the upper tail Q(shape, x).
    tiny = 1e-300
    b = x + 1 - shape
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - shape)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return max(0.0, 1.0 - h * math.exp(log_front))


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
    `lookalike` holds the uuids of GPUs the simulator gave a benign look-alike. Vectorised: the operating point
    search classifies thousands of candidate event sets."""
    code = {u: i for i, u in enumerate(uuids)}
    ft = lab.failures
    n = len(events)
    action = np.array([str(e["action"]) for e in events], dtype=object)
    ts = np.fromiter((float(e["ts"]) for e in events), dtype=np.float64, count=n)
    uuid = [str(e.get("uuid", "")) for e in events]
    gpu = np.fromiter((code.get(u, -1) for u in uuid), dtype=np.int64, count=n)
    nxt = np.full(n, -1, dtype=np.int64)
    down = np.zeros(n, dtype=bool)
    if len(ft.gpu) and n:
        t0 = min(float(ft.fail_ts.min()), float(ts.min()))
        key_f = ft.gpu * 1e9 + (ft.fail_ts - t0)  # FailureTable rows are sorted by (gpu, fail_ts)
        key_e = gpu * 1e9 + (ts - t0)
        after = np.searchsorted(key_f, key_e, side="right")  # first failure strictly after the event
        a = np.minimum(after, len(ft.gpu) - 1)
        mine = (after < len(ft.gpu)) & (ft.gpu[a] == gpu) & (gpu >= 0)
        nxt = np.where(mine, a, -1)
        b = np.maximum(after - 1, 0)
        down = (after > 0) & (ft.gpu[b] == gpu) & (gpu >= 0) & (ft.fail_ts[b] <= ts) & (ts < ft.repair_end[b])
    safe = np.maximum(nxt, 0)
    to_fail = np.where(nxt >= 0, ft.fail_ts[safe] - ts, np.inf) if len(ft.gpu) else np.full(n, np.inf)
    running = (nxt >= 0) & (ft.precursor[safe] if len(ft.gpu) else False) & (
        (ft.precursor_start[safe] <= ts) if len(ft.gpu) else False)  # fmt: skip
    look = np.array([u in lookalike for u in uuid], dtype=bool) if lookalike else np.zeros(n, dtype=bool)
    kind = np.where(down, "after_failure", np.where(to_fail <= lab.horizon_s, "true",
                    np.where(running, "early", np.where(look, "look-alike", "plain"))))  # fmt: skip
    return ClassifiedEvents(action.astype(str), ts, gpu, np.where(down, -1, nxt), kind.astype(str))


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
        "events": {k: int((ev.kind == k).sum()) for k in ("true", "early", "look-alike", "plain", "after_failure")},
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
