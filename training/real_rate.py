"""False actions and net GPU-hours at the real failure rate, measured the cheapest honest way.

A real fleet fails about 2e-4 times per GPU-day, so what the product does there is mostly what it does to
healthy GPUs. Bounding a false-drain rate of 0.05 per 1,000 GPU-days takes tens of thousands of healthy
GPU-days, and the look-alikes that cause false actions are rare, so a plain healthy fleet alone would see few
of them. So (issue 14): one plain healthy fleet (every look-alike off) gives the base rate of false actions; one
fleet rich in each look-alike kind (simulator/lookalikes.py) gives that kind's extra false actions per GPU-day
when it is everywhere, which its stated prevalence scales down (`Lookalike.weight`). The estimate is

    false per GPU-day = plain + sum over kinds of weight x max(rich - plain, 0)

and its 95 % upper bound is that of the weighted sum of every run's counts, plain + sum over kinds of weight x
rich (no subtraction: conservative), by the gamma method of Fay and Feuer (Statistics in Medicine 16, 1997),
made for directly standardised rates, i.e. weighted sums of Poisson counts: exact for one run, conservative for
several. What bounds it is the largest weight per GPU-day of any run, so each rich run is simulated long enough
that its weight per GPU-day is no larger than the plain run's (`healthy_specs`). Recall and lead come from the
failure-rich held-out fleets (`gpuwatch eval`):
together they give the precision of each action at the real failure rate and the net GPU-hours saved per 1,000
GPU-days under the cost model, next to the oracle's and the static rules'.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuwatch.costs import CostModel
from gpuwatch.training.actions import weighted_poisson_upper

ACTIONS = ("checkpoint", "migrate", "reboot")


@dataclass
class HealthyRun:
    """What a policy did on one healthy fleet: GPU-days observed and false actions per action kind."""

    gpu_days: float
    false: dict[str, int] = field(default_factory=dict)

    def rate(self, action: str) -> float:
        return self.false.get(action, 0) / max(self.gpu_days, 1e-9)


def false_rates(plain: HealthyRun, rich: Mapping[str, HealthyRun], weights: Mapping[str, float]) -> dict[str, Any]:
    """Per action: false actions per 1,000 healthy GPU-days at the stated prevalences, a 95 % upper bound, and
    each kind's share of the estimate."""
    out: dict[str, Any] = {}
    for action in ACTIONS:
        base = plain.rate(action)
        by_kind = {k: weights[k] * max(run.rate(action) - base, 0.0) for k, run in rich.items()}
        terms = [(plain.false.get(action, 0), 1.0 / max(plain.gpu_days, 1e-9))]
        terms += [(run.false.get(action, 0), weights[k] / max(run.gpu_days, 1e-9)) for k, run in rich.items()]
        upper = weighted_poisson_upper(terms)
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

    @property
    def gpu_days(self) -> float:
        """GPU-days simulated (before any repair downtime)."""
        return self.hosts * self.gpus_per_host * self.days


def _healthy_shard(spec: HealthySpec) -> dict[str, Any]:
    """Simulate and score one healthy fleet in this process; replay the policy on the model's decisions and on
    the threshold rules' alarms. Returns the events, the failures that happened, and the GPU-days observed."""
    import sys
    import time

    import msgspec
    import numpy as np
    import torch

    from gpuwatch.schemas.fields import FAILURE_MODES
    from gpuwatch.schemas.records import Risk
    from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
    from gpuwatch.sinks.policy import RemediationPolicy
    from gpuwatch.streams.model import Scorer, load_artifact
    from gpuwatch.streams.processor import BatchResult, RiskProcessor, Scored
    from gpuwatch.training.baselines import ThresholdRules
    from gpuwatch.training.score import observe_in_time, replay_messages

    torch.set_num_threads(1)
    artifact = load_artifact(spec.model or None)
    rules = ThresholdRules(artifact)
    policies = {"lstm": RemediationPolicy(), "threshold": RemediationPolicy()}
    events: dict[str, list[dict[str, Any]]] = {"lstm": [], "threshold": []}

    class Decisions(RiskProcessor):
        """Feeds the policies directly: a record only for GPUs in alarm, failed, or with policy state (quiet
        records of the others change nothing), so a long healthy fleet renders almost no JSON."""

        def emit(self, scored: Scored, scored_at: float, result: BatchResult) -> None:
            store = self.store
            slots, failed = scored.slots, scored.failed
            n = len(slots)
            live_at = np.cumsum(~failed) - 1
            alarm = np.zeros(n, dtype=bool)
            drain = np.zeros(n, dtype=bool)
            alarm[~failed], drain[~failed] = scored.alarm, scored.drain
            rule = rules.score(store.sequences(slots))[0] >= 0.5
            rule &= ~failed
            ts = store.last_ts[slots]
            for name, a, d in (("lstm", alarm, drain), ("threshold", rule, rule)):
                policy = policies[name]
                need = a | failed
                hosts, idx = store.hosts, store.gpu_index
                rows = [i for i in range(n) if need[i] or policy.tracks(hosts[slots[i]], int(idx[slots[i]]))] \
                    if policy.tracking else np.flatnonzero(need).tolist()  # fmt: skip
                recs = []
                for i in rows:
                    sl, j = int(slots[i]), int(live_at[i])
                    is_failed = bool(failed[i])
                    recs.append(Risk(host=hosts[sl], gpu_index=int(idx[sl]), uuid=store.uuids[sl], ts=float(ts[i]),
                                     risk=1.0 if is_failed else float(scored.risk[j]), horizon_s=self.horizon_s,
                                     mode="none" if is_failed else FAILURE_MODES[int(scored.mode[j])],
                                     model=self.model_version, scored_at=scored_at, alarm=bool(a[i]),
                                     drain=bool(d[i]), op=self.alarm_op.name, failed=is_failed,
                                     failed_since=float(store.failed_since[sl])))  # fmt: skip
                if recs:  # the events as their JSON objects: a run is written to and read from JSON
                    events[name] += map(msgspec.to_builtins, observe_in_time(policy, recs))

    sim = FleetSimulator(FleetConfig(hosts=spec.hosts, gpus_per_host=spec.gpus_per_host, seed=spec.seed,
                                     interval_s=spec.interval_s, start_ts=1_700_000_000.0, **spec.overrides))  # fmt: skip
    processor = Decisions(Scorer(artifact, "cpu"), rescore_interval_s=spec.rescore_interval_s, stage="real-rate")
    steps = int(round(spec.days * 86400.0 / spec.interval_s))
    t0, last = time.time(), time.time()

    def messages() -> Any:
        offset = 0
        for _ in range(steps):
            for _, raw in sim.step_json():
                yield offset, raw
                offset += 1

    samples = 0
    for result in replay_messages(messages(), spec.name, processor):
        samples += result.samples
        if time.time() - last >= 30.0:
            last = time.time()
            sys.stderr.write(f"[{spec.name}] {samples:,} GPU-samples ({samples / max(last - t0, 1e-9):,.0f}/s)\n")
            sys.stderr.flush()
    labels = sim.drain_labels()
    end = 1_700_000_000.0 + spec.days * 86400.0
    down = sum(min(lab["repair_end_ts"] or end, end) - lab["fail_ts"] for lab in labels)
    return {"name": spec.name, "events": events, "labels": labels, "gpu_samples": samples,
            "gpu_days": spec.gpu_days - down / 86400.0, "seconds": round(time.time() - t0, 1)}  # fmt: skip


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


# ------------------------------------------------------------------ `gpuwatch realrate`


def pool_system_reports(reports: list[Mapping[str, Any]], scorer: str) -> dict[str, Any]:
    """One scorer's `system` reports of several `gpuwatch eval` fleets added up (failures, GPU-days, GPU-hours,
    true and early actions), as `at_real_rate` reads them."""
    parts = [r["system"][scorer] for r in reports if scorer in r.get("system", {})]
    if not parts:
        raise ValueError(f"no eval report holds a policy replay of {scorer!r}")
    value = {k: sum(p["value"][k] for p in parts) for k in ("saved_gpu_h", "true_and_early_action_cost_gpu_h")}
    days = sum(p["gpu_days"] for p in parts)
    value["oracle_gpu_h_per_1000_gpu_days_fleet"] = (
        sum(p["value"]["oracle_gpu_h_per_1000_gpu_days_fleet"] * p["gpu_days"] for p in parts) / max(days, 1e-9)
    )
    actions = {a: {"true": sum(p["actions"][a]["true"] for p in parts),
                   "false_by_cause": {"early": sum(p["actions"][a]["false_by_cause"]["early"] for p in parts)}}
               for a in ACTIONS}  # fmt: skip
    return {"failures": sum(p["failures"] for p in parts), "gpu_days": days, "value": value, "actions": actions}


def healthy_specs(plain_gpu_days: float, rich_gpu_days: float, interval_s: float, seed: int, processes: int,
                  model: str = "") -> list[HealthySpec]:  # fmt: skip
    """The plain healthy fleet (split in `processes` shards) and one fleet rich in each look-alike, on the realistic
    hardware mix at the real failure rate; seeds from `seed` (keep them apart from every fleet used to choose).

    A rich fleet runs `rich_gpu_days`, or longer where its look-alike's weight needs it: weight x plain GPU-days,
    so that no run weighs more per GPU-day than the plain one (the upper bound is set by the heaviest)."""
    from gpuwatch.simulator.hardware import REALISTIC_MIX
    from gpuwatch.simulator.lookalikes import LOOKALIKES, QUIET, rich_overrides

    base = {"hardware": dict(REALISTIC_MIX), "rate_scale": 1.0}
    quiet = {**base, **QUIET}
    hosts = 128
    shards = max(1, processes)
    days = plain_gpu_days / (shards * hosts * 8)
    specs = [HealthySpec(f"plain-{k}", quiet, hosts, days, interval_s, seed + k, model) for k in range(shards)]
    rich_hosts = 32
    for i, (name, kind) in enumerate(LOOKALIKES.items()):
        gpu_days = max(rich_gpu_days, kind.weight * plain_gpu_days)
        specs.append(HealthySpec(f"rich-{name}", {**base, **rich_overrides(name)}, rich_hosts,
                                 gpu_days / (rich_hosts * 8), interval_s, seed + 100 + i, model))  # fmt: skip
    return specs


def realrate_command(args: Any, settings: Any) -> int:
    """`gpuwatch realrate`: healthy fleets in memory, false actions at the real rate, combined with `--eval`."""
    import json
    import sys
    from pathlib import Path

    import orjson

    from gpuwatch.simulator.lookalikes import LOOKALIKES

    def read(flag: str, path: str, fix: str) -> Any:
        """The JSON object in `path`, or None after a one-line error naming the flag and the fix."""
        try:
            found = orjson.loads(Path(path).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            why = "is not a file" if not Path(path).is_file() else f"is not JSON ({exc})"
            print(f"gpuwatch realrate: {flag} {path} {why}; {fix}", file=sys.stderr)
            return None
        return found if isinstance(found, dict) else {}

    for name, value in (("--plain-gpu-days", args.plain_gpu_days), ("--rich-gpu-days", args.rich_gpu_days),
                        ("--interval", args.interval), ("--processes", args.processes)):  # fmt: skip
        if not value > 0:
            print(f"gpuwatch realrate: {name} {value:g} must be above 0", file=sys.stderr)
            return 2
    evals = []
    for path in args.eval:
        fix = "write one with `gpuwatch eval --json PATH`"
        report = read("--eval", path, fix)
        if report is None:
            return 2
        found = report.get("datasets", [report])
        if not all(isinstance(d, dict) and "lstm" in d.get("system", {}) for d in found):
            print(f"gpuwatch realrate: --eval {path} holds no policy replay (`system`); {fix}", file=sys.stderr)
            return 2
        evals += found
    if args.runs_from:
        fix = "pass the --json of an earlier `gpuwatch realrate`"
        earlier = read("--runs-from", args.runs_from, fix)
        if earlier is None:
            return 2
        runs = earlier.get("runs")
        if not isinstance(runs, list) or not runs:
            print(f"gpuwatch realrate: --runs-from {args.runs_from} holds no healthy runs; {fix}", file=sys.stderr)
            return 2
        print(f"read {len(runs)} healthy runs from {args.runs_from}", file=sys.stderr)
    else:
        specs = healthy_specs(args.plain_gpu_days, args.rich_gpu_days, args.interval, args.seed, args.processes,
                              args.model)  # fmt: skip
        longer = [f"{s.name[5:]} {s.gpu_days:,.0f}" for s in specs
                  if s.name.startswith("rich-") and s.gpu_days > args.rich_gpu_days * 1.0001]
        print(f"simulating {len(specs)} healthy fleets ({args.plain_gpu_days:,.0f} plain GPU-days, "
              f"{args.rich_gpu_days:,.0f} per look-alike" + (f", {', '.join(longer)} by weight" if longer else "")
              + f", {args.interval:g} s) on {args.processes} processes", file=sys.stderr)  # fmt: skip
        runs = [{k: r[k] for k in ("name", "gpu_days", "gpu_samples", "seconds")}
                | {"false": {s: healthy_false(r, s).false for s in ("lstm", "threshold")}, "failures": len(r["labels"])}
                for r in run_healthy(specs, args.processes)]  # fmt: skip
    costs = CostModel.from_settings(settings)
    weights = {name: x.weight for name, x in LOOKALIKES.items()}
    out: dict[str, Any] = {"runs": runs}
    for scorer in ("lstm", "threshold"):
        plain_runs = [HealthyRun(r["gpu_days"], r["false"][scorer]) for r in runs if r["name"].startswith("plain-")]
        plain = HealthyRun(sum(h.gpu_days for h in plain_runs), {a: sum(h.false.get(a, 0) for h in plain_runs)
                                                                  for a in ACTIONS})  # fmt: skip
        rich = {r["name"][5:]: HealthyRun(r["gpu_days"], r["false"][scorer]) for r in runs
                if r["name"].startswith("rich-")}  # fmt: skip
        false = false_rates(plain, rich, weights)
        entry: dict[str, Any] = {"false_actions": false, "plain": {"gpu_days": plain.gpu_days, "false": plain.false}}
        if evals:
            entry["at_real_rate"] = at_real_rate(pool_system_reports(evals, scorer), false, costs,
                                                 settings.fleet_failure_rate_per_gpu_day)  # fmt: skip
        out[scorer] = entry
    out["settings"] = {"failures_per_gpu_day": settings.fleet_failure_rate_per_gpu_day, "costs": costs.__dict__,
                       "interval_s": args.interval, "seed": args.seed}  # fmt: skip
    print(format_realrate(out))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=float))
        print(f"wrote {args.json}")
    return 0


def format_realrate(out: Mapping[str, Any]) -> str:
    lines = []
    for scorer in ("lstm", "threshold"):
        e = out[scorer]
        lines.append(f"{scorer}: {e['plain']['gpu_days']:,.0f} plain healthy GPU-days, false {e['plain']['false']}")
        for a in ACTIONS:
            f = e["false_actions"][a]
            lines.append(f"  false {a:<10} {f['per_1000_gpu_days']:8.3f} per 1,000 GPU-days (95% up "
                         f"{f['per_1000_gpu_days_upper95']:.3f})")  # fmt: skip
        if "at_real_rate" in e:
            r = e["at_real_rate"]
            prec = ", ".join(f"{a} {r['precision'][a]['precision']:.3f}" for a in ACTIONS)
            lines.append(f"  precision at the real rate: {prec}")
            lines.append(f"  net {r['net_gpu_h_per_1000_gpu_days']:.1f} GPU-h per 1,000 GPU-days (95% low "
                         f"{r['net_gpu_h_per_1000_gpu_days_lower95']:.1f}), oracle {r['oracle_gpu_h_per_1000_gpu_days']:.1f}, "
                         f"share {r['share_of_oracle']:.2f}")  # fmt: skip
    return "\n".join(lines)
