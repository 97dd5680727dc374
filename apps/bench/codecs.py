"""`gpuwatch bench codecs`: the codecs' hot paths (gpuwatch.schemas.bench.bench_codecs) and, in the same run,
the stream worker's own per-record step: `RiskProcessor.emit`, which turns a batched pass's arrays into one
`gpuwatch.risk/1` message per GPU (the risk encode as it runs in the worker)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def filled_processor(gpus: int, steps: int, seed: int = 0) -> Any:
    """A `RiskProcessor` that folds only (no scoring) with the windows of `gpus` simulated GPUs after `steps`
    snapshots each: the state `RiskProcessor.emit` reads."""
    from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
    from gpuwatch.streams.model import Scorer, load_artifact
    from gpuwatch.streams.processor import Inbound, RiskProcessor

    processor = RiskProcessor(Scorer(load_artifact(), "cpu"), rescore_interval_s=1e9)  # fold only, no scoring
    sim = FleetSimulator(FleetConfig(hosts=gpus // 8, gpus_per_host=8, seed=seed, start_ts=1_700_000_000.0))
    for _ in range(steps):
        processor.process([Inbound(value, "samples", 0, i) for i, (_, value) in enumerate(sim.step_json())])
    return processor


def best_emit_us(processor: Any, scored: Any, repeat: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Best of `repeat` timings (after one warm-up) of `processor.emit(scored)` on `clock`, µs per record."""
    from gpuwatch.streams.processor import BatchResult

    best = float("inf")
    for _ in range(repeat + 1):  # the first is a warm-up
        result = BatchResult()
        start = clock()
        processor.emit(scored, 1_700_000_010.0, result)
        best = min(best, clock() - start)
        assert len(result.risk) == len(scored.slots)
    return best / len(scored.slots) * 1e6


def emit_us_per_record(gpus: int = 2048, repeat: int = 5, seed: int = 0) -> float:
    """Best of `repeat` timings of `RiskProcessor.emit` over `gpus` scored GPUs (µs per record); the windows are
    filled from a simulated fleet first, the scores are random (emit does not look at them)."""
    from gpuwatch.streams.processor import Scored

    processor = filled_processor(gpus, 3, seed)
    rng = np.random.default_rng(seed)
    n = len(processor.store.uuids)
    scored = Scored(np.arange(n), np.zeros(n, dtype=bool), rng.random(n) * 1e-3, rng.random(n),
                    rng.integers(0, 6, n), rng.random(n) < 0.1, rng.random(n) < 0.02)  # fmt: skip
    return best_emit_us(processor, scored, repeat)


def run_codecs_bench() -> dict[str, Any]:
    """Every figure of `gpuwatch bench codecs`, from one run."""
    from gpuwatch.schemas.bench import bench_codecs

    figures = bench_codecs()
    figures["risk_emit_us_per_record"] = round(emit_us_per_record(), 3)
    return figures
