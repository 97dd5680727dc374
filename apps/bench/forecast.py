"""`gpuwatch bench forecast`: the fleet view's estimates against a simulated fleet whose rates are known.

Per seed, a fleet is simulated for `history_days + forecast_days` (failures and repairs only matter, so it steps
an hour at a time; the simulator's labels are the history, no model scores anything). The view learns from the
first `history_days` and predicts the next `forecast_days`. The simulator knows each GPU's hazard (base rate x
rate_scale x its host's frailty), so the truth of the forecast week is the Poisson count whose mean is the sum
of hazard x up-time of every GPU over that week. Checked per seed:

- hit: the predicted count lies within the truth's central interval (the issue's figure: 9 of 10 seeds);
- covered: the count that actually happened lies within the predicted interval;
- the rate's and each failure mode's MTBF interval (history window) contain the true ones;
- spares: the share of the forecast week during which more GPUs were in repair than the spares figure (the
  service level promises at most 1 - service level).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from gpuwatch.apps.bench.table import emit
from gpuwatch.apps.fleet import estimators as est
from gpuwatch.apps.fleet.history import Failure, FailureHistory
from gpuwatch.apps.fleet.view import FleetOptions, fleet_view
from gpuwatch.simulator import faults
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator

START_TS = 1_700_000_000.0


def simulate_failures(
    seed: int, hosts: int, gpus_per_host: int, days: float, rate_scale: float, interval_s: float = 3600.0,
) -> tuple[FailureHistory, np.ndarray]:  # fmt: skip
    """A simulated fleet's failures over `days` (as a history over the whole run) and each GPU's hazard."""
    sim = FleetSimulator(FleetConfig(hosts=hosts, gpus_per_host=gpus_per_host, seed=seed, interval_s=interval_s,
                                     rate_scale=rate_scale, start_ts=START_TS))  # fmt: skip
    labels: list[dict[str, Any]] = []
    for _ in range(int(round(days * est.DAY_S / interval_s))):
        sim.step_json()
        labels += sim.drain_labels()
    failures = tuple(
        Failure(host=lab["host"], gpu_index=lab["gpu_index"], fail_ts=lab["fail_ts"], mode=lab["mode"],
                repair_end_ts=lab["repair_end_ts"], uuid=lab["uuid"])
        for lab in labels
    )  # fmt: skip
    history = FailureHistory(
        start_ts=START_TS, end_ts=sim.now, gpus=tuple((h, g) for h in sim.hosts for g in range(gpus_per_host)),
        failures=failures, gpu_model=dict(zip(sim.hosts, sim.host_hardware)), source=f"simulator seed {seed}",
    )  # fmt: skip
    return history, sim.hazard_per_gpu_day


def _in_repair(history: FailureHistory, start: float, end: float, step_s: float = 600.0) -> np.ndarray:
    """GPUs in repair at each `step_s` of [start, end)."""
    t = np.arange(start, end, step_s)
    down = np.zeros(t.size)
    for f in history.failures:
        back = end if f.repair_end_ts is None else f.repair_end_ts
        down += (t >= f.fail_ts) & (t < back)
    return down


def check_seed(
    seed: int, *, hosts: int, gpus_per_host: int, rate_scale: float, history_days: float, forecast_days: float,
    level: float, service_level: float, warmup_days: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """One seed: fit on the history window, predict the forecast window, compare with the simulator's truth.

    The history starts after `warmup_days`: a simulated fleet starts with every GPU up, and the GPUs in repair
    at once reach their steady state only once the longest repairs (92 days in the trace) have had time to
    happen; the failures of the warm-up still count for the GPUs they keep in repair."""
    days = warmup_days + history_days + forecast_days
    whole, hazard = simulate_failures(seed, hosts, gpus_per_host, days, rate_scale)
    t0 = START_TS + warmup_days * est.DAY_S
    t1 = t0 + history_days * est.DAY_S
    t2 = t1 + forecast_days * est.DAY_S
    past, future = whole.window(t0, t1), whole.window(t1, t2)
    view = fleet_view(past, None, FleetOptions(level=level, long_window_days=forecast_days,
                                               service_level=service_level))  # fmt: skip
    pred = view["forecast"]["long"]
    truth_mean = float((hazard * future.exposure_gpu_days()).sum())
    truth_lo, truth_hi = est.poisson_interval(truth_mean, level)
    actual = len(future.in_window())
    # The history window's true rate: hazard weighted by up-time; each mode a fixed share of it.
    up = past.exposure_gpu_days()
    true_rate = float((hazard * up).sum() / up.sum())
    rate = view["rate_per_gpu_day"]
    mix = {m: s / sum(faults.MODE_MIX.values()) for m, s in faults.MODE_MIX.items()}
    modes_covered = 0
    for mode, share in mix.items():
        m = view["mtbf"]["mode"][mode]["mtbf_gpu_days"]
        modes_covered += m["lower"] <= 1.0 / (share * true_rate) <= m["upper"]
    spares = view["spares"]
    in_repair = _in_repair(whole, t1, t2)
    return {
        "seed": seed,
        "failures_history": view["history"]["failures"],
        "rate_true": true_rate,
        "rate_estimated": rate["value"],
        "rate_interval": [rate["lower"], rate["upper"]],
        "rate_covered": rate["lower"] <= true_rate <= rate["upper"],
        "modes_covered": modes_covered,
        "predicted": pred["value"],
        "predicted_interval": [pred["lower"], pred["upper"]],
        "truth_mean": truth_mean,
        "truth_interval": [truth_lo, truth_hi],
        "actual": actual,
        "hit": truth_lo <= pred["value"] <= truth_hi,
        "covered": pred["lower"] <= actual <= pred["upper"],
        "spares": spares["spares"],
        "turnaround_days": spares["turnaround_days"],
        "in_repair_mean_predicted": spares["mean_in_repair"],
        "in_repair_mean_actual": float(in_repair.mean()),
        "share_of_week_short_of_spares": float((in_repair > spares["spares"]).mean()),
    }


def run_forecast_bench(
    json_path: str | None = None, *, seeds: int = 10, first_seed: int = 1700, hosts: int = 64, gpus_per_host: int = 8,
    rate_scale: float = 50.0, history_days: float = 28.0, forecast_days: float = 7.0, level: float = 0.90,
    service_level: float = 0.95, warmup_days: float = 100.0,
) -> dict[str, Any]:  # fmt: skip
    """Run every seed, print a table per seed and the summary, write the figures to `json_path`."""
    t0 = time.perf_counter()
    runs = [
        check_seed(s, hosts=hosts, gpus_per_host=gpus_per_host, rate_scale=rate_scale, history_days=history_days,
                   forecast_days=forecast_days, level=level, service_level=service_level, warmup_days=warmup_days)
        for s in range(first_seed, first_seed + seeds)
    ]  # fmt: skip
    print(f"\n{'seed':>5} {'rate true':>10} {'rate est':>9} {'predicted (interval)':>22} {'truth (interval)':>20} "
          f"{'actual':>6}  hit  covered  {'in repair: mean, actual':>23}  spares  short")  # fmt: skip
    for r in runs:
        print(f"{r['seed']:>5} {r['rate_true']:>10.5f} {r['rate_estimated']:>9.5f} "
              f"{r['predicted']:>9.1f} ({r['predicted_interval'][0]:>3}-{r['predicted_interval'][1]:<3})     "
              f"{r['truth_mean']:>7.1f} ({r['truth_interval'][0]:>3}-{r['truth_interval'][1]:<3})   {r['actual']:>6}  "
              f"{'yes' if r['hit'] else 'NO ':<4} {'yes' if r['covered'] else 'no ':<8} "
              f"{r['in_repair_mean_predicted']:>14.1f}, {r['in_repair_mean_actual']:>6.1f}  {r['spares']:>6}  "
              f"{r['share_of_week_short_of_spares']:.1%}")  # fmt: skip
    n = len(runs)
    modes = len(faults.MODE_MIX)
    figures = {
        "config": {"seeds": seeds, "first_seed": first_seed, "hosts": hosts, "gpus_per_host": gpus_per_host,
                   "rate_scale": rate_scale, "nominal_rate_per_gpu_day": faults.RATE_PER_GPU_DAY * rate_scale,
                   "warmup_days": warmup_days, "history_days": history_days, "forecast_days": forecast_days,
                   "level": level, "service_level": service_level, "interval_s": 3600.0, "host_frailty": True},
        "hits": sum(r["hit"] for r in runs),
        "covered": sum(r["covered"] for r in runs),
        "rate_covered": sum(r["rate_covered"] for r in runs),
        "modes_covered": sum(r["modes_covered"] for r in runs),
        "modes_checked": n * modes,
        "mean_share_short_of_spares": float(np.mean([r["share_of_week_short_of_spares"] for r in runs])),
        "seconds": round(time.perf_counter() - t0, 1),
        "runs": runs,
    }  # fmt: skip
    emit(
        "gpuwatch bench forecast",
        [
            ("seeds", n, f"{hosts}x{gpus_per_host} GPUs, rate_scale {rate_scale:g}, fit {history_days:g} d after "
                         f"{warmup_days:g} d, predict {forecast_days:g} d"),
            ("hits", figures["hits"], f"predicted {forecast_days:g}-day count within the truth's {level:.0%} interval"),
            ("covered", figures["covered"], f"actual count within the predicted {level:.0%} interval"),
            ("rate_covered", figures["rate_covered"], f"true rate within the estimate's {level:.0%} interval"),
            ("modes_covered", f"{figures['modes_covered']}/{figures['modes_checked']}",
             "true MTBF of a mode within its interval"),
            ("mean_share_short_of_spares", figures["mean_share_short_of_spares"],
             f"of the week more GPUs in repair than the spares (promised <= {1 - service_level:.0%})"),
            ("seconds", figures["seconds"], ""),
        ],
        figures,
        json_path,
    )  # fmt: skip
    return figures
