"""The faust-streaming worker: `gpuwatch.samples` in, `gpuwatch.risk` (and dead letters) out.

One agent with concurrency=1 (faust loses in-flight messages on restart with more) takes
batches of raw messages and hands them to `RiskProcessor`. Risk and dead letters go out
through an idempotent confluent-kafka producer that is flushed before the batch is
acknowledged, so an offset is never committed for a message whose output is not durable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import faust
import orjson

from gpuwatch.config import Settings
from gpuwatch.kafka import make_producer, produce
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, Inbound, RiskProcessor

log = logging.getLogger(__name__)

BatchHook = Callable[[BatchResult], None]


def create_app(settings: Settings, *, on_batch: BatchHook | None = None, scorer: Scorer | None = None) -> faust.App:
    """Build the faust app for `settings`; `on_batch` sees every processed batch (demo, benchmarks)."""
    app = faust.App(
        settings.stream_app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
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
    )
    samples = app.topic(settings.topic_samples, value_serializer="raw", key_serializer="raw")
    scorer = scorer or Scorer(load_artifact(settings.model_path or None), device=settings.device)
    processor = RiskProcessor(scorer, rescore_interval_s=settings.rescore_interval_s)
    producer = make_producer(settings, **{"linger.ms": 2})
    app.gpuwatch_processor = processor  # type: ignore[attr-defined]
    totals = StreamTotals()

    @app.agent(samples, concurrency=1)
    async def score(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.stream_batch_size, within=settings.stream_batch_within_s):
            batch = [
                Inbound(e.message.value, e.message.topic, e.message.partition, e.message.offset) for e in events
            ]
            result = processor.process(batch, now=time.time())
            for key, value in result.risk:
                produce(producer, settings.topic_risk, key, value)
            for value in result.deadletters:
                produce(producer, settings.topic_deadletter, None, value)
            producer.poll(0)
            # Durable before faust acknowledges the batch: nothing is lost if we crash right after.
            await asyncio.get_running_loop().run_in_executor(None, producer.flush, 30.0)
            totals.add(result)
            if on_batch is not None:
                on_batch(result)

    @app.timer(interval=2.0)
    async def _report() -> None:
        totals.report(processor)

    @app.on_before_shutdown.connect  # type: ignore[misc]
    async def _flush(app_: faust.App, **kwargs: object) -> None:
        producer.flush(10.0)
        totals.report(processor)

    return app


class StreamTotals:
    """Running counts, printed as one `STATS {json}` line on stdout (progress for operators and the demo)."""

    def __init__(self) -> None:
        self.samples = self.rejected = self.scored = self.deadletters = self.batches = 0
        self.started = time.time()

    def add(self, result: BatchResult) -> None:
        self.samples += result.samples
        self.rejected += result.rejected_samples
        self.scored += result.scored
        self.deadletters += len(result.deadletters)
        self.batches += 1

    def report(self, processor: RiskProcessor) -> None:
        line = {
            "samples": self.samples,
            "rejected_samples": self.rejected,
            "scored": self.scored,
            "deadletters": self.deadletters,
            "batches": self.batches,
            "uptime_s": round(time.time() - self.started, 1),
            **processor.stats(),
        }
        print("STATS " + orjson.dumps(line).decode(), flush=True)


def run_worker(settings: Settings, *, loglevel: str = "warning") -> None:
    """Run one stream worker until SIGTERM/SIGINT (the `gpuwatch stream` command)."""
    app = create_app(settings)
    # Our STATS lines go to real stdout; faust would otherwise route prints into its logger.
    worker = faust.Worker(app, loglevel=loglevel, quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
