"""The faust-streaming worker: `gpuwatch.samples` in, `gpuwatch.risk` (and dead letters) out.

One agent with concurrency=1 (faust loses in-flight messages on restart with more) takes
batches of raw messages and hands them to `RiskProcessor`. Risk and dead letters go out
through gpuwatch's `ReliableProducer`, and the batch is acknowledged to faust only once Kafka
has all of it: the rule of `gpuwatch.kafka.BatchLoop`, which the other stages run on, kept with
faust's consumer. A worker stopped while a batch's output is not acknowledged commits no offset
at all (`WorkerApp.forbid_commits`), so an offset is never committed for a message whose output
is not durable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import faust
import orjson
import torch

from gpuwatch import metrics
from gpuwatch.config import Settings
from gpuwatch.kafka import (
    ReliableProducer,
    TopicIdentity,
    ensure_compacted_topic,
    ensure_topics,
    faust_credentials,
    flush_until_acknowledged,
    partition_count,
    produce,
    read_partitions_to_end,
)
from gpuwatch.memory import (
    TRIM_INTERVAL_S,
    release_free_heap,
    return_big_buffers_to_the_os,
    spare_startup_heap_from_gc,
)
from gpuwatch.schemas.codecs import encode_stats_line
from gpuwatch.schemas.records import StreamStats
from gpuwatch.streams.faust_runtime import WorkerApp, cap_fetch_wait
from gpuwatch.streams.lifecycle import ModelSwitcher, open_control_log
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, Inbound, RiskProcessor, chosen_for_other_settings

log = logging.getLogger(__name__)

BatchHook = Callable[[BatchResult], None]
LAG_INTERVAL_S = 10.0
# EX_TEMPFAIL: the broker lost the samples topic (recreated); restart this worker (docs/reliability.md).
RESTART_EXIT_CODE = 75


def create_app(
    settings: Settings,
    *,
    on_batch: BatchHook | None = None,
    scorer: Scorer | None = None,
    decode_only: bool = False,
) -> faust.App:
    """Build the faust app for `settings`; `on_batch` sees every processed batch (demo, benchmarks).

    `decode_only` turns the agent into the benchmark's ceiling: the same app and consumer, but each
    batch is only orjson-decoded and counted (no windows, no model, nothing produced).

    The samples topic's id is read when the app is built. If the topic is recreated (a broker without
    storage restarted), the worker hands its windows to the new changelog and exits with RESTART_EXIT_CODE
    before it processes anything from the new topic: its offsets, and faust's bookkeeping of them, belong to
    the old one.
    """
    cap_fetch_wait(settings.stream_fetch_max_wait_ms)
    app = WorkerApp(
        settings.stream_app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        broker_credentials=faust_credentials(settings),  # SASL / TLS, the same settings as every other client
        store="memory://",
        value_serializer="raw",
        key_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        # Short sessions: a restarted worker rejoins its group in seconds rather than half a minute.
        broker_session_timeout=6.0,
        broker_heartbeat_interval=0.5,
        broker_commit_interval=1.0,
        producer_acks=-1,
        # Big fetches and buffers: snapshots are ~6 KB and the worker is fastest on large batches.
        consumer_max_fetch_size=16 * 1024 * 1024,
        broker_max_poll_records=settings.stream_batch_size,
        stream_buffer_maxsize=4 * settings.stream_batch_size,
    )
    samples = app.topic(settings.topic_samples, value_serializer="raw", key_serializer="raw")
    scorer = scorer or Scorer(load_artifact(settings.model_path or None), device=settings.device)
    processor = RiskProcessor.from_settings(scorer, settings, max_age_s=settings.stream_max_sample_age_s)
    mismatch = chosen_for_other_settings(scorer.artifact, settings)
    if mismatch:
        log.warning("%s", mismatch)
    # The model lifecycle (docs/lifecycle.md): the last state on the control topic is what this worker runs.
    switcher = ModelSwitcher(settings, processor)
    control = open_control_log(settings) if not decode_only else None
    startup_deadletters: list[bytes] = []
    if control is not None:
        prepared, startup_deadletters = switcher.follow(control.read_to_end())
        if prepared is not None:
            switcher.install(prepared)
    # Keeps and resends what Kafka did not acknowledge (e.g. a restarted broker that forgot our producer id).
    producer = ReliableProducer(settings, **{"linger.ms": 2})
    for value in startup_deadletters:
        produce(producer, settings.topic_deadletter, None, value)
    closing = app.stopping
    app.gpuwatch_processor = processor  # type: ignore[attr-defined]
    metrics.register_gpu_telemetry(processor.telemetry)
    totals = StreamTotals()
    windows_topic = windows_changelog_topic(settings)
    owned: set[int] = set()
    # Cleared while a rebalance restores windows, so no batch is folded into a half-restored store.
    ready = asyncio.Event()

    # `processor.checkpoint` runs on the event loop, between batches, so that each record is one GPU's state
    # at one moment (windows, both models' runs and their versions); only producing it runs off the loop.
    def write_checkpoint(records: list[tuple[int, bytes, bytes]]) -> int:
        for part, key, value in records:
            produce(producer, windows_topic, key, value, partition=part)
        producer.flush(30.0)
        return len(records)

    identity = TopicIdentity(settings, settings.topic_samples)
    expected_id = identity.current()  # before faust reads anything (None: adopt the first one seen)

    def samples_topic_recreated() -> str | None:
        """The samples topic's new id if it was recreated since this worker started, else None."""
        nonlocal expected_id
        now_id = identity.current()
        if now_id is None or expected_id is None:
            expected_id = expected_id or now_id
            return None
        return now_id if now_id != expected_id else None

    def hand_over_and_exit(new_id: str, records: list[tuple[int, bytes, bytes]]) -> None:
        log.error("the samples topic %s was recreated (id %s, now %s): the broker lost its state. Handing the "
                  "windows of %d GPUs to the new changelog and exiting with code %d to restart clean from the "
                  "new topic's start", settings.topic_samples, expected_id, new_id, len(processor.store),
                  RESTART_EXIT_CODE)  # fmt: skip
        ensure_compacted_topic(settings, windows_topic, partition_count(settings, settings.topic_samples))
        totals.checkpointed += write_checkpoint(records)
        flush_until_acknowledged(producer, closing, "the handover")  # in Kafka before we go
        totals.report(processor)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(RESTART_EXIT_CODE)  # no faust shutdown: nothing more may be committed with the old offsets

    async def guard_incarnation() -> None:
        new_id = await asyncio.get_running_loop().run_in_executor(None, samples_topic_recreated)
        if new_id is not None:
            ready.clear()
            app.forbid_commits()
            records = processor.checkpoint(everything=True)
            await asyncio.get_running_loop().run_in_executor(None, hand_over_and_exit, new_id, records)

    @app.on_partitions_revoked.connect  # type: ignore[misc]
    async def _revoked(app_: faust.App, revoked: set, **kwargs: object) -> None:
        ready.clear()
        # Hand over fresh windows: whoever gets these partitions restores from this checkpoint.
        await asyncio.get_running_loop().run_in_executor(None, write_checkpoint, processor.checkpoint())

    @app.on_partitions_assigned.connect  # type: ignore[misc]
    async def _assigned(app_: faust.App, assigned: set, **kwargs: object) -> None:
        parts = {tp.partition for tp in assigned if tp.topic == settings.topic_samples}
        processor.store.forget(lambda p: p in parts)
        new = sorted(parts - owned)
        restored = 0
        if new:
            records = await asyncio.get_running_loop().run_in_executor(
                None, read_partitions_to_end, settings, windows_topic, new
            )
            restored = processor.restore(records)
        owned.clear()
        owned.update(parts)
        totals.restored_gpus += restored
        totals.partitions = len(parts)
        log.info("assigned partitions %s of %s; restored windows of %d GPUs", sorted(parts), settings.topic_samples,
                 restored)
        ready.set()

    @app.agent(samples, concurrency=1)
    async def score(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.stream_batch_size, within=settings.stream_batch_within_s):
            await ready.wait()
            if decode_only:
                totals.add(_decode_only(events))
                continue
            # Before anything of this batch is processed: it must come from the topic our offsets refer to.
            await guard_incarnation()
            t0 = time.perf_counter()
            batch = [
                Inbound(e.message.value, e.message.topic, e.message.partition, e.message.offset) for e in events
            ]
            result = processor.process(batch, now=time.time())
            for key, value in result.risk:
                produce(producer, settings.topic_risk, key, value)
            for key, value in result.shadow:
                produce(producer, settings.topic_risk_shadow, key, value)
            for value in result.deadletters:
                produce(producer, settings.topic_deadletter, None, value)
            producer.poll(0)
            # Durable before faust acknowledges the batch: nothing is lost if we crash right after.
            if not await asyncio.get_running_loop().run_in_executor(
                None, flush_until_acknowledged, producer, closing, "batch output"
            ):
                # Stopping with the output not in Kafka; faust will ack the batch's events anyway.
                log.warning("stopping with a batch's output not acknowledged by Kafka: committing no offsets, "
                            "the next worker reads the batch again")  # fmt: skip
                app.forbid_commits()
                return
            totals.add(result, batch)
            export_batch_metrics(result, len(batch), time.perf_counter() - t0)
            if on_batch is not None:
                on_batch(result)

    @app.timer(interval=5.0)
    async def _incarnation() -> None:
        if ready.is_set():  # also when no batch arrives (faust may be dropping the new topic's first messages)
            await guard_incarnation()

    @app.timer(interval=settings.stream_stats_interval_s)
    async def _report() -> None:
        totals.report(processor)

    slow_warned = False  # whether the slow-sampling warning is out (logged again after all GPUs are fast again)

    @app.timer(interval=2.0)
    async def _refresh_silent() -> None:
        # Every GPU's risk is refreshed at least every 10 s, also when its samples stop coming.
        nonlocal slow_warned
        if not ready.is_set():
            return
        slow_warned = export_slow_sampling(processor, slow_warned)
        result = processor.refresh_silent(time.time(), settings.risk_refresh_s)
        if result.risk:
            for key, value in result.risk:
                produce(producer, settings.topic_risk, key, value)
            for key, value in result.shadow:
                produce(producer, settings.topic_risk_shadow, key, value)
            await asyncio.get_running_loop().run_in_executor(None, producer.flush, 30.0)
            totals.refreshed += len(result.risk)

    @app.timer(interval=settings.model_control_poll_s)
    async def _follow_models() -> None:
        if control is None:
            return
        loop = asyncio.get_running_loop()
        entries = await loop.run_in_executor(None, control.poll, 0.0)
        if not entries:
            return
        # Loading artifacts is slow: off the loop. The swap itself runs on the loop, so never inside a batch.
        prepared, dead = await loop.run_in_executor(None, switcher.follow, entries)
        for value in dead:
            produce(producer, settings.topic_deadletter, None, value)
        producer.poll(0)
        if prepared is not None:
            switcher.install(prepared)

    @app.timer(interval=settings.checkpoint_interval_s)
    async def _checkpoint() -> None:
        if ready.is_set():
            loop, records = asyncio.get_running_loop(), processor.checkpoint()
            totals.checkpointed += await loop.run_in_executor(None, write_checkpoint, records)

    @app.timer(interval=TRIM_INTERVAL_S)
    async def _trim_heap() -> None:
        release_free_heap()  # what each batch freed leaves holes in the heap; their pages go back to the OS

    lag_exported: set[tuple[str, str]] = set()

    @app.timer(interval=LAG_INTERVAL_S)
    async def _lag() -> None:
        nonlocal lag_exported
        lag_exported = export_lag(app, settings, lag_exported)

    @app.on_before_shutdown.connect  # type: ignore[misc]
    async def _flush(app_: faust.App, **kwargs: object) -> None:
        closing.set()
        producer.flush(10.0)
        totals.report(processor)

    return app


def _decode_only(events: list) -> BatchResult:
    result = BatchResult()
    for e in events:
        result.samples += len(orjson.loads(e.message.value)["gpus"])
    return result


class StreamTotals:
    """Running counts, printed as one `STATS {json}` line on stdout (progress for operators and the demo)."""

    def __init__(self) -> None:
        self.samples = self.rejected = self.scored = self.deadletters = self.batches = 0
        self.restored_gpus = self.checkpointed = 0
        self.first_batch_at = self.last_batch_at = 0.0
        self.partitions = 0  # samples partitions owned now
        self.offsets: dict[int, int] = {}  # per samples partition: offset after the last message counted here
        self.refreshed = 0  # risk records re-published for silent GPUs
        self.started = time.time()

    def add(self, result: BatchResult, batch: Sequence[Inbound] = ()) -> None:
        for msg in batch:  # in offset order per partition, so the last one wins
            self.offsets[msg.partition] = msg.offset + 1
        now = time.time()
        self.first_batch_at = self.first_batch_at or now
        self.last_batch_at = now
        self.samples += result.samples
        self.rejected += result.rejected_samples
        self.scored += result.scored
        self.deadletters += len(result.deadletters)
        self.batches += 1

    def stats(self, processor: RiskProcessor) -> StreamStats:
        """The counts as a `gpuwatch.stats/1` record."""
        return StreamStats(
            samples=self.samples,
            rejected_samples=self.rejected,
            scored=self.scored,
            deadletters=self.deadletters,
            batches=self.batches,
            partitions=self.partitions,
            offsets={str(p): o for p, o in sorted(self.offsets.items())},
            refreshed=self.refreshed,
            restored_gpus=self.restored_gpus,
            checkpointed=self.checkpointed,
            uptime_s=round(time.time() - self.started, 1),
            first_batch_at=self.first_batch_at,
            last_batch_at=self.last_batch_at,
            **processor.stats(),
        )

    def report(self, processor: RiskProcessor) -> None:
        print(encode_stats_line(self.stats(processor)), flush=True)


def export_batch_metrics(result: BatchResult, messages: int, seconds: float) -> None:
    """Update the stream worker's Prometheus metrics once per batch."""
    metrics.BATCH_SIZE.labels("stream").observe(messages)
    metrics.BATCH_DURATION.labels("stream").observe(seconds)
    metrics.STREAM_SAMPLES.inc(result.samples)
    metrics.STREAM_SAMPLES_REJECTED.inc(result.rejected_samples)
    metrics.STREAM_SCORED.inc(result.scored)
    if result.deadletters:
        metrics.DEADLETTERS.labels("stream").inc(len(result.deadletters))
    if result.scored:
        metrics.INFERENCE_LATENCY.observe(result.inference_s)
    if result.newest_sample_ts:
        metrics.STREAM_NEWEST_SAMPLE_TS.set(result.newest_sample_ts)


def export_slow_sampling(processor: RiskProcessor, warned: bool) -> bool:
    """Sets the gauge of GPUs sampled more slowly than the model was validated at, and logs a warning when some
    first are (again); returns whether some are."""
    slow, example, interval = processor.sampled_slower_than_validated()
    metrics.STREAM_SLOW_GPUS.set(slow)
    if slow and not warned:
        note = processor.scorer.artifact.slow_sampling_note(f"GPU {example}", interval)
        log.warning("%d GPU%s sampled more slowly than validated; %s", slow, "s" if slow > 1 else "", note)
    return slow > 0


def export_lag(app: faust.App, settings: Settings, previous: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Set the consumer lag of this worker's samples partitions from faust's own offset bookkeeping
    (end offsets seen in fetches, offsets it committed); returns the (topic, partition)s exported."""
    monitor = app.monitor
    lags: dict[tuple[str, str], int] = {}
    for tp in app.consumer.assignment():
        end, committed = monitor.tp_end_offsets.get(tp), monitor.tp_committed_offsets.get(tp)
        if tp.topic == settings.topic_samples and end is not None and committed is not None:
            lags[(tp.topic, str(tp.partition))] = max(0, end - committed)
    metrics.set_consumer_lag(settings.stream_app_id, lags, previous)
    return set(lags)


def windows_changelog_topic(settings: Settings) -> str:
    """The compacted topic holding each GPU's window checkpoint, partitioned like the samples topic."""
    return f"{settings.stream_app_id}-windows"


def faust_logging_config() -> dict[str, Any] | None:
    """faust's logging set-up, or None for faust's own: colours only when stderr (where its logs go) is a
    terminal; faust's own set-up decides by stdout, so `gpuwatch stream 2>file` in a terminal logged escapes."""
    if sys.stderr.isatty():
        return None
    plain = {"class": "logging.StreamHandler", "formatter": "default"}  # stderr, faust's format without colours
    return {"merge": True, "handlers": {"default": plain}}


def run_worker(settings: Settings, *, loglevel: str = "warning", decode_only: bool = False) -> None:
    """Run one stream worker until SIGTERM/SIGINT (the `gpuwatch stream` command)."""
    torch.set_num_threads(settings.torch_threads)
    return_big_buffers_to_the_os()
    ensure_topics(
        settings, [settings.topic_samples, settings.topic_risk, settings.topic_risk_shadow, settings.topic_deadletter]
    )
    ensure_compacted_topic(
        settings, windows_changelog_topic(settings), partition_count(settings, settings.topic_samples)
    )
    app = create_app(settings, decode_only=decode_only)
    spare_startup_heap_from_gc()
    metrics.zero_counters("stream")
    metrics.start_metrics_server(settings.stream_metrics_port, settings.metrics_host, "stream")
    # Our STATS lines go to real stdout; faust would otherwise route prints into its logger.
    worker = faust.Worker(
        app, loglevel=loglevel, quiet=True, redirect_stdouts=False, logging_config=faust_logging_config()
    )
    if not sys.stdout.isatty():
        worker.spinner = None  # its cursor codes (ESC[?25l ...) would land in the log in front of STATS lines
    worker.execute_from_commandline()
