"""False actions and net GPU-hours at the real failure rate, measured the cheapest honest way.

A real fleet fails about 2e-4 times per GPU-day, so what the product does there is mostly what it does to
healthy GPUs. Bounding a false-drain rate of 0.05 per 1,000 GPU-days takes tens of thousands of healthy
GPU-days, and the look-alikes that cause false actions are rare, so a plain healthy fleet alone would see few
of them. So (issue 14): one plain healthy fleet (every look-alike off) gives the base rate of false actions; one
fleet rich in each look-alike kind (producers/lookalikes.py) gives that kind's extra false actions per GPU-day
when it is everywhere, which its stated prevalence scales down (`Lookalike.weight`). The estimate is

    false per GPU-day = plain + sum over kinds of weight x max(rich - plain, 0)

and its 95 % upper bound the plain run's exact Poisson bound plus each kind's weight x its rich run's bound (no
subtraction: conservative). Recall and lead come from the failure-rich held-out fleets (`gpuwatch eval`):
together they give the precision of each action at the real failure rate and the net GPU-hours saved per 1,000
GPU-days under the cost model, next to the oracle's and the static rules'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuwatch.costs import CostModel
from gpuwatch.training.actions import poisson_upper

ACTIONS = ("checkpoint", "migrate", "reboot")


@dataclass
class HealthyRun:
    """What a policy did on one healthy fleet: GPU-days observed and false actions per action kind."""

    gpu_days: float
    false: dict[str, int] = field(default_factory=dict)

    def rate(self, action: str) -> float:
        return self.false.get(action, 0) / max(self.gpu_days, 1e-9)

    def upper(self, action: str) -> float:
        return poisson_upper(self.false.get(action, 0)) / max(self.gpu_days, 1e-9)


def false_rates(plain: HealthyRun, rich: Mapping[str, HealthyRun], weights: Mapping[str, float]) -> dict[str, Any]:
    """Per action: false actions per 1,000 healthy GPU-days at the stated prevalences, a 95 % upper bound, and
    each kind's share of the estimate."""
    out: dict[str, Any] = {}
    for action in ACTIONS:
        base = plain.rate(action)
        by_kind = {k: weights[k] * max(run.rate(action) - base, 0.0) for k, run in rich.items()}
        upper = plain.upper(action) + sum(weights[k] * run.upper(action) for k, run in rich.items())
        out[action] = {
            "per_1000_gpu_days": 1000.0 * (base + sum(by_kind.values())),
            "per_1000_gpu_days_upper95": 1000.0 * upper,
            "plain_per_1000_gpu_days": 1000.0 * base,
            "by_lookalike_per_1000_gpu_days": {k: 1000.0 * v for k, v in by_kind.items()},
        }
    return out


def at_real_rate(
    failure_report: Mapping[str, Any], false: Mapping[str, Any], costs: CostModel, failures_per_gpu_day: float
) -> dict[str, Any]:
    """Precision per action and net GPU-hours per 1,000 GPU-days at `failures_per_gpu_day`, from one scorer's
    `gpuwatch eval` system report on failure-rich fleets (per-failure figures) and `false_rates` (per GPU-day).

    Per failure: what the true actions saved less their cost and that of early actions (false, but raised by a
    failing GPU, so as frequent as failures). Per healthy GPU-day: the false actions' cost (a drained healthy
    node is out for inspection)."""
    v, acts = failure_report["value"], failure_report["actions"]
    n = max(int(failure_report["failures"]), 1)
    per_failure = (v["saved_gpu_h"] - v["true_and_early_action_cost_gpu_h"]) / n
    oracle_per_failure = v["oracle_gpu_h_per_1000_gpu_days_fleet"] * failure_report["gpu_days"] / 1000.0 / n
    false_cost = sum(false[a]["per_1000_gpu_days"] / 1000.0 * costs.action_cost(a, real=False) for a in ACTIONS)
    false_cost_upper = sum(
        false[a]["per_1000_gpu_days_upper95"] / 1000.0 * costs.action_cost(a, real=False) for a in ACTIONS
    )
    lam = failures_per_gpu_day
    precision = {}
    for a in ACTIONS:
        true_rate = acts[a]["true"] / n * lam  # true actions per GPU-day at the real rate
        early_rate = acts[a]["false_by_cause"]["early"] / n * lam
        wrong = early_rate + false[a]["per_1000_gpu_days"] / 1000.0
        wrong_upper = early_rate + false[a]["per_1000_gpu_days_upper95"] / 1000.0
        precision[a] = {
            "precision": true_rate / (true_rate + wrong) if true_rate + wrong > 0 else float("nan"),
            "precision_lower95": true_rate / (true_rate + wrong_upper) if true_rate + wrong_upper > 0 else float("nan"),
            "true_per_1000_gpu_days": 1000.0 * true_rate,
        }
    net = 1000.0 * (per_failure * lam - false_cost)
    oracle = 1000.0 * oracle_per_failure * lam
    return {
        "failures_per_gpu_day": lam,
        "precision": precision,
        "net_gpu_h_per_1000_gpu_days": net,
        "net_gpu_h_per_1000_gpu_days_lower95": 1000.0 * (per_failure * lam - false_cost_upper),
        "oracle_gpu_h_per_1000_gpu_days": oracle,
        "share_of_oracle": net / oracle if oracle > 0 else float("nan"),
        "saved_per_failure_gpu_h": per_failure,
        "false_action_cost_per_1000_gpu_days": 1000.0 * false_cost,
    }


# ------------------------------------------------------------------ the healthy runs, simulated in memory


@dataclass(frozen=True)
class HealthySpec:
    """One healthy fleet to simulate: a name, its FleetConfig overrides, size and cadence, and its seed."""

    name: str
    overrides: dict
    hosts: int
    days: float
    interval_s: float
    seed: int
    model: str = ""
    gpus_per_host: int = 8
    rescore_interval_s: float = 5.0


def _healthy_shard(spec: HealthySpec) -> dict[str, Any]:
    """Simulate and score one healthy fleet in this process; replay the policy on the model's records and on the
    threshold rules' alarms. Returns the events, the failures that happened, and the GPU-days observed."""
    import sys
    import time

    import numpy as np
    import orjson
    import torch

    from gpuwatch.producers.simulator import FleetConfig, FleetSimulator
    from gpuwatch.sinks.policy import RemediationPolicy
    from gpuwatch.streams.model import Scorer, load_artifact
    from gpuwatch.training.baselines import ThresholdRules
    from gpuwatch.training.eval_cli import TeeProcessor
    from gpuwatch.training.score import replay_messages

    torch.set_num_threads(1)
    artifact = load_artifact(spec.model or None)
    sim = FleetSimulator(FleetConfig(hosts=spec.hosts, gpus_per_host=spec.gpus_per_host, seed=spec.seed,
                                     interval_s=spec.interval_s, start_ts=1_700_000_000.0, **spec.overrides))  # fmt: skip
    processor = TeeProcessor(Scorer(artifact, "cpu"), {"threshold": ThresholdRules(artifact)},
                             rescore_interval_s=spec.rescore_interval_s, stage="real-rate")  # fmt: skip
    policies = {"lstm": RemediationPolicy(), "threshold": RemediationPolicy()}
    events: dict[str, list[dict[str, Any]]] = {"lstm": [], "threshold": []}
    steps = int(round(spec.days * 86400.0 / spec.interval_s))
    t0, last = time.time(), 0.0

    def messages() -> Any:
        offset = 0
        for _ in range(steps):
            for _, raw in sim.step_json():
                yield offset, raw
                offset += 1

    samples = 0
    for result in replay_messages(messages(), spec.name, processor):
        samples += result.samples
        if not result.risk:
            continue
        recs = [orjson.loads(v) for _, v in result.risk]
        now = max(r["ts"] for r in recs)
        events["lstm"] += policies["lstm"].observe(recs, now)
        rule = np.concatenate(processor.risk["threshold"])  # the rules' scores of these very records
        processor.risk["threshold"].clear()
        processor.mode["threshold"].clear()
        alarms = [{**r, "alarm": bool(a) and not r.get("failed"), "drain": bool(a) and not r.get("failed")}
                  for r, a in zip(recs, rule >= 0.5)]  # fmt: skip
        events["threshold"] += policies["threshold"].observe(alarms, now)
        if time.time() - last >= 10.0:
            last = time.time()
            sys.stderr.write(f"[{spec.name}] {samples:,} GPU-samples ({samples / max(last - t0, 1e-9):,.0f}/s)\n")
            sys.stderr.flush()
    labels = sim.drain_labels()
    gpus = spec.hosts * spec.gpus_per_host
    down = sum(min(lab["repair_end_ts"] or 1e18, 1_700_000_000.0 + spec.days * 86400.0) - lab["fail_ts"] for lab in labels)
    return {"name": spec.name, "events": events, "labels": labels, "gpu_samples": samples,
            "gpu_days": gpus * spec.days - down / 86400.0, "seconds": round(time.time() - t0, 1)}  # fmt: skip


def healthy_false(run: Mapping[str, Any], scorer: str, horizon_s: float = 3600.0) -> HealthyRun:
    """False actions of one scorer's policy on a healthy run: every action not followed by a failure of its GPU
    within the horizon (and not on a GPU that had failed: at the real rate a run has a handful of failures)."""
    failures: dict[str, list[dict]] = {}
    for lab in run["labels"]:
        failures.setdefault(lab["uuid"], []).append(lab)
    false: dict[str, int] = {}
    for e in run["events"][scorer]:
        if e["action"] == "repair":
            continue
        mine = failures.get(e["uuid"], [])
        real = any(0 <= f["fail_ts"] - e["ts"] <= horizon_s for f in mine)
        down = any(f["fail_ts"] <= e["ts"] < (f["repair_end_ts"] or 1e18) for f in mine)
        if not real and not down:
            false[e["action"]] = false.get(e["action"], 0) + 1
    return HealthyRun(run["gpu_days"], false)


def run_healthy(specs: list[HealthySpec], processes: int) -> list[dict[str, Any]]:
    """Runs the specs over `processes` spawned processes (one spec each at a time); results in spec order."""
    import multiprocessing as mp

    if processes <= 1:
        return [_healthy_shard(s) for s in specs]
    with mp.get_context("spawn").Pool(processes) as pool:
        return pool.map(_healthy_shard, specs, chunksize=1)
