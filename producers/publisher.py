"""Publisher: every snapshot goes through the on-disk spool to Kafka, in order, and leaves it only when acked.

`publish()` appends to the spool; `pump()` hands the oldest unsent records to an idempotent `acks=all`
producer (at most `max_in_flight` at a time) and acknowledges them in the spool when their delivery
reports succeed. Because new snapshots queue behind spooled ones in the same file, a returning broker
receives the backlog first and per-host order holds. While the broker is down the in-flight window stays
in the producer, new snapshots accumulate in the spool (bounded: the oldest are dropped and counted).

A failed delivery (timeout, broker restarted without our producer id, fatal idempotence error) stops the
feed; once every in-flight record has resolved, a fresh producer resends the failed ones in order.
Delivery is at least once: a record whose acknowledgement was lost in a broker crash can arrive twice,
with the same `seq`, so consumers that care de-duplicate on (host, seq).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from gpuwatch.config import Settings
from gpuwatch.kafka import make_producer
from gpuwatch.producers.spool import Spool

log = logging.getLogger(__name__)

_SENT, _ACKED, _FAILED, _REJECTED = range(4)
# Retrying these cannot succeed: the record itself is unacceptable to the broker.
_PERMANENT = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_MSG, KafkaError.INVALID_RECORD,
                        KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG_SIZE})  # fmt: skip
_MAX_BACKOFF_S = 30.0


class _Entry:
    __slots__ = ("rid", "key", "value", "state")

    def __init__(self, rid: int, key: bytes, value: bytes) -> None:
        self.rid, self.key, self.value, self.state = rid, key, value, _SENT


class Publisher:
    """Sends spooled snapshots to `topic` (default: settings.topic_samples), oldest first, keyed by host.

    Kafka security settings (SASL, TLS) come from `settings.kafka_client_config()`; `producer_config`
    overrides any librdkafka property. `delivery_timeout_s` bounds how long a record may sit in the
    producer before it is failed and resent by a fresh producer.
    """

    def __init__(self, settings: Settings, spool: Spool, *, topic: str | None = None,
                 client_id: str = "gpuwatch-agent", max_in_flight: int = 1000,
                 max_in_flight_bytes: int = 16 << 20, delivery_timeout_s: float = 30.0,
                 producer_config: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.spool = spool
        self.topic = topic or settings.topic_samples
        self._settings = settings
        self._max_in_flight = max_in_flight
        self._max_bytes = max_in_flight_bytes
        self._overrides: dict[str, Any] = {
            "client.id": client_id,
            "linger.ms": 10,
            "message.timeout.ms": int(delivery_timeout_s * 1000),
            "reconnect.backoff.max.ms": 2000,
            "queue.buffering.max.messages": max_in_flight + 1000,
            "error_cb": self._on_error,
            **(producer_config or {}),
        }
        self._window: deque[_Entry] = deque()
        self._window_bytes = 0
        self._unresolved = 0  # entries in state _SENT
        self._failed = 0  # entries in state _FAILED
        self._held: _Entry | None = None  # read from the spool but not accepted by the producer yet
        self._fatal = False
        self._purged = False
        self._retry_at = 0.0
        self._backoff = 1.0
        self.sent = 0  # records the broker acknowledged
        self.rejected = 0  # records the broker refused for good (e.g. too large); logged
        self.delivery_failures = 0  # failed delivery reports (each record is resent)
        self.producer_restarts = 0
        self.broker_up: bool | None = None  # None until the first delivery report or broker error
        self.last_error = ""
        self._producer: Producer | None = None
        self._gen = 0
        self._new_producer()

    @property
    def in_flight(self) -> int:
        """Records handed to the producer and not yet acknowledged."""
        return len(self._window)

    @property
    def pending(self) -> int:
        """Records not yet acknowledged by the broker (spooled, in flight or awaiting resend)."""
        return self.spool.pending

    def publish(self, key: str | bytes, value: bytes) -> None:
        """Spools one record (sent by the next `pump()`); never blocks on the broker."""
        self.spool.append(key.encode() if isinstance(key, str) else key, value)

    def pump(self, timeout: float = 0.0) -> None:
        """Serves delivery reports (waiting up to `timeout` s for one), acknowledges, then sends or resends."""
        if self._producer is not None:
            self._producer.poll(timeout)
        elif timeout > 0:
            time.sleep(timeout)
        self._retire()
        if self._fatal or self._failed:
            self._recover()
        else:
            self._feed()

    def flush(self, timeout: float) -> bool:
        """Pumps until every spooled record is acknowledged (True) or `timeout` s pass (False)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.spool.pending and not self._window:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.pump(min(0.1, left))

    def close(self, timeout: float = 10.0) -> bool:
        """flush(timeout), then drops the producer; what was not acknowledged stays in the spool."""
        done = self.flush(timeout)
        self._drop_producer()
        return done

    # ----- internals

    def _new_producer(self) -> None:
        self._drop_producer()
        self._gen += 1
        self._fatal = self._purged = False
        self._producer = make_producer(self._settings, **self._overrides)

    def _drop_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.purge(in_queue=True, in_flight=True)
                self._producer.poll(0)
            except KafkaException as exc:
                log.debug("purging the old producer: %s", exc)
            self._producer = None

    def _produce(self, entry: _Entry) -> None:
        assert self._producer is not None
        self._producer.produce(self.topic, value=entry.value, key=entry.key,
                               on_delivery=partial(self._delivered, entry, self._gen))  # fmt: skip
        entry.state = _SENT
        self._unresolved += 1

    def _feed(self) -> None:
        while len(self._window) < self._max_in_flight and self._window_bytes < self._max_bytes:
            entry = self._held
            if entry is None:
                rec = self.spool.read_next()
                if rec is None:
                    return
                entry = _Entry(*rec)
            try:
                self._produce(entry)
            except BufferError:
                self._held = entry
                return
            except KafkaException as exc:
                self._held = entry
                self._note_error(exc.args[0])
                return
            self._held = None
            self._window.append(entry)
            self._window_bytes += len(entry.value)

    def _retire(self) -> None:
        """Pops the acknowledged prefix of the window and records it in the spool."""
        upto = -1
        while self._window and self._window[0].state in (_ACKED, _REJECTED):
            entry = self._window.popleft()
            self._window_bytes -= len(entry.value)
            upto = entry.rid
        if upto >= 0:
            self.spool.ack(upto + 1)

    def _recover(self) -> None:
        """After a failure: let everything in flight resolve, then resend the failed records in order."""
        if self._producer is not None and not self._purged:
            # Nothing queued behind a failed record may reach the broker ahead of its resend.
            self._producer.purge(in_queue=True, in_flight=self._fatal)
            self._purged = True
        if self._unresolved and not self._fatal:
            return
        now = time.monotonic()
        if now < self._retry_at:
            return
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, _MAX_BACKOFF_S)
        for entry in self._window:
            if entry.state == _SENT:  # fatal: reports of the old producer will not come
                entry.state = _FAILED
                self._unresolved -= 1
                self._failed += 1
        self._new_producer()
        self.producer_restarts += 1
        log.info(
            "resending %d records with a new producer (%s)", self._failed, self.last_error or "no error text"
        )
        for entry in self._window:
            if entry.state == _FAILED:
                try:
                    self._produce(entry)
                except (BufferError, KafkaException) as exc:  # stays _FAILED; the next pump tries again
                    self._note_error(exc.args[0] if isinstance(exc, KafkaException) else exc)
                    return
                self._failed -= 1

    def _delivered(self, entry: _Entry, gen: int, err: KafkaError | None, msg: Message) -> None:
        if gen != self._gen or entry.state != _SENT:
            return  # a report from a producer we already replaced
        self._unresolved -= 1
        if err is None:
            entry.state = _ACKED
            self.sent += 1
            self.broker_up = True
            self._backoff = 1.0
            return
        if err.code() in _PERMANENT:
            entry.state = _REJECTED
            self.rejected += 1
            log.error(
                "the broker refused a %d-byte snapshot for good (%s); dropped", len(entry.value), err.str()
            )
            return
        entry.state = _FAILED
        self._failed += 1
        self.delivery_failures += 1
        self._note_error(err)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self.broker_up = False
        if err.fatal():
            self._fatal = True
            log.error("Kafka producer fatal error: %s; it will be replaced", err.str())
        self._note_error(err)

    def _note_error(self, err: Any) -> None:
        text = err.str() if isinstance(err, KafkaError) else str(err)
        if text != self.last_error:
            log.warning("Kafka: %s", text)
        self.last_error = text
