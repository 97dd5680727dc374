"""`gpuwatch bench archive --live`: what the live pipeline archives is what `gpuwatch eval` replays.

A simulated fleet (`--gpus`, `--seconds` of fleet time at 1 Hz, stamped so that it ends now) is published to the
samples topic of an embedded broker; a real `gpuwatch stream` worker scores it and a real `gpuwatch archive`
process archives samples and risk as Parquet. Then the archive's samples are replayed the way `gpuwatch eval`
replays them (the stream's own code, `training.eval_cli.collect`) with the simulator's ground-truth labels, and
compared with the risk records the live worker wrote:

* record for record: every (GPU, sample ts) scored live is scored offline, and the risk is the same (bit for
  bit, or within float32 rounding: the LSTM's batched matrix products round differently when a GPU is scored
  beside other GPUs live than in the replay, by at most a few 1e-8);
* figure for figure: the eval report built from the live records equals the one built from the replay (event
  figures exactly; ECE and Brier, sums over every record, within 1e-6 relative).

Prints a table and writes JSON; exits non-zero when a record or a figure differs.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq

from gpuwatch.apps.bench.table import emit
from gpuwatch.archive.reader import ArchiveReader
from gpuwatch.config import Settings, load_settings
from gpuwatch.embedded import EmbeddedServer, embedded_stack, spawn_child
from gpuwatch.kafka import ensure_topics, make_producer, produce
from gpuwatch.processes import StatsFollower, settings_env, start_stream_worker
from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.sinks.policy import PolicyRules
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import operating_points
from gpuwatch.training.eval_cli import build_report, collect, fleet_failure_rate
from gpuwatch.training.evaluate import RiskTable, join_labels
from gpuwatch.training.recording import Recording, open_recording

DAY_S = 86400.0
MERGE_GAP_S = 1800.0  # `gpuwatch eval`'s default episode merge gap
# The figures of the eval report that must come out the same from the live records and from the replay.
COMPARED = ("precision", "recall", "f1", "pr_auc", "median_lead_min", "p10_lead_min",
            "false_alarms_per_1000_gpu_days", "ece", "brier")  # fmt: skip
_MODE_INDEX = {m: i for i, m in enumerate(FAILURE_MODES)}
RISK_TOLERANCE = 1e-6  # float32 rounding of differently composed batches (measured: at most 9e-8)
EXACT = ("precision", "recall", "f1", "pr_auc", "median_lead_min", "p10_lead_min", "false_alarms_per_1000_gpu_days")


def _say(msg: str) -> None:
    print(f"[bench archive --live] {msg}", file=sys.stderr, flush=True)


def _rows(reader: ArchiveReader, table: str) -> int:
    """Rows of `table` in the archive, from the Parquet footers."""
    fs = reader.storage.filesystem
    return sum(pq.read_metadata(reader.storage.path(rel), filesystem=fs).num_rows for rel in reader.files(table))


def _publish(settings: Settings, samples: Path) -> int:
    """Every snapshot of `samples` (JSONL) to the samples topic, keyed by host; returns the GPU-samples sent."""
    producer = make_producer(settings, **{"linger.ms": 20, "batch.size": 512 * 1024})
    gpu_samples = 0
    with samples.open("rb") as f:
        for line in f:
            snap = orjson.loads(line)
            produce(producer, settings.topic_samples, snap["host"].encode(), line.rstrip(b"\n"))
            gpu_samples += len(snap["gpus"])
    if producer.flush(300) != 0:
        raise RuntimeError("could not deliver the fleet's snapshots to the broker")
    return gpu_samples


def _start_archive(settings: Settings, url: str) -> EmbeddedServer:
    env = settings_env(settings)
    env["GPUWATCH_ARCHIVE_URL"] = url
    return spawn_child("bench-archive", [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "archive"], env=env)


def _wait(what: str, done: Any, procs: list[EmbeddedServer], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = 0.0
    while not done():
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.log_tail(30)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        if time.monotonic() - last > 30:
            last = time.monotonic()
            _say(f"waiting for {what}")
        time.sleep(1.0)


def _live_table(reader: ArchiveReader) -> tuple[dict[tuple[str, float], float], RiskTable, int]:
    """The live worker's risk records from the archive: (uuid, ts) -> risk for GPUs not failed, as a RiskTable,
    and the number of records of failed GPUs (left out, as eval leaves them out)."""
    by_key: dict[tuple[str, float], float] = {}
    modes: dict[tuple[str, float], int] = {}
    failed = 0
    for rec in reader.records("risk"):
        if rec.get("failed"):
            failed += 1
            continue
        key = (rec["uuid"], float(rec["ts"]))
        by_key[key] = float(rec["risk"])
        modes[key] = _MODE_INDEX[rec["mode"]]
    keys = sorted(by_key, key=lambda k: (k[1], k[0]))
    table = RiskTable.from_columns(
        [k[0] for k in keys], np.array([k[1] for k in keys]), {"lstm": np.array([by_key[k] for k in keys])},
        {"lstm": np.array([modes[k] for k in keys], dtype=np.int64)},
    )
    return by_key, table, failed


def _same(name: str, a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if name in EXACT or not isinstance(a, float) or not isinstance(b, float):
        return bool(a == b)
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def bench_archive_live(
    gpus: int = 64, seconds: float = DAY_S, interval_s: float = 1.0, seed: int = 31, folder: str = ""
) -> dict[str, Any]:
    """Runs the check; returns the figures (see the module docstring)."""
    hosts = max(1, gpus // 8)
    base = load_settings(env={})
    artifact = load_artifact()
    with tempfile.TemporaryDirectory(prefix="gpuwatch-bench-archive-live-", dir=folder or None) as tmp:
        fleet = Path(tmp, "fleet")
        _say(f"simulating {hosts * 8} GPUs x {seconds:,.0f} s, a snapshot every {interval_s:g} s")
        start_ts = time.time() - seconds - 120.0  # ends just before now: inside the worker's max_age_s
        # Failures at 1,000x the real rate (about 0.19 per GPU-day) and short repairs, so that a day of a small
        # fleet holds failures and alarms to compare; at the real rate it would hold none.
        overrides = {"start_ts": start_ts, "rate_scale": 1000.0, "repair_time_scale": 0.01}
        sim = simulate_to_dir(hosts, 8, seconds / DAY_S, fleet, seed=seed, interval_s=interval_s,
                              config_overrides=overrides)  # fmt: skip
        own_rate = fleet_failure_rate(open_recording(fleet))
        url = str(Path(tmp, "archive"))
        with embedded_stack(base) as stack:
            stamp = time.time_ns()
            settings = stack.replace(
                stream_app_id=f"bench-archive-live-{stamp}", partitions=4,
                # risk stated at the fleet's own failure rate, as `gpuwatch eval` states it on this fleet
                fleet_failure_rate_per_gpu_day=own_rate if own_rate is not None else stack.fleet_failure_rate_per_gpu_day,
                archive_flush_interval_s=5.0,
            )  # fmt: skip
            ensure_topics(settings, [settings.topic_samples, settings.topic_risk, settings.topic_deadletter,
                                     settings.topic_remediation, settings.topic_outcomes])  # fmt: skip
            _say("publishing the fleet's snapshots")
            t0 = time.perf_counter()
            sent = _publish(settings, fleet / "samples.jsonl")
            publish_s = time.perf_counter() - t0
            worker = start_stream_worker(settings, "bench-archive-worker")
            stats = StatsFollower(worker)
            archiver = _start_archive(settings, url)
            try:
                t0 = time.perf_counter()
                s = stats.wait(lambda s: s.samples + s.rejected_samples >= sent, 7200,
                               f"the worker to score {sent:,} GPU-samples")  # fmt: skip
                worker_s = time.perf_counter() - t0
                reader = ArchiveReader(url)

                def archived() -> bool:
                    latest = stats.latest
                    return _rows(reader, "samples") >= sent and _rows(reader, "risk") >= latest.scored

                _wait("the archive to hold every sample and risk record", archived, [worker, archiver], 7200)
                archive_s = time.perf_counter() - t0
                s = stats.latest
            finally:
                archiver.stop()
                worker.stop()
        reader = ArchiveReader(url)
        live, live_table, live_failed = _live_table(reader)
        _say(f"replaying the archive as `gpuwatch eval` does ({len(live):,} live records to match)")
        recording = Recording(name="archive", location=url, source=f"{url}/samples", archive_url=url,
                              labels_path=fleet / "labels.jsonl", meta_path=fleet / "meta.json")  # fmt: skip
        alarm_op, drain_op = operating_points(artifact, settings)
        t0 = time.perf_counter()
        got = collect(recording, Scorer(artifact), {}, settings.rescore_interval_s, failures_per_gpu_day=own_rate,
                      rules=PolicyRules.from_settings(settings, fleet_guards=False), alarm_op=alarm_op,
                      drain_op=drain_op)  # fmt: skip
        replay_s = time.perf_counter() - t0
        table = got.table
        offline = dict(zip(zip(np.asarray(table.uuids)[table.gpu].tolist(), table.ts.tolist()), table.risk["lstm"].tolist()))
        missing_offline = sum(1 for key in live if key not in offline)
        missing_live = sum(1 for key in offline if key not in live)
        diffs = [abs(live[key] - offline[key]) for key in live if key in offline]
        failures = recording.failures()
        reports = {}
        for name, tab in (("live", live_table), ("replay", table)):
            lab = join_labels(tab, failures, artifact.horizon_s)
            reports[name] = build_report(lab, {"lstm": alarm_op.threshold}, MERGE_GAP_S, {"name": name},
                                         {"lstm": alarm_op.records}, {"lstm": alarm_op.for_s},
                                         {"lstm": alarm_op.bridge_s})  # fmt: skip
        figures_equal = {k: _same(k, reports["live"][k], reports["replay"][k]) for k in COMPARED}
    return {
        "gpus": hosts * 8, "fleet_seconds": seconds, "interval_s": interval_s, "gpu_days": round(hosts * 8 * seconds / DAY_S, 2),
        "failures": sim["failures"], "gpu_samples_sent": sent, "worker_gpu_samples": s.samples,
        "worker_rejected": s.rejected_samples, "worker_records": s.scored,
        "live_records": len(live), "live_failed_records": live_failed, "replay_records": len(offline),
        "missing_in_replay": missing_offline, "missing_in_live": missing_live,
        "max_abs_risk_diff": max(diffs) if diffs else None,
        "records_differing": sum(1 for d in diffs if d != 0.0),
        "records_beyond_tolerance": sum(1 for d in diffs if d > RISK_TOLERANCE), "risk_tolerance": RISK_TOLERANCE,
        "figures_equal": figures_equal, "figures_live": {k: reports["live"][k] for k in COMPARED},
        "figures_replay": {k: reports["replay"][k] for k in COMPARED},
        "publish_seconds": round(publish_s, 1), "worker_seconds": round(worker_s, 1),
        "archive_seconds": round(archive_s, 1), "replay_seconds": round(replay_s, 1),
        "operating_point": alarm_op.name, "risk_stated_at_failures_per_gpu_day": own_rate,
    }  # fmt: skip


def bad_args(args: argparse.Namespace) -> str:
    """Why `args` cannot run the check ("" when they can)."""
    seconds = args.seconds or DAY_S
    if not (args.interval > 0 and math.isfinite(args.interval)):
        return f"--interval {args.interval:g}: give the seconds between a node's snapshots, more than 0 (default 1)"
    if not (math.isfinite(seconds) and seconds >= 10 * args.interval):
        return f"--seconds {seconds:g}: give at least 10 snapshots' worth (10 x --interval), e.g. 600 (default 86400)"
    return ""


def run_archive_live_bench(args: argparse.Namespace) -> dict[str, Any]:
    f = bench_archive_live(gpus=args.gpus or 64, seconds=args.seconds or DAY_S, interval_s=args.interval)
    rows: list[tuple[str, Any, str]] = [
        ("fleet", f"{f['gpus']} GPUs x {f['fleet_seconds']:,.0f} s, every {f['interval_s']:g} s", f"{f['gpu_days']} GPU-days, "
         f"{f['failures']} failures"),
        ("GPU-samples through the live worker", f["worker_gpu_samples"], f"{f['worker_rejected']} rejected"),
        ("risk records, live (archived)", f["live_records"], f"plus {f['live_failed_records']} of failed GPUs"),
        ("risk records, eval's replay of the archive", f["replay_records"], ""),
        ("live records missing in the replay", f["missing_in_replay"], "must be 0"),
        ("replay records missing live", f["missing_in_live"], "must be 0"),
        ("records whose risk differs at all", f["records_differing"], f"max |diff| {f['max_abs_risk_diff']}"),
        (f"records whose risk differs by > {RISK_TOLERANCE:g}", f["records_beyond_tolerance"], "must be 0"),
    ]  # fmt: skip
    for k in COMPARED:
        rows.append((f"eval {k}: live / replay", f"{f['figures_live'][k]} / {f['figures_replay'][k]}",
                     "same" if f["figures_equal"][k] else "DIFFERS"))  # fmt: skip
    rows += [("seconds: publish / worker / archive / replay",
              f"{f['publish_seconds']} / {f['worker_seconds']} / {f['archive_seconds']} / {f['replay_seconds']}", "")]
    emit("gpuwatch bench archive --live", rows, f, args.json_path)
    return f


def archive_live_ok(f: dict[str, Any]) -> bool:
    """Record-for-record (within float32 rounding) and figure-for-figure equality."""
    return (f["missing_in_replay"] == 0 and f["missing_in_live"] == 0 and f["records_beyond_tolerance"] == 0
            and all(f["figures_equal"].values()))  # fmt: skip
