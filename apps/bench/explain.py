"""`gpuwatch bench explain`: does the stated reason match the injected precursor, and what does it cost?

1. hit_rate_*: simulated failures of every mode (training.explain_eval.run: failures injected through the
   simulator's API, the stream's own window, the explanation ranked at half-way through each precursor and at
   its last sample before the failure): the share whose mode's precursor signal ranks first or second, overall
   and per mode, on the default fleet and on the realistic one (hardware mix, benign look-alikes on).
2. explain_us_per_gpu_batch_K: `streams.explain.explain` (ranking + texts) per GPU, K GPUs in alarm in one
   batch, on the windows of 2,048 GPUs (a batch with any GPU in alarm pays a fixed ~0.2 ms, then a few µs each).
3. emit_us_per_record_alarm_S: `RiskProcessor.emit` (the worker's per-record step, 2,048 GPUs) with a share S of
   them in alarm (0: what every record pays; compare `gpuwatch bench codecs` risk_emit_us_per_record of a
   version without explanations). 2 and 3 are CPU time, best of 15.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

from gpuwatch.apps.bench.codecs import best_emit_us, filled_processor
from gpuwatch.apps.bench.table import emit
from gpuwatch.training import explain_eval


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _emit_costs(gpus: int = 2048, repeat: int = 15, seed: int = 0) -> dict[str, float]:
    """Best of `repeat` timings of `RiskProcessor.emit` (µs per record) at alarm shares 0, 0.1 %, 1 % and 10 %, and
    of `explain` per GPU explained. CPU time of this process (`time.process_time`): on a shared machine wall time
    moves with other people's load, CPU time much less."""
    from gpuwatch.streams.explain import explain
    from gpuwatch.streams.processor import Scored

    processor = filled_processor(gpus, 60, seed)
    rng = np.random.default_rng(seed)
    n = len(processor.store.uuids)
    out: dict[str, float] = {}
    for share in (0.0, 0.001, 0.01, 0.1):
        alarm = rng.random(n) < share
        scored = Scored(np.arange(n), np.zeros(n, dtype=bool), rng.random(n) * 1e-3, rng.random(n),
                        rng.integers(0, 6, n), alarm, alarm & (rng.random(n) < 0.2))  # fmt: skip
        cost = best_emit_us(processor, scored, repeat, time.process_time)
        out[f"emit_us_per_record_alarm_{share:g}"] = round(cost, 3)
    for k in (1, 20, 200):
        slots = np.sort(rng.choice(n, size=k, replace=False))
        best = float("inf")
        for _ in range(repeat + 1):
            start = time.process_time()
            explain(processor.store, slots)
            best = min(best, time.process_time() - start)
        out[f"explain_us_per_gpu_batch_{k}"] = round(best / k * 1e6, 2)
    return out


def run_explain_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure of `gpuwatch bench explain`; prints the table, writes JSON to `args.json_path`."""
    hosts = max(5, (args.gpus or 320) // 8)
    figures: dict[str, Any] = {"hosts": hosts, "failing_per_host": 2}
    rows: list[tuple[str, Any, str]] = []
    for name, realistic in (("default", False), ("realistic", True)):
        _say(f"simulating {hosts} hosts x 8 GPUs, 2 failing per host ({name} fleet) ...")
        t0 = time.perf_counter()
        ev = explain_eval.run(hosts=hosts, per_host=2, seed=0, realistic=realistic)
        d = ev.to_dict()
        d["wall_s"] = round(time.perf_counter() - t0, 1)
        figures[name] = d
        for fr in ev.fractions:
            rows.append((f"{name}_hit_rate_at_{fr:g}", round(ev.hit_rate(fr), 3),
                         f"{ev.count()} precursor failures; rank <= 2 (at {fr:g} of the precursor)"))  # fmt: skip
            for m in explain_eval.PRECURSOR_MODES:
                rows.append((f"  {m}", round(ev.hit_rate(fr, m), 3),
                             f"{ev.count(m)} failures; ranks first {ev.hit_rate(fr, m, within=1):.2f}"))  # fmt: skip
        rows.append((f"{name}_severities_us_per_gpu", round(d["explain_us_per_gpu"], 1), "calls of 1-2 GPUs: mostly fixed cost"))
    _say("timing the worker's emit step with and without GPUs in alarm ...")
    costs = _emit_costs()
    figures.update(costs)
    rows += [(k, v, "") for k, v in costs.items()]
    emit("gpuwatch bench explain (one core)", rows, figures, args.json_path)
    return figures
