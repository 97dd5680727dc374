"""`gpuwatch bench stream`: the stream worker's figures, measured side by side in one run (CPU only).

1. worker_samples_per_s: a real `gpuwatch stream` process draining a pre-filled samples topic
   (decode, windows, features, batched inference, risk out), GPU-samples per second.
2. raw_loop_samples_per_s: the ceiling, the worker's own faust app and consumer on the same
   messages from the same broker doing nothing but orjson-decode (`gpuwatch stream --decode-only`);
   ratio_vs_raw = 1 / 2. For context, confluent_raw_loop_samples_per_s is a bare confluent-kafka
   consume + decode loop (a faster client than faust's aiokafka).
3. worker_replay_samples_per_s: the worker's batch step on the same messages in-process (no broker);
   worker_replay_with_challenger_samples_per_s: the same with a challenger model scoring the same windows in the
   shadow (`gpuwatch model shadow`), and challenger_step_cost, how many times longer the step takes with it.
4. batched_vs_per_sample_speedup: measured on the replay's own batches (3.): the worker's scoring path as
   it runs (`RiskProcessor.score_slots`: one batched pass, incremental LSTM state, risk records) versus,
   for every record it scored, one full-window forward pass of batch size 1 on the same sequence (a
   per-request /predict service); the two must give the same risks. batching_only_speedup is full-window
   batches versus one at a time (batching without the incremental state).
5. latency_p99_ms: sample ts to risk visible in Redis for a fleet at 1 Hz on the embedded stack, measured
   for `--seconds` once the worker has caught up with the live fleet (the run fails if it cannot). The hosts'
   agents start at moments spread over one window stride, as a real fleet's do; latency_synchronized_*
   measures the same with every agent started in the same second (the worst case: each GPU's ring advance,
   which re-encodes its past, and each rescoring then come for the whole fleet in the same batch).
6. state_bytes_per_gpu: window state per tracked GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
import time
from typing import Any

import numpy as np
import orjson
import torch

from gpuwatch.apps.bench.table import emit
from gpuwatch.config import Settings, load_settings
from gpuwatch.embedded import embedded_stack
from gpuwatch.kafka import ensure_topics, make_consumer, make_producer, produce
from gpuwatch.memory import spare_startup_heap_from_gc
from gpuwatch.processes import StatsFollower, start_stream_worker
from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.schemas.records import Risk
from gpuwatch.simulator.feed import SimulatedFeed
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, Inbound, RiskProcessor
from gpuwatch.streams.window import FEATURE_NAMES


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _messages(gpus: int, steps: int, seed: int = 5) -> list[tuple[str, bytes]]:
    sim = FleetSimulator(FleetConfig(hosts=max(1, gpus // 8), seed=seed, start_ts=time.time() - steps - 5))
    out: list[tuple[str, bytes]] = []
    for _ in range(steps):
        out += sim.step_json()
    return out


def _fill(settings: Settings, topic: str, msgs: list[tuple[str, bytes]]) -> None:
    producer = make_producer(settings, **{"linger.ms": 20, "batch.size": 512 * 1024})
    for host, value in msgs:
        produce(producer, topic, host.encode(), value)
    if producer.flush(120) != 0:
        raise RuntimeError("could not deliver the benchmark's messages to the broker")


def raw_loop(settings: Settings, topic: str, expected: int) -> float:
    """Messages/s of a plain confluent-kafka consume + orjson.loads loop over `topic`."""
    consumer = make_consumer(settings, f"bench-raw-{time.time_ns()}", **{"fetch.max.bytes": 50 << 20})
    consumer.subscribe([topic])
    n = 0
    first = last = 0.0
    deadline = time.monotonic() + 300
    while n < expected and time.monotonic() < deadline:
        for msg in consumer.consume(5000, 0.5):
            if msg.error() is None:
                orjson.loads(msg.value())
                n += 1
        if n and not first:
            first = time.perf_counter()
        last = time.perf_counter()
    consumer.close()
    if n < expected:
        raise RuntimeError(f"raw loop read {n} of {expected} messages")
    return n / max(last - first, 1e-9)


def worker_drain(settings: Settings, expected_samples: int, decode_only: bool = False) -> dict[str, Any]:
    """Start a worker on a pre-filled topic; GPU-samples/s between its first and last batch."""
    worker = start_stream_worker(settings, "bench-worker", ["--decode-only"] if decode_only else None)
    stats = StatsFollower(worker)
    try:
        s = stats.wait(lambda s: s.samples + s.rejected_samples >= expected_samples, 600,
                       f"the worker to process {expected_samples} GPU-samples")  # fmt: skip
        span = s.last_batch_at - s.first_batch_at
        return {"samples": s.samples, "seconds": span, "samples_per_s": s.samples / max(span, 1e-9),
                "batches": s.batches, "state_bytes_per_gpu": s.state_bytes_per_gpu}
    finally:
        worker.stop()


def replay(msgs: list[tuple[str, bytes]], batch: int, rescore_s: float, challenger: bool = False) -> dict[str, Any]:
    """The worker's batch step in-process on the same messages (decode to risk bytes); with `challenger`, a
    second model of the same size scores the same windows in the shadow, as `gpuwatch model shadow` makes it."""
    processor = RiskProcessor(Scorer(load_artifact(), device="cpu"), rescore_interval_s=rescore_s)
    if challenger:
        other = dataclasses.replace(load_artifact(), version="bench-challenger")
        processor.install(processor.model, processor.model_state(Scorer(other, device="cpu")))
    spare_startup_heap_from_gc()  # as the worker process does
    inbound = [Inbound(v, "bench", 0, i) for i, (_, v) in enumerate(msgs)]
    t0 = time.perf_counter()
    samples = scored = 0
    for i in range(0, len(inbound), batch):
        r = processor.process(inbound[i : i + batch])
        samples += r.samples
        scored += r.scored
    dt = time.perf_counter() - t0
    return {"samples_per_s": samples / dt, "scored_per_s": scored / dt,
            "state_bytes_per_gpu": processor.state_bytes_per_gpu()}


class _CountingScorer(Scorer):
    """A Scorer that counts the sequences whose past it encodes (the incremental path's cache misses)."""

    encoded = 0

    def encode_past(self, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.encoded += len(past)
        return super().encode_past(past)


class _PerRequestComparison(RiskProcessor):
    """The worker's processor, timing its scoring path and, on the very sequences it scored, a per-request one.

    Every `score_slots` call is the worker's own (batched, incremental LSTM state) and is timed as it runs.
    Afterwards, untimed, its windows give the sequences it scored; each is then scored again with one
    full-window forward pass of batch size 1 (timed: what a /predict service does per GPU-sample) and once
    more as one full-window batch (timed: batching without the incremental state).
    """

    def __init__(self, scorer: Scorer, **kwargs: Any) -> None:
        super().__init__(scorer, **kwargs)
        self.records = 0
        self.worker_s = 0.0  # score_slots as the worker runs it: model, cache bookkeeping, risk records
        self.worker_inference_s = 0.0  # of which the model: cache check, past encodings, one LSTM step
        self.per_request_s = 0.0
        self.full_batched_s = 0.0
        self.max_abs_diff = 0.0  # worker's risk vs per-request risk
        self.mode_mismatches = 0

    def score_slots(self, slots: np.ndarray, result: BatchResult) -> None:
        first, inference = len(result.risk), result.inference_s
        t0 = time.perf_counter()
        super().score_slots(slots, result)
        self.worker_s += time.perf_counter() - t0
        self.worker_inference_s += result.inference_s - inference
        worker = [decode_risk(v) for _, v in result.risk[first:]]
        seqs = self.store.sequences(slots)  # unchanged by scoring: the windows the worker just scored
        risk = np.empty(len(slots))
        mode = np.empty(len(slots), dtype=np.int64)
        t0 = time.perf_counter()
        for i in range(len(slots)):
            r, m = self.scorer.score(seqs[i : i + 1])
            risk[i], mode[i] = r[0], m[0]
        self.per_request_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        self.scorer.score(seqs)
        self.full_batched_s += time.perf_counter() - t0
        self.records += len(slots)
        self.max_abs_diff = max(self.max_abs_diff, float(np.abs(risk - [w.risk for w in worker]).max()))
        self.mode_mismatches += sum(FAILURE_MODES[m] != w.mode for m, w in zip(mode.tolist(), worker))


# float32 LSTM state stepped once per rescoring vs recomputed over the window: equal up to rounding.
RISK_TOLERANCE = 1e-4


def batched_speedup(msgs: list[tuple[str, bytes]], batch: int, rescore_s: float) -> dict[str, float]:
    """Measured on the worker's own path: the replay's messages, in worker-sized batches, through RiskProcessor.

    Records/s of the worker's scoring path (`score_slots`: one batched pass, LSTM state cached between ring
    advances) versus one full-window forward pass of batch size 1 per record it scored (a per-request
    /predict service), on the same sequences; `batching_only_speedup` is full-window batches versus one at
    a time (batching without the incremental state). The two paths must agree on every risk.
    `past_encoded_share` is the share of records whose past the worker had to encode afresh (the rest took
    one LSTM step): every scoring in a GPU's first `stride_s`, then about rescore_s / stride_s.
    """
    scorer = _CountingScorer(load_artifact(), device="cpu")
    processor = _PerRequestComparison(scorer, rescore_interval_s=rescore_s)
    scorer.score(np.zeros((64, processor.store.config.seq_len, len(FEATURE_NAMES)), np.float32))  # warm-up
    inbound = [Inbound(v, "bench", 0, i) for i, (_, v) in enumerate(msgs)]
    for i in range(0, len(inbound), batch):
        processor.process(inbound[i : i + batch])
    n = processor.records
    if not n:
        raise RuntimeError("the replay scored no GPU: nothing to compare")
    if processor.max_abs_diff > RISK_TOLERANCE:
        raise RuntimeError(f"per-request scoring disagrees with the worker's: max |risk diff| "
                           f"{processor.max_abs_diff:.2e} > {RISK_TOLERANCE:g}")  # fmt: skip
    return {
        "records": n,
        "past_encoded_share": scorer.encoded / n,
        "worker_path_records_per_s": n / processor.worker_s,
        "worker_inference_records_per_s": n / processor.worker_inference_s,
        "per_request_records_per_s": n / processor.per_request_s,
        "full_batched_records_per_s": n / processor.full_batched_s,
        "speedup": processor.per_request_s / processor.worker_s,
        "inference_speedup": processor.per_request_s / processor.worker_inference_s,
        "batching_only_speedup": processor.per_request_s / processor.full_batched_s,
        "max_abs_risk_diff": processor.max_abs_diff,
        "mode_mismatches": processor.mode_mismatches,
    }


def live_latency(settings: Settings, gpus: int, seconds: float, join_over_s: float = 0.0) -> dict[str, Any]:
    """Sample ts → risk visible in Redis, for `gpus` simulated GPUs at 1 Hz through the whole pipeline; with
    `join_over_s`, the hosts' agents start at moments spread over that many seconds (`SimulatedFeed`)."""
    from gpuwatch.sinks.risk_sink import run_risk_sink

    ensure_topics(settings)
    worker = start_stream_worker(settings, "bench-live-worker")
    stats = StatsFollower(worker)
    latencies: list[float] = []
    lock = threading.Lock()
    live_from = [float("inf")]

    def on_written(records: list[Risk], written_at: float) -> None:
        with lock:
            latencies.extend((written_at - r.ts) * 1000.0 for r in records if r.ts >= live_from[0])

    stop = threading.Event()
    sink = threading.Thread(target=run_risk_sink, args=(settings,), kwargs={"stop": stop, "on_written": on_written},
                            daemon=True)
    sink.start()
    sim = FleetSimulator(FleetConfig(hosts=max(1, gpus // 8), seed=9, start_ts=time.time() - 60))
    feed = SimulatedFeed(sim, make_producer(settings), settings.topic_samples, join_over_s=join_over_s)
    backlog: list[int] = []

    def processed() -> int:
        if not worker.alive():
            raise RuntimeError(f"the stream worker died:\n{worker.log_tail()}")
        return stats.latest.samples

    try:
        # A minute of history first, so every GPU has a window. Then live at 1 Hz, the simulator's clock on
        # wall time (it first publishes what accrued while the history drained), until the worker has caught
        # up (backlog within 3 s of data: its counts are reported every 2 s); only then are latencies measured,
        # for `seconds`, so they are the steady state the worker must sustain.
        feed.publish_until(time.time())
        feed.producer.flush(60)
        deadline = time.time() + 300.0
        while processed() < feed.produced:
            if time.time() > deadline:
                raise RuntimeError(f"the worker did not drain a minute of history of {gpus:,} GPUs in 300 s "
                                   f"({processed():,} of {feed.produced:,} GPU-samples)")  # fmt: skip
            time.sleep(0.2)
        while True:
            feed.run_live(2.0)
            if feed.produced - processed() <= 3 * gpus:
                break
            if time.time() > deadline:
                raise RuntimeError(f"the worker could not keep up with {gpus:,} GPUs at 1 Hz: backlog "
                                   f"{feed.produced - processed():,} GPU-samples after 300 s")  # fmt: skip
        live_from[0] = time.time()
        _say(f"live: {gpus:,} GPUs at 1 Hz for {seconds:.0f} s")
        feed.run_live(seconds, lambda: backlog.append(feed.produced - processed()))
        time.sleep(3)
    finally:
        stop.set()
        sink.join(10)
        worker.stop()
    with lock:
        lat = np.array(latencies)
    if not len(lat):
        raise RuntimeError("no live risk record reached Redis")
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "records": int(len(lat)),
            "backlog_gpu_samples_max": int(max(backlog) if backlog else 0)}


def run_stream_bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # the worker scores on one thread; compare like with like
    gpus = args.gpus or 4000
    steps = 120  # 2 min of fleet time: long enough for a steady rate, not a start-up transient
    live_gpus = 10_000
    live_s = args.seconds or 60.0
    msgs = _messages(gpus, steps)
    n_samples = len(msgs) * 8
    _say(f"{len(msgs):,} messages = {n_samples:,} GPU-samples ({gpus:,} GPUs x {steps} s)")
    base = load_settings(env={})
    with embedded_stack(base) as settings:
        s_raw = settings.replace(topic_samples=f"bench.samples.{time.time_ns()}", partitions=8)
        ensure_topics(s_raw, [s_raw.topic_samples])
        _fill(s_raw, s_raw.topic_samples, msgs)
        _say("client-level ceiling: confluent-kafka consume + decode loop")
        confluent_msgs_per_s = raw_loop(s_raw, s_raw.topic_samples, len(msgs))
        _say("raw loop: the worker's own faust app and consumer, decode only")
        s_noop = s_raw.replace(stream_app_id=f"bench-raw-{time.time_ns()}")
        raw = worker_drain(s_noop, n_samples, decode_only=True)
        _say("stream worker draining the same topic")
        s_worker = s_raw.replace(
            stream_app_id=f"bench-{time.time_ns()}", topic_risk=f"bench.risk.{time.time_ns()}",
            topic_deadletter=f"bench.dl.{time.time_ns()}",
        )
        ensure_topics(s_worker, [s_worker.topic_risk, s_worker.topic_deadletter])
        worker = worker_drain(s_worker, n_samples)
        _say("in-process replay")
        rep = replay(msgs, settings.stream_batch_size, settings.rescore_interval_s)
        _say("in-process replay with a challenger scoring in the shadow")
        rep_shadow = replay(msgs, settings.stream_batch_size, settings.rescore_interval_s, challenger=True)
        _say("batched versus per-sample inference")
        speed = batched_speedup(msgs, settings.stream_batch_size, settings.rescore_interval_s)
        # A real fleet's agents start at different moments; spread over one window stride, their GPUs' ring
        # advances (each re-encodes the past) and rescorings are spread evenly. Then the worst case: all at once.
        stride_s = load_artifact().window.stride_s

        def latency(join_over_s: float) -> dict[str, Any]:
            s_live = settings.replace(
                stream_app_id=f"bench-live-{time.time_ns()}", topic_samples=f"bench.live.{time.time_ns()}",
                topic_risk=f"bench.live.risk.{time.time_ns()}", partitions=8,
            )
            return live_latency(s_live, live_gpus, live_s, join_over_s)

        lat = latency(stride_s)
        _say("the same with every agent started in the same second")
        lat_sync = latency(0.0)
    raw_samples_per_s = raw["samples_per_s"]
    figures = {
        "worker_samples_per_s": worker["samples_per_s"],
        "raw_loop_samples_per_s": raw_samples_per_s,
        "ratio_vs_raw": worker["samples_per_s"] / raw_samples_per_s,
        "confluent_raw_loop_samples_per_s": confluent_msgs_per_s * 8,
        "worker_replay_samples_per_s": rep["samples_per_s"],
        "worker_replay_with_challenger_samples_per_s": rep_shadow["samples_per_s"],
        "challenger_step_cost": rep["samples_per_s"] / rep_shadow["samples_per_s"],
        "batched_vs_per_sample_speedup": speed["speedup"],
        "batched_vs_per_sample_inference_speedup": speed["inference_speedup"],
        "batching_only_speedup": speed["batching_only_speedup"],
        "worker_path_records_per_s": speed["worker_path_records_per_s"],
        "worker_inference_records_per_s": speed["worker_inference_records_per_s"],
        "full_batched_records_per_s": speed["full_batched_records_per_s"],
        "per_sample_records_per_s": speed["per_request_records_per_s"],
        "speedup_records_compared": speed["records"],
        "speedup_past_encoded_share": speed["past_encoded_share"],
        "speedup_max_abs_risk_diff": speed["max_abs_risk_diff"],
        "speedup_mode_mismatches": speed["mode_mismatches"],
        "latency_p50_ms": lat["p50_ms"],
        "latency_p99_ms": lat["p99_ms"],
        "latency_max_ms": lat["max_ms"],
        "latency_records": lat["records"],
        "latency_gpus": live_gpus,
        "latency_seconds": live_s,
        "backlog_gpu_samples_max": lat["backlog_gpu_samples_max"],
        "latency_hosts_join_over_s": stride_s,
        "latency_synchronized_p50_ms": lat_sync["p50_ms"],
        "latency_synchronized_p99_ms": lat_sync["p99_ms"],
        "latency_synchronized_max_ms": lat_sync["max_ms"],
        "backlog_synchronized_gpu_samples_max": lat_sync["backlog_gpu_samples_max"],
        "state_bytes_per_gpu": rep["state_bytes_per_gpu"],
        "bench_gpus": gpus,
        "bench_gpu_samples": n_samples,
        "broker": "embedded Tansu (memory)",
        "device": "cpu",
        "torch_threads": 1,
    }
    targets = {"worker_samples_per_s": ">= 50,000", "ratio_vs_raw": ">= 0.5", "batched_vs_per_sample_speedup": ">= 50",
               "latency_p99_ms": "<= 500", "state_bytes_per_gpu": "<= 4,096"}
    rows = [(k, v, f"target {targets[k]}" if k in targets else "") for k, v in figures.items()]
    emit("gpuwatch bench stream", rows, figures, args.json_path)
    return figures
