"""Topic helpers: create gpuwatch's topics, count partitions, tell a recreated topic from the old one."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException, TopicCollection
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
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=settings.partitions, replication_factor=1) for t in missing]
    )
    for fut in futures.values():
        try:
            fut.result(timeout=15)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    log.info("created topics %s with %d partitions", missing, settings.partitions)


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
    compacted = NewTopic(
        topic, num_partitions=partitions, replication_factor=1, config={"cleanup.policy": "compact"}
    )
    fut = admin.create_topics([compacted])[topic]
    try:
        fut.result(timeout=15)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


class TopicIdentity:
    """The id Kafka gave `topic` when it was created. It changes when the topic is deleted and created again,
    as after a restart of a broker without persistent storage: offsets from before then mean nothing."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.topic = topic
        self._admin = AdminClient(settings.kafka_client_config())

    def current(self, timeout: float = 10.0) -> str | None:
        """The topic's id now; None when the topic is missing or the broker does not answer."""
        try:
            found = self._admin.describe_topics(TopicCollection([self.topic]), request_timeout=timeout)
            return str(found[self.topic].result(timeout).topic_id)
        except Exception as exc:  # KafkaException, or the future's TimeoutError while the broker is down
            log.debug("cannot describe %s: %s", self.topic, exc)
            return None
