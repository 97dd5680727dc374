"""Thin wrappers over confluent-kafka: topic creation, producers and consumers built from Settings."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import deque
from functools import partial
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicCollection
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


def produce(
    producer: Producer | ReliableProducer,
    topic: str,
    key: bytes | None,
    value: bytes,
    partition: int | None = None,
) -> None:
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


# Retrying these cannot succeed: the message itself is unacceptable to the broker.
_PERMANENT = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD,
                        KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE,
                        KafkaError.TOPIC_AUTHORIZATION_FAILED})  # fmt: skip


class ReliableProducer:
    """An idempotent producer for output that must be durable before the input's offsets are committed.

    A bare `Producer` gives up on a message after `message.timeout.ms`, and `flush()` returning non-zero is
    easy to ignore. Here a message whose delivery fails is kept and, once nothing else is in flight, resent
    in order by a fresh producer. That also recovers from a broker that lost our producer id (a rebuilt
    cluster, or the memory-only embedded broker restarted), which librdkafka would otherwise retry as
    "unknown producer id" until the message times out, and from a fatal idempotence error (a broker that
    handed our producer id to another client). `flush(timeout)` returns how many messages are still
    unacknowledged: 0 means everything produced so far is in Kafka (`flush_until_acknowledged` waits for that).
    A message not acknowledged within `message_timeout_s` (`settings.kafka_delivery_timeout_s` unless given)
    counts as failed and is resent. Messages the broker refuses for good (too large, not authorised) are
    logged and counted in `dropped`, never retried. Thread-safe; the same calls as `Producer` (`produce`,
    `poll`, `flush`, `len()`), but `produce(topic, key, value, partition)` takes no delivery callback: use
    `produce()` above, which also waits while the local queue is full.
    """

    def __init__(self, settings: Settings, *, message_timeout_s: float | None = None, **overrides: Any) -> None:
        self._settings = settings
        if message_timeout_s is None:
            message_timeout_s = settings.kafka_delivery_timeout_s
        self._conf = {"message.timeout.ms": int(message_timeout_s * 1000), "error_cb": self._on_error}
        self._conf.update(overrides)
        self._lock = threading.Lock()
        # id -> (producer generation, topic, key, value, partition), until Kafka acknowledges it
        self._pending: dict[int, tuple[int, str, bytes | None, bytes | None, int | None]] = {}
        self._failed: list[int] = []
        # Callbacks only append here (see _delivered); flush() and poll() apply them under the lock.
        self._reports: deque[tuple[int, int, KafkaError | None]] = deque()
        self._errors: deque[KafkaError] = deque()
        self._suspect = False  # a callback ran with an error left pending by the client: it is failing for good
        self._next = 0
        self._gen = 0
        self._fatal_gen = -1  # generation of a producer that hit a fatal error (it delivers nothing more)
        self._timeout_s = message_timeout_s
        self._failing_since = 0.0
        self.resent = 0  # messages sent again by a fresh producer
        self.replaced = 0  # producers replaced after failures
        self.dropped = 0  # refused by the broker for good
        self.last_error = ""
        self._producer: Producer = make_producer(settings, **self._conf)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None,
                partition: int | None = None) -> None:  # fmt: skip
        """Queue one message; raises BufferError like `Producer.produce` when the local queue is full."""
        with self._lock:
            rid, self._next = self._next, self._next + 1
            gen, producer = self._gen, self._producer
            self._pending[rid] = (gen, topic, key, value, partition)
        try:
            self._send(producer, rid, gen, topic, key, value, partition)
        except KafkaException as exc:  # a producer in a fatal state refuses new messages: resent by flush()
            self._on_error(exc.args[0])
            with self._lock:
                self._failed.append(rid)
                self._failing_since = self._failing_since or time.monotonic()
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise

    def poll(self, timeout: float = 0.0) -> int:
        try:
            served = self._producer.poll(timeout)
        except (KafkaException, SystemError) as exc:
            self._broken(exc)
            served = 0
        self._apply()
        return served

    def flush(self, timeout: float = 30.0) -> int:
        """Waits up to `timeout` s for all queued messages, resending failed ones; returns how many remain."""
        deadline = time.monotonic() + timeout
        while True:
            producer = self._producer
            try:
                producer.flush(max(0.0, min(0.5, deadline - time.monotonic())))
            except (KafkaException, SystemError) as exc:
                self._broken(exc)
            self._apply()
            with self._lock:
                if not self._pending:
                    return 0
                # A producer still holding messages long after one failed is stuck (librdkafka can retry a
                # broken idempotence state forever): treat it as failed for good.
                failing = self._failing_since and time.monotonic() - self._failing_since > 2 * self._timeout_s
                fatal = self._fatal_gen == self._gen or bool(failing)
                resend = fatal or (bool(self._failed) and len(producer) == 0 and producer is self._producer)
                seen = self._gen
            if resend:
                self._resend(seen, everything=fatal)
            if time.monotonic() >= deadline:
                with self._lock:
                    return len(self._pending)

    def _send(
        self,
        producer: Producer,
        rid: int,
        gen: int,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
    ) -> None:
        extra = {} if partition is None else {"partition": partition}
        producer.produce(topic, value=value, key=key, on_delivery=partial(self._delivered, rid, gen), **extra)

    def _delivered(self, rid: int, gen: int, err: KafkaError | None, msg: Message) -> None:
        # confluent-kafka may call this with a fatal error already raised and pending, so that the first C call
        # here fails with SystemError *after* doing its work; a lock taken that way would never be released.
        try:
            self._reports.append((rid, gen, err))
        except SystemError:
            self._suspect = True

    def _on_error(self, err: KafkaError) -> None:
        try:
            self._errors.append(err)
        except SystemError:
            self._suspect = True

    def _broken(self, exc: BaseException) -> None:
        # A fatal error raised out of poll()/flush() (as SystemError when it surfaced inside our callback).
        cause = exc if isinstance(exc, KafkaException) else exc.__cause__
        if isinstance(cause, KafkaException) and isinstance(cause.args[0], KafkaError) and not cause.args[0].fatal():
            self._on_error(cause.args[0])
            return
        self.last_error = str(cause or exc)
        self._suspect = True

    def _apply(self) -> None:
        """Applies the delivery reports and errors the callbacks queued."""
        with self._lock:
            while self._errors:
                err = self._errors.popleft()
                self.last_error = err.str()
                if err.fatal():
                    self._mark_fatal(err.str())
            if self._suspect:
                self._suspect = False
                self._mark_fatal(self.last_error or "the Kafka client reported a fatal error")
            while self._reports:
                rid, gen, err = self._reports.popleft()
                entry = self._pending.get(rid)
                if entry is None or entry[0] != gen:
                    continue  # already resent by a newer producer
                if err is None:
                    del self._pending[rid]
                elif err.code() in _PERMANENT:
                    del self._pending[rid]
                    self.dropped += 1
                    log.error("Kafka refused a %d-byte message for %s for good (%s); dropped",
                              len(entry[3] or b""), entry[1], err.str())  # fmt: skip
                else:
                    if not self._failed:
                        log.warning("Kafka did not acknowledge messages (%s); resending them", err.str())
                        self._failing_since = time.monotonic()
                    self._failed.append(rid)
                    self.last_error = err.str()
                    if err.fatal() or err.code() == KafkaError._FATAL:
                        self._mark_fatal(err.str())

    def _mark_fatal(self, why: str) -> None:  # with the lock held
        if self._fatal_gen != self._gen:
            log.warning("Kafka producer failed for good (%s); resending with a fresh one", why)
        self._fatal_gen = self._gen

    def _resend(self, seen: int, *, everything: bool = False) -> None:
        """Replaces the producer and resends, in their original order, the failed messages (`everything`
        unacknowledged after a fatal error: the old producer reports nothing more)."""
        fresh = make_producer(self._settings, **self._conf)
        with self._lock:
            if self._gen != seen or (not self._failed and not everything):
                return  # another thread replaced it already
            old, self._producer = self._producer, fresh
            self._gen += 1
            self._failing_since = 0.0
            gen, ids = self._gen, sorted(self._pending) if everything else sorted(set(self._failed))
            self._failed.clear()
            todo = []
            for rid in ids:
                if rid in self._pending:
                    _, topic, key, value, partition = self._pending[rid]
                    self._pending[rid] = (gen, topic, key, value, partition)
                    todo.append((rid, topic, key, value, partition))
            self.replaced += 1
            self.resent += len(todo)
        try:
            old.purge(in_queue=True, in_flight=True)
        except (KafkaException, SystemError) as exc:  # a failed producer may refuse even this
            log.debug("purging the replaced producer: %s", exc)
        for rid, topic, key, value, partition in todo:
            while True:
                try:
                    self._send(fresh, rid, gen, topic, key, value, partition)
                    break
                except BufferError:
                    fresh.poll(0.05)


def flush_until_acknowledged(producer: ReliableProducer, stop: threading.Event, what: str) -> bool:
    """Waits until Kafka has acknowledged everything `producer` was given (True), however long an outage
    lasts, or until `stop` is set first (False: the caller leaves its input's offsets uncommitted)."""
    started = time.monotonic()
    warned = 0.0
    while producer.flush(1.0):
        if stop.is_set():
            return False
        waited = time.monotonic() - started
        if not warned or waited - warned >= 30.0:  # once at the start of an outage, then every 30 s
            warned = waited
            log.warning("%s not yet acknowledged by Kafka after %.0f s (%s); holding the batch, offsets uncommitted",
                        what, waited, producer.last_error or "no error yet")  # fmt: skip
    return True


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


def faust_credentials(settings: Settings) -> Any:
    """The Kafka security settings as faust `broker_credentials` (None for PLAINTEXT), so the stream worker's
    aiokafka consumer uses the same SASL and TLS settings as the confluent-kafka clients."""
    import faust

    protocol = settings.kafka_security_protocol.upper()
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile or None)
        if settings.kafka_ssl_certfile:
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None,
                                    password=settings.kafka_ssl_key_password or None)  # fmt: skip
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password,
            mechanism=settings.kafka_sasl_mechanism or "PLAIN",
            ssl_context=context,
        )
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    return None
