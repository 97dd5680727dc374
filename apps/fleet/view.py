"""The fleet reliability view: MTBF by group, failures expected in the next day and week, the share of a big
job's checkpoint intervals lost to a failure, and the spares to hold, from a failure history and the live risk.

`fleet_view(history, live, options)` returns plain data (JSON-ready); `format_view` renders it as text for
`gpuwatch fleet`, the report and the Prometheus exporter take the same dict. Either input may be missing:
without live risk the next day is forecast from the rate, without history the rate is the setting
`fleet_failure_rate_per_gpu_day` (taken as known: no interval) and there is no MTBF by group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.schemas.records import FleetGpu

from . import estimators as est
from .history import UNKNOWN, FailureHistory

JOB_SIZES = (8, 64, 256, 1024, 4096, 16384)  # the job-size curve of the report and the exporter


@dataclass(frozen=True)
class LiveRisk:
    """The newest risk of every GPU (RiskClient.fleet()): `risk` per GPU within `horizon_s`, `failed` and
    `stale` flags, in the same order as `gpus`."""

    gpus: tuple[tuple[str, int], ...]
    risk: np.ndarray
    failed: np.ndarray
    stale: np.ndarray
    horizon_s: float

    @classmethod
    def from_records(cls, records: Sequence[FleetGpu], horizon_s: float) -> LiveRisk:
        return cls(
            gpus=tuple((r.host, r.gpu_index) for r in records),
            risk=np.array([r.risk for r in records], dtype=np.float64),
            failed=np.array([r.failed for r in records], dtype=bool),
            stale=np.array([r.stale for r in records], dtype=bool),
            horizon_s=float(horizon_s),
        )


@dataclass(frozen=True)
class FleetOptions:
    """What the planner asks about; the defaults are the cost model's job (settings policy_job_*)."""

    base_rate_per_gpu_day: float = 1.943e-4  # settings.fleet_failure_rate_per_gpu_day
    level: float = est.LEVEL
    short_window_h: float = 24.0
    long_window_days: float = 7.0
    job_gpus: int = 1024
    checkpoint_interval_s: float = 3600.0
    service_level: float = 0.95
    turnaround_days: float | None = None  # None: the history's mean repair time, else the trace's


def trace_mean_repair_days() -> float:
    """Mean repair time of the StepFun trace's GPU faults (days), as the simulator draws it: the mode mix over
    each mode's percentiles, interpolated in log space between them (integrated exactly)."""
    from gpuwatch.simulator import faults

    total = weight = 0.0
    for mode, share in faults.MODE_MIX.items():
        logq = np.log(np.maximum(np.asarray(faults.REPAIR_QUANTILES_H[mode]) * 3600.0, faults.MIN_REPAIR_S))
        width = np.diff(np.asarray(faults.REPAIR_PCTS)) / 100.0
        a, b = logq[:-1], logq[1:]
        flat = np.isclose(a, b)
        seg = np.where(flat, np.exp(a), (np.exp(b) - np.exp(a)) / np.where(flat, 1.0, b - a))
        total += share * float((seg * width).sum())
        weight += share
    return total / weight / est.DAY_S


def _group(failures: int, exposure: float, level: float) -> dict[str, Any]:
    out: dict[str, Any] = {"failures": failures, "exposure_gpu_days": exposure}
    if exposure > 0:
        out["mtbf_gpu_days"] = est.mtbf(failures, exposure, level).as_dict()
    return out


def _mtbf_groups(history: FailureHistory, exposure: np.ndarray, level: float) -> dict[str, dict[str, Any]]:
    """MTBF per failure mode, GPU model and host: each group's failures over its GPUs' up-time (a mode's over
    the whole fleet's)."""
    slot = {g: i for i, g in enumerate(history.gpus)}
    fails = [f for f in history.in_window() if (f.host, f.gpu_index) in slot]
    total = float(exposure.sum())
    modes = [m for m in FAILURE_MODES if m != "none"]
    modes += sorted({f.mode for f in fails} - set(modes))
    by_mode = {m: _group(sum(f.mode == m for f in fails), total, level) for m in modes}
    if all(f.mode == UNKNOWN for f in fails):  # outcomes record no mode: say nothing rather than zeros
        by_mode = {UNKNOWN: _group(len(fails), total, level)} if fails else {}
    host_of = np.array([h for h, _ in history.gpus], dtype=object)
    hosts = sorted(set(host_of.tolist()))
    host_exposure = {h: 0.0 for h in hosts}
    for h, e in zip(host_of.tolist(), exposure.tolist()):
        host_exposure[h] += e
    host_fail: dict[str, int] = {}
    for f in fails:
        host_fail[f.host] = host_fail.get(f.host, 0) + 1
    by_host = {h: _group(host_fail.get(h, 0), host_exposure[h], level) for h in hosts}
    model_exposure: dict[str, float] = {}
    model_fail: dict[str, int] = {}
    for h in hosts:
        m = history.model_of(h)
        model_exposure[m] = model_exposure.get(m, 0.0) + host_exposure[h]
        model_fail[m] = model_fail.get(m, 0) + host_fail.get(h, 0)
    by_model = {m: _group(model_fail[m], model_exposure[m], level) for m in sorted(model_exposure)}
    return {"mode": by_mode, "model": by_model, "host": by_host}


def _trimmed(pmf: np.ndarray) -> list[float]:
    """The pmf up to where its tail holds less than 1e-6 (what a plot needs)."""
    cdf = np.cumsum(pmf)
    end = int(np.searchsorted(cdf, 1.0 - 1e-6)) + 1
    return [float(x) for x in pmf[: max(end, 1)]]


def fleet_view(history: FailureHistory | None, live: LiveRisk | None, opts: FleetOptions) -> dict[str, Any]:
    """The fleet's reliability figures as plain data; see docs/fleet.md for each one's method."""
    level = opts.level
    view: dict[str, Any] = {
        "level": level,
        "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
    }

    # The fleet now: the GPUs with live risk, else the history's.
    if live is not None and len(live.gpus):
        n_gpus = len(live.gpus)
        view["fleet"] = {"gpus": n_gpus, "failed_now": int(live.failed.sum()), "stale": int(live.stale.sum()),
                         "source": "live risk"}  # fmt: skip
    elif history is not None:
        n_gpus = len(history.gpus)
        view["fleet"] = {"gpus": n_gpus, "failed_now": None, "stale": None, "source": "history"}
    else:
        raise ValueError("the fleet view needs a failure history or live risk (or both)")

    # The failure rate per GPU-day: observed when there is a history, else the setting.
    availability = 1.0
    failures = exposure_total = None
    if history is not None and history.days > 0 and len(history.gpus):
        exposure = history.exposure_gpu_days()
        exposure_total = float(exposure.sum())
        slot = set(history.gpus)
        window = history.in_window()
        failures = sum((f.host, f.gpu_index) in slot for f in window)
        availability = exposure_total / (len(history.gpus) * history.days)
        rate = est.rate_interval(failures, exposure_total, level)
        view["history"] = {
            "source": history.source, "start_ts": history.start_ts, "end_ts": history.end_ts, "days": history.days,
            "gpus": len(history.gpus), "failures": failures, "failures_outside_fleet": len(window) - failures,
            "exposure_gpu_days": exposure_total, "availability": availability, "repairs_known": history.repairs_known,
        }  # fmt: skip
        view["mtbf"] = _mtbf_groups(history, exposure, level)
        rate_source = "history"
    else:
        r = opts.base_rate_per_gpu_day
        rate = est.Estimate(r, r, r, level)
        view["history"] = None
        view["mtbf"] = {}
        rate_source = "setting"
    view["rate_per_gpu_day"] = {**rate.as_dict(), "source": rate_source}
    up_gpus = n_gpus * availability
    fleet_mtbf_h = lambda r: math.inf if r <= 0 else 24.0 / (r * up_gpus)  # noqa: E731
    view["fleet_mtbf_h"] = est.Estimate(
        fleet_mtbf_h(rate.value), fleet_mtbf_h(rate.upper), fleet_mtbf_h(rate.lower), level
    ).as_dict()

    def from_rate(days: float) -> tuple[est.Estimate, np.ndarray]:
        future = up_gpus * days
        if failures is not None and exposure_total:
            pmf = est.predictive_pmf(failures, exposure_total, future)
            return est.predictive_count_interval(failures, exposure_total, future, level), pmf
        mu = rate.value * future
        lo, hi = est.poisson_interval(mu, level)
        return est.Estimate(mu, lo, hi, level), est.poisson_pmf(mu)

    # Next day: the sum of the live GPUs' calibrated risks; without live risk, the rate.
    short_days = opts.short_window_h / 24.0
    if live is not None and len(live.gpus):
        up = ~live.failed
        p = est.window_failure_probability(live.risk[up], live.horizon_s, opts.short_window_h * 3600.0,
                                           opts.base_rate_per_gpu_day)  # fmt: skip
        short, short_pmf, short_source = (
            est.poisson_binomial_interval(p, level),
            est.poisson_binomial_pmf(p),
            "risk",
        )
        at_risk = np.argsort(-p)[:10]
        view["riskiest"] = [{"gpu": f"{live.gpus[j][0]}:{live.gpus[j][1]}", "p_fail": float(p[i])}
                            for i, j in zip(at_risk.tolist(), np.flatnonzero(up)[at_risk].tolist())]  # fmt: skip
    else:
        short, short_pmf = from_rate(short_days)
        short_source = rate_source
    long, long_pmf = from_rate(opts.long_window_days)
    view["forecast"] = {
        "short": {**short.as_dict(), "hours": opts.short_window_h, "source": short_source, "pmf": _trimmed(short_pmf)},
        "long": {**long.as_dict(), "days": opts.long_window_days, "source": rate_source,
                 "gpu_days": up_gpus * opts.long_window_days, "pmf": _trimmed(long_pmf)},
    }  # fmt: skip

    # A job of N GPUs: the share of its checkpoint intervals that a failure ends.
    job = est.job_interruption(opts.job_gpus, opts.checkpoint_interval_s, rate)
    curve = sorted(set(JOB_SIZES) | {opts.job_gpus})
    view["job"] = {
        "gpus": opts.job_gpus, "checkpoint_interval_s": opts.checkpoint_interval_s, "interrupted": job.as_dict(),
        "curve": [{"gpus": n, **est.job_interruption(n, opts.checkpoint_interval_s, rate).as_dict()} for n in curve],
    }  # fmt: skip

    # Spares: GPUs in repair at once, covered with probability service_level.
    if opts.turnaround_days is not None:
        turnaround, t_source = opts.turnaround_days, "given"
    elif history is not None and history.repair_days():
        turnaround, t_source = float(np.mean(history.repair_days())), "history"
    else:
        turnaround, t_source = trace_mean_repair_days(), "trace"
    mean_down, pmf = est.in_repair_pmf(n_gpus, turnaround, failures, exposure_total or 0.0, rate.value)
    view["spares"] = {
        "spares": est.spares_needed(pmf, opts.service_level), "service_level": opts.service_level,
        "mean_in_repair": mean_down, "turnaround_days": turnaround, "turnaround_source": t_source,
        "pmf": _trimmed(pmf),
    }  # fmt: skip
    return view


def count_text(x: float) -> str:
    """An expected count or a number of hours as people read it: 1,234 / 12.3 / 0.0031."""
    if not math.isfinite(x):
        return "inf"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2g}"


def _days(d: float) -> str:
    if not math.isfinite(d):
        return "inf"
    return f"{d / 365.25:.1f} y" if d >= 730 else f"{d:,.0f} d" if d >= 10 else f"{d:.2f} d"


def _mtbf_line(name: str, g: dict[str, Any]) -> str:
    m = g.get("mtbf_gpu_days")
    if m is None:
        return f"  {name:<16} {g['failures']:>6}  no exposure"
    return (f"  {name:<16} {g['failures']:>6}  {_days(m['value']):>9}  ({_days(m['lower'])} - {_days(m['upper'])})"
            f"  over {g['exposure_gpu_days']:,.0f} GPU-days")  # fmt: skip


def format_view(view: dict[str, Any], worst_hosts: int = 10) -> str:
    """`gpuwatch fleet`'s text: one line per figure, then MTBF tables by mode, model and the worst hosts."""
    pct = f"{view['level']:.0%}"
    fleet, hist, rate = view["fleet"], view["history"], view["rate_per_gpu_day"]
    lines = []
    now = f"{fleet['gpus']:,} GPUs"
    if fleet["failed_now"] is not None:
        now += f" with live risk ({fleet['failed_now']} failed now, {fleet['stale']} stale)"
    lines.append(f"Fleet: {now}")
    if hist:
        lines.append(f"History: {hist['source']}: {hist['days']:.1f} days, {hist['gpus']:,} GPUs up "
                     f"{hist['availability']:.1%} of the time, {hist['failures']} failures"
                     + ("" if hist["repairs_known"] else " (repair times not recorded: every GPU counted as up)")
                     + (f"; {hist['failures_outside_fleet']} more on GPUs outside the fleet, not counted"
                        if hist["failures_outside_fleet"] else ""))  # fmt: skip
    lines.append(f"Failure rate: {rate['value']:.3g} per GPU-day"
                 + (f" ({pct}: {rate['lower']:.3g} - {rate['upper']:.3g})" if rate["source"] == "history"
                    else " (setting fleet_failure_rate_per_gpu_day; no history given)")
                 + f"; a failure somewhere in the fleet every {count_text(view['fleet_mtbf_h']['value'])} h")  # fmt: skip
    s, lg = view["forecast"]["short"], view["forecast"]["long"]
    src = {"risk": "sum of live risk", "history": "observed rate", "setting": "setting's rate"}
    lines.append(f"Next {s['hours']:g} h: {count_text(s['value'])} failures expected ({pct}: {s['lower']:.0f} - "
                 f"{s['upper']:.0f}), {src[s['source']]}")  # fmt: skip
    lines.append(f"Next {lg['days']:g} days: {count_text(lg['value'])} failures expected ({pct}: {lg['lower']:.0f} - "
                 f"{lg['upper']:.0f}), {src[lg['source']]} x {lg['gpu_days']:,.0f} GPU-days")  # fmt: skip
    j = view["job"]
    lines.append(f"Job of {j['gpus']:,} GPUs checkpointing every {j['checkpoint_interval_s'] / 60:g} min: "
                 f"{j['interrupted']['value']:.1%} of its checkpoint intervals end in a failure "
                 f"({pct}: {j['interrupted']['lower']:.1%} - {j['interrupted']['upper']:.1%})")  # fmt: skip
    sp = view["spares"]
    lines.append(f"Spares: hold {sp['spares']} GPUs to cover every GPU in repair {sp['service_level']:.0%} of the "
                 f"time (mean {count_text(sp['mean_in_repair'])} in repair; turnaround {sp['turnaround_days']:.1f} days, "
                 f"from the {sp['turnaround_source']})")  # fmt: skip
    mt = view["mtbf"]
    if mt:
        lines.append(f"MTBF per GPU ({pct} interval) by failure mode:      failures       MTBF")
        lines += [_mtbf_line(m, g) for m, g in mt["mode"].items()]
        lines.append("by GPU model:")
        lines += [_mtbf_line(m, g) for m, g in mt["model"].items()]
        hosts = sorted(mt["host"].items(), key=lambda kv: -kv[1]["failures"])[:worst_hosts]
        lines.append(f"by host ({len(hosts)} with the most failures of {len(mt['host']):,}):")
        lines += [_mtbf_line(h, g) for h, g in hosts]
    return "\n".join(lines)
