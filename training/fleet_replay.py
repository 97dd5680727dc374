"""Simulate a fleet and score it in memory, sharded over processes: no JSONL written or read back.

`simulate_and_score` is `gpuwatch simulate` followed by `gpuwatch score` without the files: the simulator's
public API (`step_json`, `drain_labels`, `pending_labels`) produces the very snapshot bytes
`simulate_to_dir` writes, and the stream's decode and `RiskProcessor` score them in the batches
`gpuwatch score` cuts (`training.score.replay_messages`). With one shard the risks are exactly those of
`simulate_to_dir` + `gpuwatch score` with the same seed. With several, each shard is a fleet of its own: it
simulates its share of the hosts with its own seed (`shard_seed`) and host names (`node-s1-0003`), so a
sharded run is statistically, not byte for byte, the fleet one big simulation would be (host frailty, job
phases and failures are drawn per shard; there are no cross-host effects in the simulator to lose).

Records come back as compact columns (about 29 bytes a record), plus per-GPU tables, and the failure labels.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.simulator.fleet import DAY_S, FleetConfig, FleetSimulator
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, RiskProcessor, Scored
from gpuwatch.training.score import available_cpus, replay_messages

ALARM, DRAIN, FAILED = 1, 2, 4  # bits of FleetRisk.flags
START_TS = 1_700_000_000.0  # simulate_to_dir's default start: the same fleet as `gpuwatch simulate`
TOPIC = "simulated"  # names the source in dead letters (a simulator's snapshots never make one)
_PROGRESS_EVERY_S = 0.5


class FleetProgress(NamedTuple):
    """Where a run stands: share of simulated steps done (all shards), GPU-samples scored, risk records."""

    fraction: float
    gpu_samples: int
    risk_records: int
    seconds: float


@dataclass
class FleetRisk:
    """A simulated fleet's risk records as columns (one row per record, in scoring order, shard after shard),
    per-GPU tables indexed by the `gpu` code, and the failure labels `simulate_to_dir` would write."""

    gpu: np.ndarray  # int32 per record: index into uuids, gpu_host, gpu_index
    ts: np.ndarray  # float64: sample ts the record scores
    risk: np.ndarray  # float64, as in the JSON record
    score: np.ndarray  # float64, the calibrated score (NaN for a failed GPU's record)
    flags: np.ndarray  # int8: ALARM | DRAIN | FAILED bits, the record's alarm, drain and failed
    mode: np.ndarray  # int8: index into FAILURE_MODES
    history_s: np.ndarray  # float64: telemetry behind the score (the record's extra field)
    uuids: list[str]  # per GPU code
    gpu_host: np.ndarray  # int32 per GPU code: index into hosts
    gpu_index: np.ndarray  # int32 per GPU code
    hosts: list[str]
    labels: list[dict]  # failures that happened (all shards), then precursors still running at the end
    model: str
    horizon_s: float
    gpu_samples: int
    seconds: float
    shards: int
    seeds: list[int] = field(default_factory=list)  # simulator seed of each shard

    @property
    def host(self) -> np.ndarray:
        """int32 per record: index into hosts."""
        return self.gpu_host[self.gpu]

    def modes(self) -> list[str]:
        """Mode names per record (for printing; `mode` is the compact form)."""
        return [FAILURE_MODES[m] for m in self.mode.tolist()]


def shard_seed(seed: int, shard: int, shards: int) -> int:
    """The simulator seed of shard `shard` of `shards`: `seed` itself for one shard, else one drawn from
    (seed, shard), so shards are independent fleets."""
    if shards == 1:
        return seed
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


@dataclass(frozen=True)
class _Shard:
    index: int
    shards: int
    hosts: int
    gpus_per_host: int
    steps: int
    seed: int
    interval_s: float
    overrides: dict
    model: str
    device: str
    rescore_interval_s: float


class _ColumnProcessor(RiskProcessor):
    """RiskProcessor that keeps each scoring as columns instead of rendering JSON records (a failed GPU's row
    has risk 1, score NaN, mode none and its failed flag set, as its record would)."""

    def __init__(self, scorer: Scorer, **kwargs: Any) -> None:
        super().__init__(scorer, **kwargs)
        self.slots: list[np.ndarray] = []
        self.risks: list[np.ndarray] = []
        self.scores: list[np.ndarray] = []
        self.modes: list[np.ndarray] = []
        self.flags: list[np.ndarray] = []
        self.ts: list[np.ndarray] = []
        self.history: list[np.ndarray] = []
        self.records = 0

    def emit(self, scored: Scored, scored_at: float, result: BatchResult) -> None:
        store = self.store
        slots, failed = scored.slots, scored.failed
        n = len(slots)
        live = ~failed
        risk, score = np.ones(n), np.full(n, np.nan)
        mode, flags = np.zeros(n, dtype=np.int8), np.where(failed, FAILED, 0).astype(np.int8)
        risk[live], score[live], mode[live] = scored.risk, scored.score, scored.mode
        flags[live] |= np.where(scored.alarm, ALARM, 0).astype(np.int8) | np.where(scored.drain, DRAIN, 0).astype(np.int8)
        ts = store.last_ts[slots]
        self.slots.append(slots.astype(np.int32))
        self.risks.append(risk)
        self.scores.append(score)
        self.modes.append(mode)
        self.flags.append(flags)
        self.ts.append(ts)
        self.history.append(ts - store.first_ts[slots])
        self.records += n


def _messages(sim: FleetSimulator, steps: int, done: list[int]) -> Iterator[tuple[int, bytes]]:
    """(offset, snapshot bytes) of `steps` steps: offsets are the line numbers simulate_to_dir's file gives."""
    offset = 0
    for _ in range(steps):
        for _, raw in sim.step_json():
            yield offset, raw
            offset += 1
        done[0] += 1


def _run_shard(shard: _Shard, report: Callable[[int, int, int], None]) -> dict[str, Any]:
    """Simulate and score one shard; `report(steps, gpu_samples, records)` about every half second."""
    overrides = dict(shard.overrides)
    overrides.setdefault("start_ts", START_TS)
    if shard.shards > 1:
        overrides["host_prefix"] = f"{overrides.get('host_prefix', 'node')}-s{shard.index}"
    cfg = FleetConfig(hosts=shard.hosts, gpus_per_host=shard.gpus_per_host, seed=shard.seed,
                      interval_s=shard.interval_s, **overrides)  # fmt: skip
    sim = FleetSimulator(cfg)
    processor = _ColumnProcessor(Scorer(load_artifact(shard.model or None), device=shard.device),
                                 rescore_interval_s=shard.rescore_interval_s, stage="fleet-replay")  # fmt: skip
    done = [0]
    samples = 0
    last = time.monotonic()
    for result in replay_messages(_messages(sim, shard.steps, done), TOPIC, processor):
        samples += result.samples
        if result.deadletters:  # the simulator writes valid snapshots only: this is a bug, not bad input
            raise RuntimeError(f"the simulator's snapshot was dead-lettered: {result.deadletters[0][:300]!r}")
        if time.monotonic() - last >= _PROGRESS_EVERY_S:
            last = time.monotonic()
            report(done[0], samples, processor.records)
    report(done[0], samples, processor.records)
    store = processor.store
    n = len(store.uuids)

    def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype=dtype)

    return {
        "gpu": cat(processor.slots, np.int32), "ts": cat(processor.ts, np.float64),
        "risk": cat(processor.risks, np.float64), "score": cat(processor.scores, np.float64),
        "flags": cat(processor.flags, np.int8), "mode": cat(processor.modes, np.int8),
        "history_s": cat(processor.history, np.float64), "uuids": list(store.uuids), "hosts": list(store.hosts),
        "gpu_index": store.gpu_index[:n].astype(np.int32), "labels": sim.drain_labels(),
        "pending": sim.pending_labels(), "gpu_samples": samples, "model": processor.model_version,
        "horizon_s": processor.horizon_s,
    }  # fmt: skip


def _shard_process(shard: _Shard, results: Any) -> None:
    """A shard in its own process: progress and the result (or one error line) go to `results`."""
    try:
        import torch

        torch.set_num_threads(1)  # one process per core
        out = _run_shard(shard, lambda steps, n, r: results.put(("progress", shard.index, (steps, n, r))))
        results.put(("done", shard.index, out))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the run
        results.put(("error", shard.index, f"{type(exc).__name__}: {exc}"))


def simulate_and_score(
    hosts: int, gpus_per_host: int, days: float, *, seed: int = 0, interval_s: float = 1.0,
    config_overrides: dict | None = None, shards: int = 0, model: str | Path = "", device: str = "cpu",
    rescore_interval_s: float = 5.0, progress: Callable[[FleetProgress], None] | None = None,
) -> FleetRisk:  # fmt: skip
    """Simulate `hosts` x `gpus_per_host` GPUs for `days` (as `simulate_to_dir` with the same arguments) and
    score them with the stream's code, in memory, split by host over `shards` processes (0: one per CPU;
    1: in this process). `config_overrides` are FleetConfig fields (rate_scale, repair_time_scale, ...).
    `progress` gets a FleetProgress about twice a second. Raises RuntimeError when a shard fails.

    Shards run in fresh (spawned) processes, so a script calling this with several shards must guard its
    entry point with `if __name__ == "__main__":`.
    """
    if hosts < 1 or gpus_per_host < 1:
        raise ValueError(f"need at least one host and one GPU per host, got {hosts} x {gpus_per_host}")
    shards = max(1, min(shards or available_cpus(), hosts))
    steps = max(int(round(days * DAY_S / interval_s)), 0)
    specs = [
        _Shard(k, shards, hosts // shards + (k < hosts % shards), gpus_per_host, steps, shard_seed(seed, k, shards),
               interval_s, dict(config_overrides or {}), str(model or ""), device, rescore_interval_s)
        for k in range(shards)
    ]  # fmt: skip
    t0 = time.perf_counter()
    state = {k: (0, 0, 0) for k in range(shards)}

    def report(k: int, steps_done: int, n: int, records: int) -> None:
        state[k] = (steps_done, n, records)
        if progress is not None:
            done = sum(s[0] for s in state.values())
            progress(FleetProgress(done / max(steps * shards, 1), sum(s[1] for s in state.values()),
                                   sum(s[2] for s in state.values()), time.perf_counter() - t0))  # fmt: skip

    if shards == 1:
        outs = [_run_shard(specs[0], lambda s, n, r: report(0, s, n, r))]
    else:
        outs = _run_processes(specs, report)
    return _assemble(outs, specs, time.perf_counter() - t0)


def _run_processes(specs: list[_Shard], report: Callable[[int, int, int, int], None]) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited
    results = ctx.Queue()
    procs = [ctx.Process(target=_shard_process, args=(s, results), name=f"gpuwatch-fleet-{s.index}", daemon=True)
             for s in specs]  # fmt: skip
    for p in procs:
        p.start()
    outs: dict[int, dict[str, Any]] = {}
    try:
        while len(outs) < len(specs):
            try:
                kind, k, payload = results.get(timeout=1.0)
            except queue.Empty:
                for k, p in enumerate(procs):
                    if k not in outs and not p.is_alive():
                        raise RuntimeError(
                            f"fleet shard {k} exited with code {p.exitcode} (a script that starts shards must "
                            "guard its entry point with `if __name__ == '__main__':`, as multiprocessing requires)"
                        ) from None
                continue
            if kind == "error":
                raise RuntimeError(f"fleet shard {k} failed: {payload}")
            if kind == "progress":
                report(k, *payload)
            else:
                outs[k] = payload
    finally:
        for p in procs:
            p.join(timeout=5 if len(outs) == len(specs) else 0)
            if p.is_alive():
                p.terminate()
                p.join()
    return [outs[k] for k in range(len(specs))]


def _assemble(outs: list[dict[str, Any]], specs: list[_Shard], seconds: float) -> FleetRisk:
    """One FleetRisk from the shards' columns: GPU and host codes offset past the shards before."""
    hosts: list[str] = []
    host_code: dict[str, int] = {}
    gpu_host = []
    gpu_offset = 0
    gpus = []
    for out in outs:
        gpus.append(out["gpu"] + gpu_offset)
        gpu_offset += len(out["uuids"])
        gpu_host.append(
            np.array([host_code.setdefault(h, len(host_code)) for h in out["hosts"]], dtype=np.int32)
        )
    hosts = list(host_code)

    def cat(key: str, dtype: type) -> np.ndarray:
        return np.concatenate([o[key] for o in outs]).astype(dtype, copy=False)

    return FleetRisk(
        gpu=np.concatenate(gpus).astype(np.int32), ts=cat("ts", np.float64), risk=cat("risk", np.float64),
        score=cat("score", np.float64), flags=cat("flags", np.int8),
        mode=cat("mode", np.int8), history_s=cat("history_s", np.float64),
        uuids=[u for o in outs for u in o["uuids"]], gpu_host=np.concatenate(gpu_host).astype(np.int32),
        gpu_index=cat("gpu_index", np.int32), hosts=hosts,
        labels=[lab for o in outs for lab in o["labels"]] + [lab for o in outs for lab in o["pending"]],
        model=outs[0]["model"], horizon_s=outs[0]["horizon_s"], gpu_samples=sum(o["gpu_samples"] for o in outs),
        seconds=seconds, shards=len(specs), seeds=[s.seed for s in specs],
    )  # fmt: skip
