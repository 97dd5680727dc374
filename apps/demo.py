"""`gpuwatch demo`: the whole pipeline on an embedded stack with a simulated fleet.

The demo replays `history_min` minutes of simulated history (so windows hold real
precursors), then goes live at 1 Hz for `duration_s`. Failures with precursors are
injected to land inside the live phase. Everything runs for real: Tansu broker,
redis-server, a `gpuwatch stream` worker process, the Redis sink, the remediation
policy and a dry-run controller.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gpuwatch.apps.report import RunRecorder
from gpuwatch.config import Settings, redact_url
from gpuwatch.embedded import embedded_stack
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.processes import NO_STATS, StatsFollower, start_stream_worker
from gpuwatch.schemas.records import Outcome, Remediation, Risk, StreamStats

# Failures are placed this far into the live phase at the earliest (catching up takes a few seconds).
_LIVE_MARGIN_S = 10.0


@dataclass
class DemoOptions:
    gpus: int = 64
    duration_s: float = 60.0
    history_min: float = 30.0
    failures: int = 3
    seed: int = 7
    summary_json: Path | None = None
    report: Path | None = None  # HTML report with plots of the failed GPUs' risk (needs matplotlib)
    drain_timeout_s: float = 30.0


# The policy's clocks the demo compresses so that a precursor's whole ladder fits in a minute of live time
# (production default -> demo). What decides an alarm (the model's operating point) is not compressed.
DEMO_CLOCKS = {"policy_checkpoint_grace_s": (60.0, 5.0), "policy_reboot_after_s": (600.0, 20.0),
               "policy_episode_gap_s": (600.0, 60.0)}  # fmt: skip


@dataclass
class DemoState:
    """Counters shared by the demo's threads (guarded by `lock`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    live_since: float = float("inf")
    last_live_ts: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    risk_written: int = 0
    gpus_scored: set[str] = field(default_factory=set)
    remediation: dict[str, int] = field(default_factory=dict)
    outcomes: int = 0
    stream_stats: StatsFollower | None = None  # the worker's `gpuwatch.stats/1` lines
    labels: list[dict] = field(default_factory=list)
    records_by_gpu: dict[str, list[tuple[float, float, float, bool, bool]]] = field(default_factory=dict)
    events: list[Remediation] = field(default_factory=list)
    newest_written_ts: float = 0.0
    recorder: RunRecorder = field(default_factory=RunRecorder)


def _worker_stats(state: DemoState) -> StreamStats:
    return NO_STATS if state.stream_stats is None else state.stream_stats.latest


def _wait_processed(state: DemoState, produced: int, timeout_s: float, say: Any) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        stats = _worker_stats(state)
        done = stats.samples + stats.rejected_samples
        if done >= produced:
            return True
        time.sleep(0.25)
    say(f"[demo] warning: the stream worker processed {done:,} of {produced:,} GPU-samples within {timeout_s:.0f} s")
    return False


def _failure_line(f: dict[str, Any]) -> str:
    """Before the failure: the alarm's and the first checkpoint's lead, and the highest score and risk."""
    alarm = "no alarm" if f["alarm_lead_min"] is None else f"alarm {f['alarm_lead_min']:.1f} min before"
    ckpt = "no checkpoint" if f["checkpoint_lead_min"] is None else f"checkpoint {f['checkpoint_lead_min']:.1f} min before"
    risk = "n/a" if f["max_risk_before"] is None else f"{f['max_risk_before']:.2g}"
    return f"{alarm}, {ckpt}; before failing: max score {f['max_score_before']:.2f}, max risk {risk}"


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_demo(settings: Settings, opts: DemoOptions) -> int:
    """Run the demo and print its summary; returns the process exit code."""
    from gpuwatch.controller.worker import run_controller
    from gpuwatch.simulator.feed import SimulatedFeed
    from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
    from gpuwatch.sinks.remediation_sink import run_remediation_sink
    from gpuwatch.sinks.risk_sink import run_risk_sink

    hosts = max(1, (opts.gpus + 7) // 8)
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    state = DemoState()
    stop = threading.Event()
    t_start = time.time()
    with embedded_stack(settings) as settings:
        settings = settings.replace(**{name: demo for name, (_, demo) in DEMO_CLOCKS.items()})
        say(f"[demo] broker {settings.kafka_bootstrap}, redis {redact_url(settings.redis_url)}")
        ensure_topics(settings)
        worker = start_stream_worker(settings)
        state.stream_stats = StatsFollower(worker)

        def on_written(records: list[Risk], written_at: float) -> None:
            with state.lock:
                state.risk_written += len(records)
                if opts.report:
                    state.recorder.add_risk(records)
                for r in records:
                    gpu = f"{r.host}:{r.gpu_index}"
                    state.gpus_scored.add(gpu)
                    score = r.score if isinstance(r.score, float) else r.risk
                    state.records_by_gpu.setdefault(gpu, []).append((r.ts, r.risk, score, r.alarm, r.failed))
                    state.newest_written_ts = max(state.newest_written_ts, r.ts)
                    if r.ts >= state.live_since:
                        state.latencies_ms.append((written_at - r.ts) * 1000.0)

        def on_event(event: Remediation) -> None:
            with state.lock:
                state.remediation[event.action] = state.remediation.get(event.action, 0) + 1
                state.recorder.add_event(event)
                state.events.append(event)
            say(f"[demo] remediation: {event.action} {event.host} GPU {event.gpu_index} ({event.reason})")

        def on_outcome(outcome: Outcome) -> None:
            with state.lock:
                state.outcomes += 1

        threads = [
            threading.Thread(target=run_risk_sink, args=(settings,), kwargs={"stop": stop, "on_written": on_written},
                             name="risk-sink", daemon=True),
            threading.Thread(target=run_remediation_sink, args=(settings,),
                             kwargs={"stop": stop, "on_event": on_event}, name="remediation-sink", daemon=True),
            threading.Thread(target=run_controller, args=(settings,), kwargs={"stop": stop, "on_outcome": on_outcome},
                             name="controller", daemon=True),
        ]
        for t in threads:
            t.start()

        say("[demo] waiting for the stream worker to join its group ...")
        deadline = time.time() + 120
        while time.time() < deadline and not _worker_stats(state).partitions:
            if not worker.alive():
                raise RuntimeError(f"the stream worker exited:\n{worker.log_tail()}")
            time.sleep(0.2)
        now = time.time()
        history_s = opts.history_min * 60.0
        sim = FleetSimulator(FleetConfig(hosts=hosts, gpus_per_host=8, seed=opts.seed, interval_s=1.0,
                                         start_ts=now - history_s))
        rng = np.random.default_rng(opts.seed)
        modes = ["memory", "thermal", "interconnect", "power"]
        for k in range(min(opts.failures, hosts * 8)):
            # Land each failure inside the live phase, with a precursor that began during the history.
            fail_in = history_s + _LIVE_MARGIN_S + opts.duration_s * (0.3 + 0.5 * k / max(opts.failures, 1))
            sim.schedule_failure(int(k % hosts), int(rng.integers(0, 8)), modes[k % len(modes)],
                                 fail_in_s=fail_in, precursor_s=fail_in - rng.uniform(60, 300))
        feed = SimulatedFeed(sim, make_producer(settings), settings.topic_samples)

        def processed() -> int:
            stats = _worker_stats(state)
            return stats.samples + stats.rejected_samples

        say(f"[demo] replaying {opts.history_min:g} min of history for {hosts * 8} GPUs ...")
        # Live latency means steady state: publish up to now until the worker has digested it all.
        if not feed.catch_up(processed, timeout_s=180.0):
            say(f"[demo] warning: the stream worker processed {processed():,} of {feed.produced:,} GPU-samples")
        with state.lock:
            state.live_since = sim.now
        say(f"[demo] live for {opts.duration_s:g} s at 1 Hz")
        live_start = time.time()
        last_report = [0.0]

        def on_tick() -> None:
            for label in sim.drain_labels():
                state.labels.append(label)
                say(f"[demo] GPU failed: {label['host']} GPU {label['gpu_index']} ({label['mode']})")
            if time.time() - last_report[0] < 5:
                return
            last_report[0] = time.time()
            with state.lock:
                ss = _worker_stats(state)
                p99 = _percentile(state.latencies_ms, 99)
                say(f"[demo] t+{time.time() - live_start:4.0f}s  samples scored {ss.samples:>8,}  "
                    f"risk records {state.risk_written:>7,}  remediation {sum(state.remediation.values())}  "
                    "latency p99 " + (f"{p99:.0f} ms" if p99 is not None else "n/a"))

        feed.run_live(opts.duration_s, on_tick)
        state.last_live_ts = sim.now - 1.0
        produced = feed.produced
        # Let the pipeline finish what was produced before the summary.
        _wait_processed(state, produced, timeout_s=opts.drain_timeout_s, say=say)
        time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(timeout=10)
        worker.stop()
        summary = _summary(state, produced, time.time() - t_start, hosts * 8)
    _print_summary(summary)
    if opts.report:
        _write_report(state, summary, opts, say, settings)
    if opts.summary_json:
        opts.summary_json.parent.mkdir(parents=True, exist_ok=True)
        opts.summary_json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        say(f"[demo] summary written to {opts.summary_json}")
    return 0 if summary["gpus_scored"] > 0 else 1


def _write_report(
    state: DemoState, summary: dict[str, Any], opts: DemoOptions, say: Any, settings: Settings
) -> None:
    from gpuwatch.apps.report import render_report

    rows = [
        ("GPUs simulated", f"{summary['gpus']:,} ({opts.history_min:g} min of history, {opts.duration_s:g} s live)"),
        ("GPU-samples processed", f"{summary['samples']:,}"),
        ("remediation events", ", ".join(f"{a}: {n}" for a, n in summary["remediation_events"].items()) or "none"),
        ("latency p99 (sample -> Redis)", "n/a" if summary["latency_p99_ms"] is None
         else f"{summary['latency_p99_ms']:,.0f} ms"),
    ]
    data = state.recorder.report_data(state.labels, summary=rows, title="gpuwatch demo report")
    live = state.recorder.live_risk()
    if live is not None:  # the fleet view from the live risk alone: a minute of demo is no failure history
        from gpuwatch.apps.fleet.view import FleetOptions, fleet_view

        data.fleet = fleet_view(None, live, FleetOptions(
            base_rate_per_gpu_day=settings.fleet_failure_rate_per_gpu_day, job_gpus=settings.policy_job_gpus,
            checkpoint_interval_s=settings.policy_job_checkpoint_interval_s))  # fmt: skip
    say(f"[demo] report written to {render_report(data, opts.report)}")


def _summary(state: DemoState, produced: int, wall_s: float, gpus: int) -> dict[str, Any]:
    ss = _worker_stats(state)
    return {
        "gpus": gpus,
        "samples_produced": produced,
        "samples": ss.samples,
        "samples_deadlettered": ss.rejected_samples,
        "gpus_scored": len(state.gpus_scored),
        "risk_records": state.risk_written,
        "remediation_events": dict(sorted(state.remediation.items())),
        "remediation_outcomes": state.outcomes,
        "failures": [_before_failure(state, lab) for lab in state.labels],
        "actions_after_failure": _actions_after_failure(state),
        "compressed_clocks": {name: {"production_s": prod, "demo_s": demo} for name, (prod, demo) in DEMO_CLOCKS.items()},
        "latency_p50_ms": _percentile(state.latencies_ms, 50),
        "latency_p99_ms": _percentile(state.latencies_ms, 99),
        "latency_samples": len(state.latencies_ms),
        "state_bytes_per_gpu": ss.state_bytes_per_gpu or None,
        "wall_s": round(wall_s, 1),
    }


def _before_failure(state: DemoState, lab: dict) -> dict[str, Any]:
    """What the pipeline showed and did for one failed GPU before it failed: records after the failure (the
    GPU is failed then, not at risk) and the repair are not counted as predictions."""
    gpu, fail_ts = f"{lab['host']}:{lab['gpu_index']}", float(lab["fail_ts"])
    before = [r for r in state.records_by_gpu.get(gpu, []) if r[0] <= fail_ts and not r[4]]
    alarms = [r[0] for r in before if r[3]]
    checkpoints = [e.ts for e in state.events if f"{e.host}:{e.gpu_index}" == gpu
                   and e.action == "checkpoint" and e.ts <= fail_ts]  # fmt: skip
    lead = lambda ts: round((fail_ts - min(ts)) / 60.0, 2) if ts else None  # noqa: E731
    return {
        **{k: lab[k] for k in ("host", "gpu_index", "mode", "fail_ts")},
        "max_risk_before": max((r[1] for r in before), default=None),
        "max_score_before": round(max((r[2] for r in before), default=0.0), 3),
        "alarm_lead_min": lead(alarms),
        "checkpoint_lead_min": lead(checkpoints),
    }


def _actions_after_failure(state: DemoState) -> int:
    """Ladder actions (not repairs) on a GPU after it failed: the policy should never take one."""
    failed_at = {f"{lab['host']}:{lab['gpu_index']}": float(lab["fail_ts"]) for lab in state.labels}
    return sum(
        1 for e in state.events
        if e.action != "repair" and e.ts > failed_at.get(f"{e.host}:{e.gpu_index}", float("inf"))
    )  # fmt: skip


def _print_summary(s: dict[str, Any]) -> None:
    def fmt_ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f} ms"

    rows = [
        ("GPUs simulated", f"{s['gpus']:,}"),
        ("GPU-samples produced", f"{s['samples_produced']:,}"),
        ("GPU-samples processed", f"{s['samples']:,}"),
        ("GPU-samples dead-lettered", f"{s['samples_deadlettered']:,}"),
        ("GPUs scored", f"{s['gpus_scored']:,}"),
        ("risk records in Redis", f"{s['risk_records']:,}"),
        *((f"remediation: {a}", str(n)) for a, n in s["remediation_events"].items()),
        ("remediation events", str(sum(s["remediation_events"].values()))),
        *([(f"failure {f['host']}:{f['gpu_index']} ({f['mode']})", _failure_line(f)) for f in s["failures"]]
          or [("failures (ground truth)", "none")]),
        ("ladder actions after a failure", str(s["actions_after_failure"])),
        ("clocks compressed for the demo", ", ".join(f"{k} {v['production_s']:g} -> {v['demo_s']:g} s"
                                                     for k, v in s["compressed_clocks"].items())),
        ("latency p50 (sample -> Redis)", fmt_ms(s["latency_p50_ms"])),
        ("latency p99 (sample -> Redis)", fmt_ms(s["latency_p99_ms"])),
        ("wall time", f"{s['wall_s']:.0f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "gpuwatch demo summary".center(width + 30, "="))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 30))
