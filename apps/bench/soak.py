"""`gpuwatch bench soak`: the pipeline under steady load for a long time; is any process's memory growing?

On the same embedded stack as `gpuwatch bench reliability` (a Tansu broker and a redis-server as child
processes; node agents for `--gpus` simulated GPUs in this process, each node sending a snapshot every
`--interval` seconds (default 1); one `gpuwatch stream` worker, one
`gpuwatch sink` and one `gpuwatch controller` as real processes; the reliability bench's trickle of bad
snapshots and downstream probes every PROBE_EVERY_S, so that every stage has work of each kind, the
controller included), but with no faults, for `--seconds` (default 3,600). Every SAMPLE_EVERY_S it records the
resident memory of the worker, the sink, the controller and the broker, and the consumer lag of the worker
(on the samples topic) and of the risk sink (on the risk topic), in GPU-samples and risk records.

The verdict is read over the steady part of the run, its last TREND_FRACTION (the last 40 minutes of an
hour): each gpuwatch process's RSS trend (least-squares slope) must be at most RSS_TREND_LIMIT_MB_PER_MIN, and
each lag must be flat: its slope times the window's length must stay under `--gpus` (one sampling interval of
the fleet's GPU-samples; on the risk topic, where a GPU gets a record about every 5 s or every interval if that is
longer, about that long of records).
The broker's RSS is recorded, not judged: the memory-only Tansu keeps every message.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuwatch.apps.bench.reliability import (
    GPUS_PER_HOST,
    PROBE_EVERY_S,
    ReliabilityRun,
    _say,
    committed_offsets,
    end_offsets,
    slope_per_min,
)
from gpuwatch.apps.bench.table import emit

SAMPLE_EVERY_S = 10.0
TREND_FRACTION = 2.0 / 3.0  # the verdict's window: the last 2/3 of the run (the first third is warm-up)
RSS_TREND_LIMIT_MB_PER_MIN = 0.5  # issue 18: at most 0.5 MB/min per process after warm-up
JUDGED = ("worker", "sink", "controller")
RECORDED = (*JUDGED, "broker")


def rss_megabytes(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a process in MB (10^6 bytes; 0 when it is gone). `field="RssAnon"`: only its anonymous
    pages (heaps, stacks), which the kernel cannot drop under memory pressure as it drops mapped files' pages."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        pass
    return 0.0


@dataclass(frozen=True)
class Trend:
    """A least-squares trend over the steady window."""

    slope_per_min: float
    first: float  # the fitted line at the window's start and end
    last: float
    points: int


def trend(ts: list[float], values: list[float], since_s: float) -> Trend:
    """The trend of `values` over the points at `ts` >= `since_s`; 0 slope with fewer than 3 points."""
    pairs = [(t, v) for t, v in zip(ts, values, strict=True) if t >= since_s]
    if not pairs:
        return Trend(0.0, 0.0, 0.0, 0)
    xs, ys = [t for t, _ in pairs], [v for _, v in pairs]
    slope = slope_per_min(xs, ys)
    mean_t, mean_v = sum(xs) / len(xs), sum(ys) / len(ys)
    return Trend(slope, mean_v + slope * (xs[0] - mean_t) / 60.0, mean_v + slope * (xs[-1] - mean_t) / 60.0,
                 len(pairs))  # fmt: skip


def lag_is_flat(slope_per_min: float, window_s: float, gpus: int) -> bool:
    """A lag is flat when its trend adds less than one sampling interval of the fleet's samples (one per GPU)
    over the whole window."""
    return slope_per_min * window_s / 60.0 < gpus


def verdict(series: list[dict[str, float]], seconds: float, gpus: int) -> dict[str, Any]:
    """Per-process RSS trends and lag trends over the last TREND_FRACTION of `seconds`, with pass/fail."""
    since = seconds * (1.0 - TREND_FRACTION)
    ts = [row["t_s"] for row in series]
    window_s = max(0.0, (ts[-1] if ts else 0.0) - since)
    out: dict[str, Any] = {"window_from_s": round(since, 1), "window_s": round(window_s, 1)}
    passed = bool(ts) and window_s > 0
    for name in RECORDED:
        tr = trend(ts, [row[f"{name}_rss_mb"] for row in series], since)
        out[f"{name}_rss_trend_mb_per_min"] = round(tr.slope_per_min, 3)
        out[f"{name}_rss_mb_window"] = [round(tr.first, 1), round(tr.last, 1)]
        if series and f"{name}_anon_mb" in series[0]:  # recorded, not judged: RSS less the pages of mapped files
            anon = trend(ts, [row[f"{name}_anon_mb"] for row in series], since)
            out[f"{name}_anon_trend_mb_per_min"] = round(anon.slope_per_min, 3)
        if name in JUDGED:
            ok = tr.slope_per_min <= RSS_TREND_LIMIT_MB_PER_MIN
            out[f"{name}_rss_flat"] = ok
            passed = passed and ok
    for lag in ("worker_lag_samples", "sink_lag_records"):
        rows = [(row["t_s"], row[lag]) for row in series if row[lag] >= 0]
        tr = trend([t for t, _ in rows], [float(v) for _, v in rows], since)
        ok = lag_is_flat(tr.slope_per_min, window_s, gpus)
        out[f"{lag.rsplit('_', 1)[0]}_trend_per_min"] = round(tr.slope_per_min, 1)
        out[f"{lag.rsplit('_', 1)[0]}_flat"] = ok
        out[f"{lag}_max"] = max((v for t, v in rows if t >= since), default=0)
        passed = passed and ok
    out["passed"] = passed
    return out


class SoakRun(ReliabilityRun):
    """The reliability bench's stack and load, with no faults; `run()` returns the figures."""

    def risk_lag(self) -> int:
        from gpuwatch.sinks.risk_sink import group_id as risk_sink_group

        topic = self.settings.topic_risk
        ends = end_offsets(self.settings, topic, self.partitions)
        done = committed_offsets(self.settings, risk_sink_group(self.settings), topic, self.partitions)
        return sum(max(0, ends[p] - done.get(p, 0)) for p in ends)

    def measure(self, t0: float) -> dict[str, float]:
        pids = {"worker": self.worker, "sink": self.sink, "controller": self.controller, "broker": self.kafka}
        row: dict[str, float] = {"t_s": round(time.monotonic() - t0, 1)}
        for name, proc in pids.items():
            row[f"{name}_rss_mb"] = round(rss_megabytes(proc.proc.pid), 2)
            row[f"{name}_anon_mb"] = round(rss_megabytes(proc.proc.pid, "RssAnon"), 2)
        try:
            row["worker_lag_samples"] = self.backlog()
            row["sink_lag_records"] = self.risk_lag()
        except Exception:  # noqa: BLE001 - a measurement that timed out is marked, not fatal
            row["worker_lag_samples"] = row["sink_lag_records"] = -1
        row["spool_snapshots"] = self.publisher.pending
        return row

    def soak(self) -> list[dict[str, float]]:
        self.start()
        _say(f"soak: {self.gpus:,} GPUs ({self.hosts:,} hosts), a snapshot every {self.interval_s:g} s, for "
             f"{self.seconds:.0f} s, no faults")
        self.agent_thread.start()
        t0 = self.t0 = time.monotonic()
        series: list[dict[str, float]] = []
        next_sample = next_bad = t0
        while time.monotonic() - t0 < self.seconds:
            now = time.monotonic()
            if now >= next_bad:
                self.bad.inject(self.source)
                self.downstream.inject()
                next_bad = now + PROBE_EVERY_S
            if now >= next_sample:
                row = self.measure(t0)
                series.append(row)
                next_sample = now + SAMPLE_EVERY_S
                _say(f"t={row['t_s']:6.0f} s  rss MB: worker {row['worker_rss_mb']:.1f}  sink {row['sink_rss_mb']:.1f}"
                     f"  controller {row['controller_rss_mb']:.1f}  broker {row['broker_rss_mb']:.0f}  "
                     f"lag: worker {row['worker_lag_samples']:,.0f}  sink {row['sink_lag_records']:,.0f}")  # fmt: skip
            for name, proc in (
                ("stream worker", self.worker),
                ("sink", self.sink),
                ("controller", self.controller),
            ):
                if not proc.alive():
                    raise RuntimeError(f"the {name} died:\n{proc.log_tail(30)}")
            time.sleep(0.5)
        return series


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run_soak_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the soak (`args.gpus`, default 10,000; `args.seconds`, default 3,600; `args.interval`, seconds between
    a node's snapshots, default 1), prints the table, writes `args.json_path`; `figures["passed"]` is the verdict."""
    gpus = args.gpus or 10_000
    seconds = args.seconds or 3600.0
    interval = args.interval
    if not 0 < interval <= 60:
        raise SystemExit(f"gpuwatch bench soak: --interval {interval:g} is out of range; give seconds between a "
                         f"node's snapshots in (0, 60], e.g. --interval 10")  # fmt: skip
    if gpus < GPUS_PER_HOST or seconds < 6 * SAMPLE_EVERY_S:
        raise SystemExit(f"gpuwatch bench soak: --gpus {gpus} --seconds {seconds:g} is too small to judge; give at "
                         f"least --gpus {GPUS_PER_HOST} and --seconds {6 * SAMPLE_EVERY_S:g} (an hour: 3600)")  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-bench-soak-"))
    run = SoakRun(gpus, seconds, workdir, interval)
    load_before = load_average()
    try:
        series = run.soak()
        agent_late = run.agent.late_ticks
    finally:
        run.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    figures: dict[str, Any] = {
        **verdict(series, seconds, run.gpus),
        "gpus": run.gpus,
        "hosts": run.gpus // GPUS_PER_HOST,
        "seconds": seconds,
        "interval_s": interval,
        "sample_every_s": SAMPLE_EVERY_S,
        "rss_trend_limit_mb_per_min": RSS_TREND_LIMIT_MB_PER_MIN,
        "agent_late_ticks": agent_late,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "series": series,
    }
    notes = {
        "window_from_s": f"trends over the last {TREND_FRACTION:.0%} of the run",
        "broker_rss_trend_mb_per_min": "recorded, not judged (Tansu keeps every message in memory)",
        "worker_lag_trend_per_min": "GPU-samples/min on the samples topic",
        "sink_lag_trend_per_min": "risk records/min on the risk topic",
        "passed": f"RSS trends <= {RSS_TREND_LIMIT_MB_PER_MIN} MB/min, lags flat",
    }
    shown = {key: ("yes" if value else "NO") if isinstance(value, bool) else value for key, value in figures.items()}
    rows = [(key, value, notes.get(key, "")) for key, value in shown.items() if key != "series"]
    emit(f"gpuwatch bench soak ({run.gpus:,} GPUs, a snapshot every {interval:g} s, {seconds:.0f} s, no faults)",
         rows, figures, args.json_path)  # fmt: skip
    return figures
