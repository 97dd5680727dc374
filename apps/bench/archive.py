"""`gpuwatch bench archive`: what the archive costs. A simulated fleet's snapshots (1 Hz) go through the archive
writer in this process (decode, Arrow, Parquet with zstd, fsync and rename; no Kafka), flushed every
`flush_every_s` of fleet time as `gpuwatch archive` flushes every archive_flush_interval_s; then the archive is
read back as score/eval/train read it, and labelled. Prints a table and writes JSON."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from gpuwatch.apps.bench.table import emit
from gpuwatch.archive.labels import label_archive
from gpuwatch.archive.reader import ArchiveReader
from gpuwatch.archive.storage import Storage
from gpuwatch.archive.writer import ArchiveWriter, ensure_layout
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator

DAY_S = 86400.0


def bench_archive(
    gpus: int = 128, seconds: float = 1800.0, flush_every_s: float = 300.0, folder: str = ""
) -> dict:
    """Archives `seconds` of a `gpus`-GPU fleet (8 per host) at 1 Hz; returns the figures. Rates are wall-clock
    and per CPU-second of this process (they differ on a shared machine)."""
    hosts = max(1, gpus // 8)
    sim = FleetSimulator(FleetConfig(hosts=hosts, gpus_per_host=8, seed=11, interval_s=1.0))
    steps = int(seconds)
    batches = [
        [raw for _, raw in sim.step_json()] for _ in range(steps)
    ]  # made first: the bench times the archive
    json_bytes = sum(len(raw) for step in batches for raw in step)
    with tempfile.TemporaryDirectory(prefix="gpuwatch-bench-archive-", dir=folder or None) as tmp:
        storage = Storage(tmp)
        ensure_layout(storage)
        writer = ArchiveWriter(
            storage, {"samples": "samples"}, flush_rows=10**12, flush_interval_s=float("inf")
        )
        offset = 0
        t0, c0 = time.perf_counter(), time.process_time()
        flush_s = 0.0
        for k, step in enumerate(batches, 1):
            for raw in step:
                writer.add("samples", offset % 8, offset, None, raw)
                offset += 1
            if k % int(flush_every_s) == 0 or k == steps:
                t1 = time.perf_counter()
                writer.committed(writer.flush())
                flush_s += time.perf_counter() - t1
        write_s, write_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        data_bytes = sum(p.stat().st_size for p in Path(tmp, "samples").rglob("*.parquet"))
        files = sum(1 for _ in Path(tmp, "samples").rglob("*.parquet"))
        t0, c0 = time.perf_counter(), time.process_time()
        read = sum(1 for _ in ArchiveReader(storage).snapshot_messages())
        read_s, read_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        t0 = time.perf_counter()
        failures = len(label_archive(ArchiveReader(storage)))
        label_s = time.perf_counter() - t0
    gpu_samples = steps * hosts * 8
    gpu_days = hosts * 8 * steps / DAY_S
    return {
        "gpus": hosts * 8, "fleet_seconds": steps, "interval_s": 1.0, "flush_every_s": flush_every_s,
        "gpu_samples": gpu_samples, "snapshots": len(batches) * hosts, "files": files,
        "write_seconds": round(write_s, 3), "write_gpu_samples_per_s": round(gpu_samples / write_s),
        "write_cpu_seconds": round(write_cpu_s, 3), "write_gpu_samples_per_cpu_s": round(gpu_samples / write_cpu_s),
        "flush_seconds": round(flush_s, 3), "decode_seconds": round(write_s - flush_s, 3),
        "parquet_bytes": data_bytes, "jsonl_bytes": json_bytes,
        "parquet_mb_per_gpu_day": round(data_bytes / gpu_days / 1e6, 2),
        "jsonl_mb_per_gpu_day": round(json_bytes / gpu_days / 1e6, 2),
        "compression_vs_jsonl": round(json_bytes / max(data_bytes, 1), 1),
        "read_snapshots": read, "read_gpu_samples_per_s": round(gpu_samples / read_s),
        "read_gpu_samples_per_cpu_s": round(gpu_samples / read_cpu_s),
        "label_gpu_samples_per_s": round(gpu_samples / label_s), "failures_labelled": failures,
    }  # fmt: skip


def run_archive_bench(args: argparse.Namespace) -> dict[str, Any]:
    f = bench_archive(gpus=args.gpus or 128, seconds=args.seconds or 1800.0)
    rows = [
        ("fleet", f"{f['gpus']} GPUs x {f['fleet_seconds']} s at 1 Hz", f"{f['gpu_samples']:,} GPU-samples"),
        ("write rate (GPU-samples/s)", f["write_gpu_samples_per_s"], "decode + Parquet (zstd) + fsync, one process"),
        ("  per CPU-second", f["write_gpu_samples_per_cpu_s"], "the same, counting this process's CPU time only"),
        ("  of which decode + buffer (s)", f["decode_seconds"], "gpuwatch.schemas.codecs.decode_snapshot"),
        ("  of which flushes (s)", f["flush_seconds"], f"{f['files']} files, one per host per {f['flush_every_s']:.0f} s"),
        ("size per GPU-day (MB)", f["parquet_mb_per_gpu_day"], "Parquet on disk, samples at 1 Hz"),
        ("  JSONL per GPU-day (MB)", f["jsonl_mb_per_gpu_day"], f"{f['compression_vs_jsonl']}x larger"),
        ("read rate (GPU-samples/s)", f["read_gpu_samples_per_s"], "as score/eval/train read it"),
        ("  per CPU-second", f["read_gpu_samples_per_cpu_s"], ""),
        ("label rate (GPU-samples/s)", f["label_gpu_samples_per_s"], f"{f['failures_labelled']} failures found"),
    ]  # fmt: skip
    emit("gpuwatch bench archive", rows, f, args.json_path)
    return f
