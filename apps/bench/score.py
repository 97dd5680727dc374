"""`gpuwatch bench score`: offline scoring throughput on this machine (CPU), side by side on one fleet.

1. score_workers_N_gpu_samples_per_s: `gpuwatch score --workers N` as a command (start-up included) on a
   simulated recording of `--gpus` GPUs at 1 Hz for `--seconds` of fleet time at the real failure rate
   (default 512 GPUs for an hour), for N = 1 (one process, as before) and N = 2 up to the CPUs;
   workers_N_max_risk_diff is how far its risks are from those of one process (see score_shards).
2. fleet_replay_shards_S_gpu_samples_per_s: `training.fleet_replay.simulate_and_score` on the same fleet
   shape, simulation included (no file), for S = 1 (in this process) and S = the CPUs.
3. *_cpu_s_per_m: CPU seconds of all processes per million GPU-samples. On a shared machine the wall-clock
   rates move with other people's load; this moves less.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gpuwatch.apps.bench.table import emit
from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.training.score import available_cpus

TARGET = 300_000  # GPU-samples/s of offline scoring wanted on the 2-core development machine
SEED = 9


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its waited-for children so far."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _risks(path: Path) -> np.ndarray:
    return np.array([decode_risk(line).risk for line in path.read_bytes().splitlines()])


def score_command_rate(samples: Path, out: Path, workers: int) -> dict[str, Any]:
    """Run `gpuwatch score --workers N` as a command (-P: the installed package, never a source checkout in
    the current directory); its own summary plus the CPU time it took."""
    cpu0, t0 = _cpu_s(), time.perf_counter()
    subprocess.run(
        [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "score", "--input", str(samples), "--output", str(out),
         "--workers", str(workers), "--json", str(out.with_suffix(".json"))],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    summary = orjson.loads(out.with_suffix(".json").read_bytes())
    n = summary["gpu_samples"]
    return {"gpu_samples": n, "records": summary["risk_records"], "wall_s": wall, "gpu_samples_per_s": n / wall,
            "cpu_s_per_m": cpu / n * 1e6}  # fmt: skip


def fleet_replay_rate(gpus: int, seconds: float, shards: int) -> dict[str, Any]:
    """`simulate_and_score` on the bench's fleet with `shards` shards."""
    from gpuwatch.training.fleet_replay import simulate_and_score

    cpu0, t0 = _cpu_s(), time.perf_counter()
    fleet = simulate_and_score(max(1, gpus // 8), 8, seconds / 86400, seed=SEED, shards=shards)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - cpu0
    n = fleet.gpu_samples
    return {"gpu_samples": n, "records": len(fleet.risk), "wall_s": wall, "gpu_samples_per_s": n / wall,
            "cpu_s_per_m": cpu / n * 1e6}  # fmt: skip


def run_score_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # the in-process fleet replay scores on one thread, as each worker does
    gpus = args.gpus or 512
    seconds = args.seconds or 3600.0
    cpus = available_cpus()
    worker_counts = [1] + list(range(2, cpus + 1))
    figures: dict[str, Any] = {"bench_gpus": gpus, "bench_fleet_seconds": seconds, "cpus": cpus}
    rows: list[tuple[str, Any, str]] = []
    with tempfile.TemporaryDirectory(prefix="gpuwatch-bench-score-") as tmp:
        _say(f"simulating {gpus:,} GPUs at 1 Hz for {seconds:,.0f} s (real failure rate) to a recording")
        sim = simulate_to_dir(max(1, gpus // 8), 8, seconds / 86400, Path(tmp), seed=SEED)
        figures["bench_gpu_samples"] = sim["gpu_samples"]
        figures["simulate_to_dir_gpu_samples_per_s"] = sim["gpu_samples_per_s"]
        one: np.ndarray | None = None
        for n in worker_counts:
            _say(f"gpuwatch score --workers {n}")
            out = Path(tmp) / f"risk-{n}.jsonl"
            r = score_command_rate(Path(tmp) / "samples.jsonl", out, n)
            key = f"score_workers_{n}"
            figures[f"{key}_gpu_samples_per_s"] = r["gpu_samples_per_s"]
            figures[f"{key}_cpu_s_per_m"] = r["cpu_s_per_m"]
            risks = _risks(out)
            if one is None:
                one = risks
            else:
                same = len(risks) == len(one)
                figures[f"workers_{n}_max_risk_diff"] = (
                    float(np.abs(risks - one).max()) if same else float("inf")
                )
            out.unlink()
    for s in sorted({1, cpus}):
        _say(f"fleet replay in memory, {s} shard(s)")
        r = fleet_replay_rate(gpus, seconds, s)
        figures[f"fleet_replay_shards_{s}_gpu_samples_per_s"] = r["gpu_samples_per_s"]
        figures[f"fleet_replay_shards_{s}_cpu_s_per_m"] = r["cpu_s_per_m"]
    for key, value in figures.items():
        note = ""
        if (
            key.startswith("score_workers_")
            and key.endswith("_per_s")
            and key != "score_workers_1_gpu_samples_per_s"
        ):
            note = f"target >= {TARGET:,}"
        if key.endswith("_risk_diff"):
            value, note = f"{value:.1e}", "float32 rounding of smaller batches (training/score_shards.py)"
        rows.append((key, value, note))
    figures.update({"device": "cpu", "torch_threads_per_process": 1})
    emit("gpuwatch bench score", rows, figures, args.json_path)
    return figures
