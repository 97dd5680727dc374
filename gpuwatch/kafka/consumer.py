"""Consumers built from Settings, committing a batch's offsets, and reading partitions from the start."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Message, TopicPartition

from gpuwatch.config import Settings

log = logging.getLogger(__name__)


def make_consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    """A consumer in `group_id` reading from the earliest offset when it has none committed."""
    conf: dict[str, Any] = settings.kafka_client_config()
    # A short session lets a new member join in ~3 s instead of ~25 s (the broker waits on the session timeout).
    conf.update(
        {
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 500,
            # librdkafka waits up to 500 ms for a fetch to fill; risk and remediation are latency-bound.
            "fetch.wait.max.ms": 50,
        }
    )
    conf.update(overrides)
    return Consumer(conf)


def batch_offsets(batch: Sequence[Message]) -> list[TopicPartition]:
    """The offsets that mark every message of `batch` consumed: per partition, its last offset + 1."""
    last: dict[tuple[str, int], int] = {}
    for msg in batch:
        tp = (msg.topic() or "", msg.partition() or 0)
        last[tp] = max(last.get(tp, -1), msg.offset() or 0)
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]


def commit_batch(consumer: Consumer, batch: Sequence[Message]) -> None:
    """Commits `batch`'s offsets (asynchronously). A commit refused, e.g. because a rebalance took the
    partitions, only means the batch is delivered again: logged, not raised."""
    offsets = batch_offsets(batch)
    if not offsets:
        return
    try:
        consumer.commit(offsets=offsets, asynchronous=True)
    except KafkaException as exc:
        log.info("offset commit skipped: %s", exc)


def read_partitions_to_end(
    settings: Settings, topic: str, partitions: list[int], timeout: float = 60.0
) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every message in `partitions` of `topic`, from the start to the current end."""
    conf = settings.kafka_client_config()
    conf.update({"group.id": f"gpuwatch-restore-{time.time_ns()}", "enable.auto.commit": False})
    consumer = Consumer(conf)
    try:
        ends = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        if not ends:
            return []
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        out: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error() is not None:
                    continue
                out.append((msg.key(), msg.value()))
                if msg.offset() + 1 >= ends.get(msg.partition(), 0):
                    ends.pop(msg.partition(), None)
        if ends:
            raise RuntimeError(
                f"reading {topic} partitions {sorted(ends)} did not reach their end in {timeout:.0f} s"
            )
        return out
    finally:
        consumer.close()
