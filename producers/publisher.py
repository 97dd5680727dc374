"""Publisher: every snapshot goes through the on-disk spool to Kafka, in order, and leaves it only when acked.

`publish()` appends to the spool; `pump()` hands the oldest unsent records to gpuwatch's one reliable
producer (`gpuwatch.kafka.ReliableProducer`, at most `max_in_flight` records at a time) and acknowledges
them in the spool, oldest first, once Kafka has them. Because new snapshots queue behind spooled ones in the
same file, a returning broker receives the backlog first and per-host order holds. While the broker is down
the in-flight window stays in the producer, new snapshots accumulate in the spool (bounded: the oldest are
dropped and counted).

A failed delivery (timeout, broker restarted without our producer id, fatal idempotence error) is resent by
a fresh producer, in order, with the records behind it (the producer's rules, shared with every stage).
Delivery is at least once: a record whose acknowledgement was lost in a broker crash can arrive twice, with
the same `seq`, so consumers that care de-duplicate on (host, seq).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from gpuwatch.config import Settings
from gpuwatch.kafka import ReliableProducer
from gpuwatch.producers.spool import Spool

log = logging.getLogger(__name__)


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
        self._max_in_flight = max_in_flight
        self._max_bytes = max_in_flight_bytes
        overrides: dict[str, Any] = {
            "client.id": client_id,
            "linger.ms": 10,
            "reconnect.backoff.max.ms": 2000,
            "queue.buffering.max.messages": max_in_flight + 1000,
            **(producer_config or {}),
        }
        self._producer = ReliableProducer(settings, message_timeout_s=delivery_timeout_s, **overrides)
        # (producer sequence number, spool id, bytes) of each record handed to the producer, oldest first
        self._window: deque[tuple[int, int, int]] = deque()
        self._window_bytes = 0
        # read from the spool but refused by a full local queue: sent first next time
        self._held: tuple[int, bytes, bytes] | None = None

    @property
    def in_flight(self) -> int:
        """Records handed to the producer and not yet acknowledged."""
        return len(self._window)

    @property
    def pending(self) -> int:
        """Records not yet acknowledged by the broker (spooled, in flight or awaiting resend)."""
        return self.spool.pending

    @property
    def sent(self) -> int:
        """Records the broker acknowledged."""
        return self._producer.acknowledged

    @property
    def rejected(self) -> int:
        """Records the broker refused for good (e.g. too large); logged."""
        return self._producer.dropped

    @property
    def delivery_failures(self) -> int:
        """Failed delivery reports (each record is resent)."""
        return self._producer.failures

    @property
    def producer_restarts(self) -> int:
        return self._producer.replaced

    @property
    def broker_up(self) -> bool | None:
        """None until the first delivery report or broker error."""
        return self._producer.broker_up

    @property
    def last_error(self) -> str:
        return self._producer.last_error

    def publish(self, key: str | bytes, value: bytes) -> None:
        """Spools one record (sent by the next `pump()`); never blocks on the broker."""
        self.spool.append(key.encode() if isinstance(key, str) else key, value)

    def pump(self, timeout: float = 0.0) -> None:
        """Serves delivery reports (waiting up to `timeout` s for one), acknowledges, then sends more."""
        self._producer.poll(timeout)
        self._retire()
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
        self._producer.close()
        return done

    def _feed(self) -> None:
        while len(self._window) < self._max_in_flight and self._window_bytes < self._max_bytes:
            record = self._held or self.spool.read_next()
            if record is None:
                return
            rid, key, value = record
            try:
                seq = self._producer.produce(self.topic, key, value)
            except BufferError:
                self._held = record
                return
            self._held = None
            self._window.append((seq, rid, len(value)))
            self._window_bytes += len(value)

    def _retire(self) -> None:
        """Pops the acknowledged prefix of the window and records it in the spool."""
        done_below = self._producer.acknowledged_below()
        upto = -1
        while self._window and self._window[0][0] < done_below:
            _, upto, size = self._window.popleft()
            self._window_bytes -= size
        if upto >= 0:
            self.spool.ack(upto + 1)
