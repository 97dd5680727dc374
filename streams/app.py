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

from gpuwatch.config import Settings
from gpuwatch.kafka import make_producer
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

    @app.agent(samples, concurrency=1)
    async def score(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.stream_batch_size, within=settings.stream_batch_within_s):
            batch = [
                Inbound(e.message.value, e.message.topic, e.message.partition, e.message.offset) for e in events
            ]
            result = processor.process(batch, now=time.time())
            for key, value in result.risk:
                _produce(producer, settings.topic_risk, key, value)
            for value in result.deadletters:
                _produce(producer, settings.topic_deadletter, None, value)
            # Durable before faust acknowledges the batch: nothing is lost if we crash right after.
            await asyncio.get_running_loop().run_in_executor(None, producer.flush, 30.0)
            if on_batch is not None:
                on_batch(result)

    @app.on_stop.connect  # type: ignore[misc]
    async def _flush(app_: faust.App, **kwargs: object) -> None:
        producer.flush(10.0)

    return app


def _produce(producer: object, topic: str, key: bytes | None, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value)  # type: ignore[attr-defined]
            producer.poll(0)  # type: ignore[attr-defined]
            return
        except BufferError:
            producer.poll(0.05)  # type: ignore[attr-defined]  # local queue full: wait for deliveries


def run_worker(settings: Settings, *, loglevel: str = "warning") -> None:
    """Run one stream worker until SIGTERM/SIGINT (the `gpuwatch stream` command)."""
    from faust.cli.base import Worker  # noqa: F401 - imported for side effects in faust

    app = create_app(settings)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()
