"""Does throttling pay? Simulated thermal and power precursors, run closed-loop with and without the throttle.

A throttle changes the telemetry it is judged on (a lower power limit cools the GPU and, by the simulator's
stated assumption, slows the precursor: docs/simulator.md), so it cannot be evaluated on a recording. Here the
simulator, the stream's `RiskProcessor` (the shipped model) and the real `RemediationPolicy` run in one loop:
each step's risk records go to the policy, and its throttle and restore events go back to the simulator as the
node agent would carry them out (a power limit, or with `throttle_kind` "clocks" a clock lock, undone when the
policy says so or when the throttle's time runs out). Two arms on the same fleet and seed: *drain-only* (the
ladder as shipped: checkpoint, migrate) and *throttle* (throttle first for thermal and power alarms, then the
ladder if the alarm holds).

Per failure, each arm's cost to the job under the cost model (`gpuwatch.costs`): the failure's loss less what
the checkpoint and migration before it saved, plus the cost of the true actions and of the throttle while it
held (until the job moved or the GPU failed). A failure is *averted or delayed past the horizon* when it did
not happen within the model's horizon after its scheduled time.

False alarms: the same loop on a healthy fleet rich in the look-alikes that resemble thermal and power
precursors (jobs at the power cap, hot boards, ambient excursions, brake blips; simulator/lookalikes.py) gives
what throttling first changes per false alarm episode (a throttle's slowdown, less the checkpoints it spares):
the GPU-hours of the throttle arm less those of the drain-only arm, over the drain-only arm's false episodes.

Restated at the real failure rate as issue 9 does (training/real_rate.py): the per-failure difference times the
real rate of thermal and power failures, less the per-episode difference times the false alarm episodes per
healthy GPU-day at real prevalence (`gpuwatch realrate`'s false checkpoints: every false alarm episode starts
with one), which the caller passes in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gpuwatch.costs import CostModel
from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.schemas.records import Remediation
from gpuwatch.simulator import faults, lookalikes
from gpuwatch.simulator.fleet import DAY_S, FleetConfig, FleetSimulator
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy

if TYPE_CHECKING:  # torch: imported when a run needs the model, not for the accounting
    from gpuwatch.streams.model import Scorer

MODES = ("thermal", "power")
START_TS = 1_700_000_000.0
ARMS = ("drain_only", "throttle")


@dataclass(frozen=True)
class ThrottleSpec:
    """The experiment: `failures` scheduled thermal and power failures (alternating, one per host, staggered by
    `stagger_s`, precursor lengths and strengths drawn as the simulator draws them), then `healthy_gpu_days` of
    a healthy fleet rich in thermal and power look-alikes; `interval_s` sampling; `tail_s` simulated after the last scheduled
    failure (delays beyond it count as delays past the horizon)."""

    failures: int = 24
    stagger_s: float = 60.0
    warmup_s: float = 7200.0
    interval_s: float = 5.0
    tail_s: float = 3600.0
    healthy_gpu_days: float = 0.0
    healthy_span_days: float = 0.25  # the healthy fleet runs this long (more hosts for more GPU-days)
    seed: int = 0
    model: str = ""
    throttle_s: float = 1800.0
    throttle_kind: str = "power"  # PolicyRules.throttle_kind: "power" (power limit) or "clocks" (clock lock)
    throttle_frac: float = 0.7
    throttle_clock_frac: float = 0.7
    throttle_grace_s: float = 300.0
    halt_cut: float = 0.3  # FleetConfig.throttle_halt_cut: the simulator's assumption about what a cap does


@dataclass
class ArmRun:
    """What one arm did: events (action, ts, gpu code), failures (gpu code -> fail ts), throttled seconds per
    gpu code (while its job was on it), and the simulator's clock share while throttled."""

    events: list[tuple[str, float, int]] = field(default_factory=list)
    failed: dict[int, float] = field(default_factory=dict)
    throttled_s: dict[int, float] = field(default_factory=dict)
    clock_share: list[float] = field(default_factory=list)
    gpu_samples: int = 0


def rules_for(spec: ThrottleSpec, throttle: bool) -> PolicyRules:
    """An arm's policy rules: `spec`'s throttle (its kind and share) if `throttle`, else the ladder only."""
    # No fleet-level guard rails (the fleets fail far more often than a real one) and no blast-radius limit:
    # every experiment stands on its own, as in `gpuwatch eval`'s replays.
    return PolicyRules(max_concurrent_drains=10_000, throttle_s=spec.throttle_s if throttle else 0.0,
                       throttle_kind=spec.throttle_kind, throttle_frac=spec.throttle_frac,
                       throttle_clock_frac=spec.throttle_clock_frac,
                       throttle_grace_s=spec.throttle_grace_s)  # fmt: skip


class SimulatedAgent:
    """Carries throttle and restore events into the simulators as the node agent would: a throttle's power
    limit (`power_limit_frac`) or clock lock (`sm_clock_frac`) on the GPU of its code, and a restore (or the
    throttle's expiry) undoes what the GPU holds, both kinds if both were set."""

    def __init__(self, sims: list[FleetSimulator]) -> None:
        self.sims = sims
        self.where = [(k, i) for k, sim in enumerate(sims) for i in range(sim.n)]  # code -> (simulator, GPU)
        self.held: dict[int, set[str]] = {}  # the kinds of throttle each GPU holds

    def _gpu(self, c: int) -> tuple[FleetSimulator, int, int]:
        k, i = self.where[c]
        sim = self.sims[k]
        return sim, i // sim.G, i % sim.G

    def throttle(self, c: int, ev: Remediation) -> bool:
        """Applies the event's power limit or clock lock to GPU `c`; False: the event names neither."""
        sim, h, g = self._gpu(c)
        if isinstance(ev.power_limit_frac, float):
            sim.set_power_limit(h, g, ev.power_limit_frac)
            self.held.setdefault(c, set()).add("power")
        elif isinstance(ev.sm_clock_frac, float):
            sim.lock_clocks(h, g, ev.sm_clock_frac)
            self.held.setdefault(c, set()).add("clocks")
        else:
            return False
        return True

    def restore(self, c: int) -> None:
        """Puts GPU `c`'s power limit back and unlocks its clocks, whichever it holds (neither: nothing)."""
        sim, h, g = self._gpu(c)
        kinds = self.held.pop(c, set())
        if "power" in kinds:
            sim.set_power_limit(h, g, None)
        if "clocks" in kinds:
            sim.lock_clocks(h, g, None)


def run_arm(sims: list[FleetSimulator], steps: int, rules: PolicyRules, scorer: Scorer) -> ArmRun:
    """Steps `sims` together for `steps` steps, closed-loop through one stream processor and `rules`' policy.
    GPU codes run over the simulators in order (simulator k's GPU i is the sum of the earlier sizes plus i).
    Separate simulators keep experiments apart: a throttle changes its simulator's random draws from then on."""
    from gpuwatch.streams.processor import Inbound, RiskProcessor

    interval = sims[0].cfg.interval_s
    processor = RiskProcessor(scorer, rescore_interval_s=interval, stage="throttle-eval", max_age_s=None)
    policy = RemediationPolicy(rules)
    run = ArmRun()
    agent = SimulatedAgent(sims)
    where = agent.where
    code = {u: c for c, (k, i) in enumerate(where) for u in [sims[k].uuids[i]]}
    until = np.full(len(where), np.inf)  # when each throttle ends (the agent restores then)
    since = np.full(len(where), np.nan)  # when it began, while it holds and the job is still on the GPU

    def stop_counting(c: int, t: float) -> None:
        if not math.isnan(since[c]):
            run.throttled_s[c] = run.throttled_s.get(c, 0.0) + t - since[c]
            since[c] = np.nan

    for _ in range(steps):
        msgs = [Inbound(raw) for sim in sims for _, raw in sim.step_json()]
        t = sims[0].now
        result = processor.process(msgs)
        run.gpu_samples += result.samples
        for sim in sims:
            for label in sim.drain_labels():
                c = code[label["uuid"]]
                run.failed.setdefault(c, float(label["fail_ts"]))
                stop_counting(c, float(label["fail_ts"]))
        for c in np.flatnonzero(until <= t).tolist():  # the agent's expiry
            agent.restore(c)
            stop_counting(c, t)
            until[c] = np.inf
        for c in np.flatnonzero(np.isfinite(until)).tolist():
            k, i = where[c]
            cols = sims[k]._cols  # noqa: SLF001 - the evaluation reads the simulator's own state
            if cols["util_gpu_pct"][i] > 50:
                run.clock_share.append(float(cols["sm_clock_mhz"][i] / sims[k]._max_clk[i]))  # noqa: SLF001
        events = policy.observe([decode_risk(v) for _, v in result.risk], now=t)
        for ev in events:
            c = code.get(ev.uuid, -1)
            if c < 0:
                continue
            run.events.append((ev.action, ev.ts, c))
            if ev.action == "throttle" and agent.throttle(c, ev):
                until[c] = t + (ev.duration_s if isinstance(ev.duration_s, float) else 0.0)
                if math.isnan(since[c]):
                    since[c] = t
            elif ev.action == "restore":
                agent.restore(c)
                stop_counting(c, t)
                until[c] = np.inf
            elif ev.action == "migrate":
                stop_counting(c, t)  # the job left: the throttle no longer slows it
    for c in np.flatnonzero(~np.isnan(since)).tolist():
        stop_counting(c, sims[0].now)
    return run


def _failure_fleet(spec: ThrottleSpec) -> tuple[list[FleetSimulator], int, list[dict[str, Any]]]:
    """The failure experiments: one 8-GPU host each (peers: the model compares a GPU with them), in a simulator
    of its own, whose GPU 0 fails as planned; the simulators, their steps and the plan."""
    rng = np.random.default_rng(spec.seed)
    plan: list[dict[str, Any]] = []
    sims: list[FleetSimulator] = []
    for k in range(spec.failures):
        mode = MODES[k % 2]
        lo, hi = faults.PRECURSOR_RANGE_S[mode]
        precursor = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        warm = spec.warmup_s + k * spec.stagger_s  # history before the precursor starts, as a live GPU has
        p: dict[str, Any] = {"gpu": k * 8, "mode": mode, "precursor_s": precursor, "fail_in_s": warm + precursor,
             "strength": float(rng.uniform(0.25, 1.0))}  # fmt: skip
        sim = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=8, seed=spec.seed * 1000 + k,
                                         interval_s=spec.interval_s, start_ts=START_TS, rate_per_gpu_day=0.0,
                                         host_prefix=f"x{k:02d}", throttle_halt_cut=spec.halt_cut))  # fmt: skip
        sim.schedule_failure(0, 0, mode, p["fail_in_s"], precursor, strength=p["strength"])
        plan.append(p)
        sims.append(sim)
    last = max(p["fail_in_s"] for p in plan)
    return sims, int((last + spec.tail_s) / spec.interval_s), plan


# Look-alikes of thermal and power precursors, each as its rich run sets it (simulator/lookalikes.py).
HEALTHY_LOOKALIKES = ("power_cap_job", "hot_gpu", "ambient_excursion", "power_brake_blip")


def _healthy_fleet(spec: ThrottleSpec) -> tuple[FleetConfig, int, float]:  # noqa: D103
    """A healthy fleet of 8-GPU hosts rich in HEALTHY_LOOKALIKES, for `healthy_span_days`; its steps and GPU-days."""
    g = 8
    hosts = max(1, math.ceil(spec.healthy_gpu_days / (g * spec.healthy_span_days)))
    rich: dict[str, Any] = {}
    for name in HEALTHY_LOOKALIKES:
        rich.update(lookalikes.rich_overrides(name, quiet=False))
    cfg = FleetConfig.realistic(**{**rich, "hosts": hosts, "gpus_per_host": g, "seed": spec.seed + 1,
                                   "interval_s": spec.interval_s, "start_ts": START_TS, "rate_per_gpu_day": 0.0,
                                   "throttle_halt_cut": spec.halt_cut})
    steps = int(spec.healthy_span_days * DAY_S / spec.interval_s)
    return cfg, steps, hosts * g * steps * spec.interval_s / DAY_S


def failure_costs(run: ArmRun, plan: list[dict[str, Any]], costs: CostModel, horizon_s: float,
                  start_ts: float) -> list[dict[str, Any]]:  # fmt: skip
    """Per scheduled failure: when it happened (None: not within the run), the first throttle, checkpoint and
    migration before it, how long the throttle slowed the job, and the GPU-hours it cost the job."""
    out = []
    for p in plan:
        i = p["gpu"]
        fail = run.failed.get(i)
        end = fail if fail is not None else math.inf
        first = {a: min((ts for a2, ts, g in run.events if g == i and a2 == a and ts < end), default=None)
                 for a in ("throttle", "checkpoint", "migrate")}  # fmt: skip
        held = run.throttled_s.get(i, 0.0)
        acted = sum(costs.action_cost(a, real=True) for a in ("checkpoint", "migrate") if first[a] is not None)
        if fail is not None:
            ck, mig = first["checkpoint"], first["migrate"]
            loss = costs.failure_loss() - costs.saved(None if ck is None else fail - ck, None if mig is None else fail - mig)
        elif (moved := first["migrate"]) is None:  # not failed by the end of the run: it will, job still on it
            loss = costs.failure_loss()
        else:  # the job moved before the (later) failure: only the work since the checkpoint is lost
            ckpt = first["checkpoint"]
            gap = None if ckpt is None else 1.0 + moved - ckpt
            loss = costs.failure_loss() - costs.saved(gap, 1.0)
        scheduled = start_ts + p["fail_in_s"]
        out.append({**p, "scheduled_ts": scheduled, "fail_ts": fail,
                    "delayed_s": None if fail is None else fail - scheduled,
                    "averted_or_delayed": fail is None or fail - scheduled > horizon_s,
                    "throttle_ts": first["throttle"], "checkpoint_ts": first["checkpoint"],
                    "migrate_ts": first["migrate"], "throttled_s": held,
                    "gpu_h": loss + acted + costs.throttle_cost(held)})  # fmt: skip
    return out


def healthy_costs(run: ArmRun, costs: CostModel) -> dict[str, Any]:
    """False actions on a healthy fleet (no failures: every action is false) and what they cost."""
    counts = {a: sum(1 for a2, _, _ in run.events if a2 == a) for a in ("throttle", "checkpoint", "migrate", "reboot")}
    cost = sum(costs.action_cost(a, real=False) * n for a, n in counts.items() if a != "throttle")
    held = sum(run.throttled_s.values())
    return {"events": counts, "throttled_s": held, "gpu_h": cost + costs.throttle_cost(held)}


def evaluate_throttle(spec: ThrottleSpec, costs: CostModel, *, real_failures_per_gpu_day: float = faults.RATE_PER_GPU_DAY,
                      false_alarms_per_1000_gpu_days: float | None = None,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Both arms on the failure-rich fleet and on the healthy fleet; the figures of the issue 17 report.

    `false_alarms_per_1000_gpu_days`: false alarm episodes per 1,000 healthy GPU-days at real prevalence (`gpuwatch
    realrate`'s false checkpoints); None leaves false alarms out of the real-rate figure (it says so).
    `costs.throttle_s` is ignored: the arms' throttles hold `spec.throttle_s` at most and cost what they held."""
    from gpuwatch.streams.model import Scorer, load_artifact

    say = progress or (lambda msg: None)
    scorer = Scorer(load_artifact(spec.model or None))
    horizon = scorer.artifact.horizon_s
    _, steps, plan = _failure_fleet(spec)
    hcfg, hsteps, hdays = _healthy_fleet(spec) if spec.healthy_gpu_days > 0 else (None, 0, 0.0)
    arms: dict[str, Any] = {}
    for arm in ARMS:
        rules = rules_for(spec, arm == "throttle")
        say(f"{arm}: {spec.failures} thermal/power failures, {steps} steps")
        fail_run = run_arm(_failure_fleet(spec)[0], steps, rules, scorer)  # the same fleets afresh for each arm
        healthy_run = ArmRun()
        if hcfg is not None and hsteps > 0:
            say(f"{arm}: healthy fleet, {hdays:.1f} GPU-days")
            healthy_run = run_arm([FleetSimulator(hcfg)], hsteps, rules, scorer)
        per_failure = failure_costs(fail_run, plan, costs, horizon, START_TS)
        arms[arm] = {"failures": per_failure, "healthy": healthy_costs(healthy_run, costs),
                     "clock_share_while_throttled": float(np.mean(fail_run.clock_share + healthy_run.clock_share))
                     if fail_run.clock_share or healthy_run.clock_share else None,
                     "gpu_samples": fail_run.gpu_samples + healthy_run.gpu_samples}  # fmt: skip
    return summarise(arms, spec, costs, horizon, hdays, real_failures_per_gpu_day, false_alarms_per_1000_gpu_days)


def summarise(arms: dict[str, Any], spec: ThrottleSpec, costs: CostModel, horizon_s: float, healthy_gpu_days: float,
              real_failures_per_gpu_day: float, false_alarms_per_1000_gpu_days: float | None) -> dict[str, Any]:  # fmt: skip
    """The figures: per arm and mode, share of failures averted or delayed past the horizon and GPU-hours per
    failure; false actions on the rich healthy fleet and what throttling changes per false alarm episode;
    throttle's net GPU-hours saved against drain-only per 1,000 GPU-days at the real rate (issue 9's method)."""
    mix = faults.MODE_MIX
    lam = real_failures_per_gpu_day * (mix["thermal"] + mix["power"])
    out: dict[str, Any] = {"throttle_kind": spec.throttle_kind, "spec": dataclasses.asdict(spec),
                           "horizon_s": horizon_s, "healthy_gpu_days": healthy_gpu_days,
                           "real_thermal_power_failures_per_gpu_day": lam, "cost_model": dataclasses.asdict(costs),
                           "arms": {}}  # fmt: skip
    for arm, res in arms.items():
        rows = res["failures"]
        by_mode = {}
        for mode in MODES:
            mine = [r for r in rows if r["mode"] == mode]
            by_mode[mode] = {"failures": len(mine),
                             "averted_or_delayed_past_horizon": sum(r["averted_or_delayed"] for r in mine),
                             "share_averted_or_delayed": sum(r["averted_or_delayed"] for r in mine) / max(len(mine), 1),
                             "migrated_before_failure": sum(r["migrate_ts"] is not None for r in mine),
                             "gpu_h_per_failure": float(np.mean([r["gpu_h"] for r in mine])) if mine else float("nan")}
        n = max(len(rows), 1)
        h = res["healthy"]
        out["arms"][arm] = {
            "by_mode": by_mode,
            "share_averted_or_delayed": sum(r["averted_or_delayed"] for r in rows) / n,
            "gpu_h_per_failure": sum(r["gpu_h"] for r in rows) / n,
            "throttled_s_per_failure": sum(r["throttled_s"] for r in rows) / n,
            "false_per_1000_gpu_days": {a: c / max(healthy_gpu_days, 1e-9) * 1000.0 for a, c in h["events"].items()},
            "false_gpu_h_per_1000_gpu_days": h["gpu_h"] / max(healthy_gpu_days, 1e-9) * 1000.0,
            "healthy_throttled_s": h["throttled_s"],
            "clock_share_while_throttled": res["clock_share_while_throttled"],
            "gpu_samples": res["gpu_samples"],
            "failures": rows,
        }  # fmt: skip
    d, t = out["arms"]["drain_only"], out["arms"]["throttle"]
    per_failure = d["gpu_h_per_failure"] - t["gpu_h_per_failure"]  # > 0: throttling costs the job less
    episodes = arms["drain_only"]["healthy"]["events"]["checkpoint"]  # every false alarm episode checkpoints
    extra = arms["throttle"]["healthy"]["gpu_h"] - arms["drain_only"]["healthy"]["gpu_h"]
    per_episode = extra / episodes if episodes else float("nan")
    false_rate = 0.0 if false_alarms_per_1000_gpu_days is None else false_alarms_per_1000_gpu_days / 1000.0
    per_day = false_rate * (0.0 if math.isnan(per_episode) else per_episode)
    net = 1000.0 * (per_failure * lam - per_day)
    # The same with the simulator's own slowdown (1 - clock share) instead of the cost model's: the cost is linear
    # in it, so only the throttled seconds are re-priced.
    share = t["clock_share_while_throttled"]
    sim_slow = None if share is None else 1.0 - share
    if sim_slow is not None:
        reprice = costs.job_gpus * (sim_slow - costs.throttle_slowdown) / 3600.0
        held_h = arms["throttle"]["healthy"]["throttled_s"] - arms["drain_only"]["healthy"]["throttled_s"]
        per_failure_sim = per_failure - reprice * t["throttled_s_per_failure"]
        per_day_sim = per_day + (false_rate * reprice * held_h / episodes if episodes else 0.0)
        net_sim: float | None = 1000.0 * (per_failure_sim * lam - per_day_sim)
    else:
        net_sim = None
    # Bounds on what throttling first changes per false alarm episode, from the policy's rules alone: at best the
    # throttle replaces the checkpoint and is undone after the shortest hold (the episode gap); at worst it holds
    # its full time and the checkpoint still follows.
    gap = PolicyRules().episode_gap_s
    best = costs.throttle_cost(min(gap, spec.throttle_s)) - costs.action_cost("checkpoint", real=False)
    worst = costs.throttle_cost(spec.throttle_s)
    bounds = [1000.0 * (per_failure * lam - false_rate * x) for x in (worst, best)]
    out["throttle_vs_drain_only"] = {
        "per_false_episode_bounds_gpu_h": [best, worst],
        "net_gpu_h_saved_per_1000_gpu_days_real_bounds": bounds,
        "simulated_slowdown": sim_slow,
        "net_gpu_h_saved_per_1000_gpu_days_real_at_simulated_slowdown": net_sim,
        "gpu_h_saved_per_failure": per_failure,
        "healthy_false_episodes": episodes,
        "extra_gpu_h_per_false_episode": per_episode,
        "false_alarms_per_1000_gpu_days_real": false_alarms_per_1000_gpu_days,
        "net_gpu_h_saved_per_1000_gpu_days_real": net,
        "false_alarms_counted": false_alarms_per_1000_gpu_days is not None and episodes > 0,
        "pays": net > 0,
    }
    return out


def table_rows(out: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(key, value, note) rows of the figures for `gpuwatch bench throttle`."""
    spec = out["spec"]
    kind = out["throttle_kind"]
    what = (f"SM clock locked at most {spec['throttle_clock_frac']:.0%} of the maximum" if kind == "clocks"
            else f"power limit {spec['throttle_frac']:.0%} of the default")  # fmt: skip
    rows: list[tuple[str, Any, str]] = [("throttle_kind", kind, f"{what} for {spec['throttle_s']:g} s")]
    for arm, a in out["arms"].items():
        for mode, m in a["by_mode"].items():
            rows.append((f"{arm}.{mode}.share_averted_or_delayed", m["share_averted_or_delayed"],
                         f"{m['averted_or_delayed_past_horizon']} of {m['failures']} not failed within the horizon"))
            rows.append((f"{arm}.{mode}.gpu_h_per_failure", m["gpu_h_per_failure"],
                         f"migrated before failing: {m['migrated_before_failure']} of {m['failures']}"))
        rows.append((f"{arm}.throttled_s_per_failure", a["throttled_s_per_failure"], "while the job was on the GPU"))
        rows.append((f"{arm}.false_gpu_h_per_1000_gpu_days", a["false_gpu_h_per_1000_gpu_days"],
                     ", ".join(f"{k} {v:.1f}" for k, v in a["false_per_1000_gpu_days"].items()) + " per 1,000 GPU-days"))
        share = a["clock_share_while_throttled"]
        rows.append((f"{arm}.clock_share_while_throttled", share if share is not None else "-",
                     "simulated SM clock / max on busy throttled GPUs"))
    v = out["throttle_vs_drain_only"]
    rows.append(("throttle_vs_drain_only.gpu_h_saved_per_failure", v["gpu_h_saved_per_failure"], "> 0: throttle cheaper"))
    rows.append(("throttle_vs_drain_only.extra_gpu_h_per_false_episode", v["extra_gpu_h_per_false_episode"],
                 f"over {v['healthy_false_episodes']} false alarm episodes on the look-alike-rich healthy fleet"))
    rate = v["false_alarms_per_1000_gpu_days_real"]
    note = f"at {out['real_thermal_power_failures_per_gpu_day']:.3g} thermal+power failures per GPU-day and " + (
        f"{rate:g} false alarm episodes per 1,000 GPU-days" if v["false_alarms_counted"]
        else "NO false alarms counted (give --false-alarms-per-1000 and a healthy fleet with false episodes)")
    rows.append(("throttle_vs_drain_only.net_gpu_h_saved_per_1000_gpu_days_real",
                 v["net_gpu_h_saved_per_1000_gpu_days_real"], note))
    lo, hi = v["per_false_episode_bounds_gpu_h"]
    rows.append(("throttle_vs_drain_only.per_false_episode_bounds", f"{lo:.1f}..{hi:.1f}",
                 "GPU-hours a throttle-first adds per false alarm episode, bounded by the policy's rules"))
    lo, hi = v["net_gpu_h_saved_per_1000_gpu_days_real_bounds"]
    rows.append(("throttle_vs_drain_only.net_..._real_with_bounds", f"{lo:.1f}..{hi:.1f}",
                 "net per 1,000 GPU-days at the real rate with those bounds (false alarms from the input rate)"))
    sim = v["net_gpu_h_saved_per_1000_gpu_days_real_at_simulated_slowdown"]
    rows.append(("throttle_vs_drain_only.net_..._real_at_simulated_slowdown", sim if sim is not None else "-",
                 f"the same with the simulator's slowdown ({v['simulated_slowdown'] or 0:.2f}) for "
                 f"the cost model's ({out['cost_model']['throttle_slowdown']:.2f})"))
    return rows
