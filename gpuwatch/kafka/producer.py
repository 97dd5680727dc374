"""The one way gpuwatch writes to Kafka: `ReliableProducer`, which keeps every message until Kafka has it.

Every stage that writes a topic uses it: the stream worker, the sinks, the controller, the agent's command
listener (through `BatchLoop`, gpuwatch/kafka/loop.py) and the agent's `Publisher` (its disk spool on top).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from gpuwatch.config import Settings

log = logging.getLogger(__name__)

# Retrying these cannot succeed: the message itself is unacceptable to the broker (or to the client, which
# refuses a message over `message.max.bytes` before sending it). Everything else, a broker away, a timeout,
# a missing permission (an operator can grant it), is retried for as long as it takes.
PERMANENT_ERRORS = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD,
                              KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})  # fmt: skip
# Between two producer replacements: a failure that comes back at once (not a timeout) must not spin.
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 5.0


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


class ReliableProducer:
    """An idempotent producer for output that must be in Kafka before anything that depends on it moves on.

    A bare `Producer` gives up on a message after `message.timeout.ms`, and `flush()` returning non-zero is
    easy to ignore. Here a message whose delivery fails is kept and, once nothing else is in flight, resent
    in order by a fresh producer; what was queued behind it is purged and resent after it, and messages
    produced while a resend waits go after it. (A message already on its way when the failure is seen can
    still arrive first: consumers must tolerate that, as they tolerate duplicates.) A fresh producer also
    takes over:

    - after a fatal idempotence error (a broker that lost our producer id, which librdkafka would otherwise
      retry as "unknown producer id" until the message times out, or handed it to another client);
    - after every broker was out of reach: a broker that restarted without its state (the memory-only
      embedded one) may have handed our producer id to another client, and would then take our next message
      for a duplicate of theirs, acknowledge it and drop it.

    A message not acknowledged within `message_timeout_s` (`settings.kafka_delivery_timeout_s` unless given)
    counts as failed and is resent; a failure that comes back at once is retried with a backoff (0.5 s
    doubling to 5 s). Messages refused for good (`PERMANENT_ERRORS`: too large, invalid) are logged and
    counted in `dropped`, never retried.

    `flush(timeout)` returns how many messages are still unacknowledged: 0 means everything produced so far is
    in Kafka (`flush_until_acknowledged` waits for that). `produce` returns the message's sequence number and
    `acknowledged_below()` the first one not yet acknowledged, for callers that retire their own copies in
    order (the agent's spool). Call `poll` while idle, so that errors are seen before the next message.
    Thread-safe; the same calls as `Producer` (`produce`, `poll`, `flush`, `len()`), but `produce(topic, key,
    value, partition)` takes no delivery callback: use `produce()` above, which also waits while the local
    queue is full.
    """

    def __init__(
        self, settings: Settings, *, message_timeout_s: float | None = None, **overrides: Any
    ) -> None:
        self._settings = settings
        if message_timeout_s is None:
            message_timeout_s = settings.kafka_delivery_timeout_s
        self._conf = {"message.timeout.ms": int(message_timeout_s * 1000), "error_cb": self._on_error}
        self._conf.update(overrides)
        self._lock = threading.Lock()
        # id -> (producer generation, topic, key, value, partition), until Kafka acknowledges it
        self._pending: dict[int, tuple[int, str, bytes | None, bytes | None, int | None]] = {}
        self._failed: list[int] = []  # waiting for a resend, with the messages produced behind them
        # Callbacks only append here (see _delivered); flush() and poll() apply them under the lock.
        self._reports: deque[tuple[int, int, KafkaError | None]] = deque()
        self._errors: deque[KafkaError] = deque()
        self._suspect = (
            False  # a callback ran with an error left pending by the client: it is failing for good
        )
        self._next = 0
        self._gen = 0
        self._fatal_gen = -1  # generation of a producer that hit a fatal error (it delivers nothing more)
        self._purged_gen = -1  # generation whose queue was purged after its first failure
        self._timeout_s = message_timeout_s
        self._failing_since = 0.0
        self._retry_at = 0.0
        self._backoff = _FIRST_BACKOFF_S
        self.acknowledged = 0  # messages Kafka acknowledged
        self.failures = 0  # failed delivery reports (each message is resent)
        self.resent = 0  # messages sent again by a fresh producer
        self.replaced = 0  # producers replaced after failures
        self.dropped = 0  # refused for good
        self.broker_up: bool | None = None  # None until the first acknowledgement or "all brokers down"
        self.last_error = ""
        self._producer: Producer = make_producer(settings, **self._conf)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def acknowledged_below(self) -> int:
        """Every message whose sequence number is below this was acknowledged (or refused for good)."""
        with self._lock:
            return min(self._pending) if self._pending else self._next

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None,
                partition: int | None = None) -> int:  # fmt: skip
        """Queues one message and returns its sequence number; raises BufferError like `Producer.produce`
        when the local queue is full (nothing was queued then)."""
        with self._lock:
            rid, self._next = self._next, self._next + 1
            gen, producer = self._gen, self._producer
            self._pending[rid] = (gen, topic, key, value, partition)
            if self._failed or self._fatal_gen == gen:
                self._failed.append(rid)  # behind the messages that wait for a resend: sent after them
                return rid
        try:
            self._send(producer, rid, gen, topic, key, value, partition)
        except KafkaException as exc:
            err = exc.args[0]
            with self._lock:
                if (
                    isinstance(err, KafkaError) and err.code() in PERMANENT_ERRORS
                ):  # refused by the client itself
                    self._refused(rid, err)
                    return rid
                self._failed.append(rid)  # a producer in a fatal state refuses new messages: resent later
                self._failing_since = self._failing_since or time.monotonic()
            self._on_error(err)
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        return rid

    def poll(self, timeout: float = 0.0) -> int:
        """Serves delivery reports (waiting up to `timeout` s for one) and resends what failed."""
        try:
            served = self._producer.poll(timeout)
        except (KafkaException, SystemError) as exc:
            self._broken(exc)
            served = 0
        self._apply()
        self._maybe_resend()
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
            if not self._maybe_resend():
                # nothing in flight, the resend waits for its backoff: sleep rather than spin
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                with self._lock:
                    return len(self._pending)

    def close(self) -> None:
        """Drops whatever is not acknowledged (call `flush` first to keep it) and closes the client's
        connections; the producer cannot be used afterwards (its counters can)."""
        try:
            self._producer.purge(in_queue=True, in_flight=True)
            self._producer.poll(0)
            self._producer.close()
        except (KafkaException, SystemError, RuntimeError) as exc:
            log.debug("closing the producer: %s", exc)

    def _maybe_resend(self) -> bool:
        """Resends with a fresh producer when the current one has failed; False when a resend is due but its
        backoff has not passed yet and nothing is in flight."""
        with self._lock:
            if not self._pending:
                return True
            producer = self._producer
            # A producer still holding messages long after one failed is stuck (librdkafka can retry a
            # broken idempotence state forever): treat it as failed for good.
            failing = self._failing_since and time.monotonic() - self._failing_since > 2 * self._timeout_s
            fatal = self._fatal_gen == self._gen or bool(failing)
            due = fatal or (bool(self._failed) and len(producer) == 0)
            if not due:
                return True
            if time.monotonic() < self._retry_at:
                return len(producer) > 0
            seen = self._gen
        self._resend(seen, everything=fatal)
        return True

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
        if (
            isinstance(cause, KafkaException)
            and isinstance(cause.args[0], KafkaError)
            and not cause.args[0].fatal()
        ):
            self._on_error(cause.args[0])
            return
        self.last_error = str(cause or exc)
        self._suspect = True

    def _apply(self) -> None:
        """Applies the delivery reports and errors the callbacks queued."""
        purge = None
        with self._lock:
            while self._errors:
                err = self._errors.popleft()
                self.last_error = err.str()
                if err.code() == KafkaError._ALL_BROKERS_DOWN:
                    self.broker_up = False
                    # A broker may come back without its state (a memory-only one restarted) and hand our
                    # producer id to another client; a message sent under it can then be acknowledged as a
                    # duplicate of theirs and dropped. What comes next goes through a fresh producer, which
                    # asks the broker for a new id.
                    if self._fatal_gen != self._gen:
                        log.info(
                            "Kafka unreachable (%s); what comes next goes through a fresh producer", err.str()
                        )
                    self._fatal_gen = self._gen
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
                    self.acknowledged += 1
                    self.broker_up = True
                    self._backoff = _FIRST_BACKOFF_S
                elif err.code() in PERMANENT_ERRORS:
                    self._refused(rid, err)
                else:
                    if not self._failed:
                        log.warning("Kafka did not acknowledge messages (%s); resending them", err.str())
                        self._failing_since = time.monotonic()
                    self._failed.append(rid)
                    self.failures += 1
                    self.last_error = err.str()
                    if err.fatal() or err.code() == KafkaError._FATAL:
                        self._mark_fatal(err.str())
                    if gen == self._gen and self._purged_gen != gen:
                        # What is queued behind a failed message must not reach Kafka before its resend.
                        self._purged_gen = gen
                        purge = self._producer
        if purge is not None:
            try:
                purge.purge(in_queue=True, in_flight=False)  # reported as failed, then resent in order
            except (KafkaException, SystemError) as exc:
                log.debug("purging the failed producer's queue: %s", exc)

    def _refused(self, rid: int, err: KafkaError) -> None:  # with the lock held
        _, topic, _, value, _ = self._pending.pop(rid)
        self.dropped += 1
        log.error("Kafka refused a %d-byte message for %s for good (%s); dropped",
                  len(value or b""), topic, err.str())  # fmt: skip

    def _mark_fatal(self, why: str) -> None:  # with the lock held
        if self._fatal_gen != self._gen:
            log.warning("Kafka producer failed for good (%s); resending with a fresh one", why)
        self._fatal_gen = self._gen

    def _resend(self, seen: int, *, everything: bool = False) -> None:
        """Replaces the producer and resends, in their original order, the failed messages (`everything`
        unacknowledged after a fatal error: the old producer reports nothing more)."""
        fresh = make_producer(self._settings, **self._conf)
        with self._lock:  # held while resending: a message produced meanwhile must not overtake these
            if self._gen != seen or (not self._failed and not everything):
                return  # another thread replaced it already
            old, self._producer = self._producer, fresh
            self._gen += 1
            self._failing_since = 0.0
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(2 * self._backoff, _MAX_BACKOFF_S)
            gen, ids = self._gen, sorted(self._pending) if everything else sorted(set(self._failed))
            self._failed.clear()
            self.replaced += 1
            try:
                old.purge(in_queue=True, in_flight=True)
            except (KafkaException, SystemError) as exc:  # a failed producer may refuse even this
                log.debug("purging the replaced producer: %s", exc)
            for i, rid in enumerate(ids):
                if rid not in self._pending:
                    continue
                _, topic, key, value, partition = self._pending[rid]
                self._pending[rid] = (gen, topic, key, value, partition)
                try:
                    self._send_waiting(fresh, rid, gen, topic, key, value, partition)
                except KafkaException as exc:  # refused by the client, or the fresh producer failed already
                    err = exc.args[0]
                    if isinstance(err, KafkaError) and err.code() in PERMANENT_ERRORS:
                        self._refused(rid, err)
                        continue
                    self._errors.append(err)
                    # this one and every one behind it wait for the next resend, in order
                    self._failed.extend(r for r in ids[i:] if r in self._pending)
                    self._failing_since = self._failing_since or time.monotonic()
                    return
                self.resent += 1

    def _send_waiting(self, producer: Producer, rid: int, gen: int, topic: str, key: bytes | None,
                      value: bytes | None, partition: int | None) -> None:  # fmt: skip
        """`_send`, waiting while the local queue is full (delivery callbacks take no lock: safe under it)."""
        while True:
            try:
                self._send(producer, rid, gen, topic, key, value, partition)
                return
            except BufferError:
                producer.poll(0.05)


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
