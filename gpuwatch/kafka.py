"""Thin wrappers over confluent-kafka: topic creation, producers and consumers built from Settings."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from gpuwatch.config import Settings

log = logging.getLogger(__name__)


def all_topics(settings: Settings) -> list[str]:
    return [
        settings.topic_samples,
        settings.topic_risk,
        settings.topic_remediation,
        settings.topic_deadletter,
        settings.topic_outcomes,
        settings.topic_commands,
    ]


def ensure_topics(settings: Settings, topics: list[str] | None = None, timeout: float = 30.0) -> None:
    """Create gpuwatch's topics if they do not exist (existing ones are left as they are)."""
    admin = AdminClient(settings.kafka_client_config())
    wanted = topics or all_topics(settings)
    deadline = time.monotonic() + timeout
    while True:
        try:
            existing = set(admin.list_topics(timeout=5).topics)
            break
        except KafkaException as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"Kafka at {settings.kafka_bootstrap} is not reachable: {exc}") from exc
            time.sleep(0.5)
    missing = [t for t in wanted if t not in existing]
    if not missing:
        return
    futures = admin.create_topics([NewTopic(t, num_partitions=settings.partitions, replication_factor=1) for t in missing])
    for fut in futures.values():
        try:
            fut.result(timeout=15)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    log.info("created topics %s with %d partitions", missing, settings.partitions)


def make_producer(settings: Settings, **overrides: Any) -> Producer:
    """An idempotent producer (acks=all) with low linger, for gpuwatch's topics."""
    conf: dict[str, Any] = settings.kafka_client_config()
    conf.update(
        {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "none",
        }
    )
    conf.update(overrides)
    return Producer(conf)


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


def produce(producer: Producer, topic: str, key: bytes | None, value: bytes, partition: int | None = None) -> None:
    """Produce one message, waiting for deliveries while the local queue is full (never drops)."""
    while True:
        try:
            if partition is None:
                producer.produce(topic, key=key, value=value)
            else:
                producer.produce(topic, key=key, value=value, partition=partition)
            return
        except BufferError:
            producer.poll(0.05)


def partition_count(settings: Settings, topic: str, timeout: float = 10.0) -> int:
    """How many partitions `topic` has (0 if it does not exist)."""
    md = AdminClient(settings.kafka_client_config()).list_topics(topic, timeout=timeout)
    t = md.topics.get(topic)
    return 0 if t is None or t.error is not None else len(t.partitions)


def ensure_compacted_topic(settings: Settings, topic: str, partitions: int) -> None:
    """Create a compacted topic (a changelog: the newest value per key is what matters)."""
    admin = AdminClient(settings.kafka_client_config())
    if topic in admin.list_topics(timeout=10).topics:
        return
    fut = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=1, config={"cleanup.policy": "compact"})]
    )[topic]
    try:
        fut.result(timeout=15)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


def read_partitions_to_end(
    settings: Settings, topic: str, partitions: list[int], timeout: float = 60.0
) -> list[tuple[bytes | None, bytes | None]]:
    """(key, value) of every message in `partitions` of `topic`, from the start to the current end."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

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
            raise RuntimeError(f"reading {topic} partitions {sorted(ends)} did not reach their end in {timeout:.0f} s")
        return out
    finally:
        consumer.close()
