"""`BatchLoop`: the one consume -> process -> produce -> commit loop of gpuwatch's Kafka stages.

The rule: **a batch's offsets move only after every output of the batch is acknowledged by Kafka.** The loop
polls a batch, hands it to the stage's `process(batch)`, which decides (no Kafka inside: it returns its
outputs), produces the outputs through a `ReliableProducer`, waits until Kafka acknowledged all of them, runs
what the stage wants done only then (`Processed.then`: callbacks, a claim marked done), and only then commits
the batch's offsets. While the broker is away the loop holds the batch and reads nothing new (back-pressure);
the producer resends what Kafka did not acknowledge, however long the outage lasts, also past the delivery
timeout. Stopped meanwhile, or during `process` (it returns None), the loop commits nothing and ends: the
batch is read again by whoever takes the partitions next. So nothing is lost, and a crash at any point only
repeats work, which every stage's downstream write makes harmless (docs/reliability.md).

The risk sink, the remediation sink, the controller and the agent's command listener run on it; the stream
worker keeps faust's consumer but follows the same rule (streams/app.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, Message

from gpuwatch import metrics
from gpuwatch.config import Settings

from .consumer import commit_batch, make_consumer
from .producer import ReliableProducer, flush_until_acknowledged, produce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One message a stage wants in Kafka."""

    topic: str
    key: bytes | None
    value: bytes


@dataclass
class Processed:
    """What a stage made of one batch: the `outputs` to produce, and `then`, run once Kafka acknowledged every
    one of them and before the offsets are committed; `then` returns False when `stop` was set before it was
    done (the offsets then stay uncommitted)."""

    outputs: list[Output] = field(default_factory=list)
    then: Callable[[], bool] | None = None


Process = Callable[[list[Message]], Processed | None]


class BatchLoop:
    """Consumes `topics` in consumer group `group` and runs `process` on each batch (see the module docstring).

    `process(batch)` gets up to `max_batch` messages (consumer errors are logged and left out) and returns a
    `Processed`, or None when `stop` was set before it was done. `name` labels the logs and, with
    `batch_metrics`, `gpuwatch_batch_size_messages` / `gpuwatch_batch_duration_seconds`; `lag_metrics` exports
    the group's lag. `every_round` runs once per poll, batch or not (periodic upkeep). `producer` defaults to
    a `ReliableProducer` with the delivery timeout of `settings`, closed when the loop ends.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        name: str,
        group: str,
        topics: list[str],
        process: Process,
        producer: ReliableProducer | None = None,
        max_batch: int = 5000,
        poll_timeout_s: float = 0.2,
        every_round: Callable[[], None] | None = None,
        batch_metrics: bool = True,
        lag_metrics: bool = True,
    ) -> None:
        self.settings = settings
        self.name = name
        self.group = group
        self.topics = topics
        self.process = process
        self._own_producer = producer is None
        self.producer = producer or ReliableProducer(settings)
        self.max_batch = max_batch
        self.poll_timeout_s = poll_timeout_s
        self.every_round = every_round
        self.batch_metrics = batch_metrics
        self.lag_metrics = lag_metrics

    def run(self, stop: threading.Event) -> None:
        """Runs until `stop` is set; then closes the consumer and gives the producer 5 s to finish (what is
        still unacknowledged then belongs to a batch whose offsets were not committed)."""
        consumer = make_consumer(self.settings, self.group, **{"enable.auto.commit": False})
        consumer.subscribe(self.topics)
        lag = metrics.ConsumerLagProbe(consumer, self.group) if self.lag_metrics else None
        try:
            while not stop.is_set():
                if lag is not None:
                    lag.maybe_update()
                if self.every_round is not None:
                    self.every_round()
                self.producer.poll(0)  # errors (a broker gone) are seen before the next batch's output
                polled = consumer.consume(num_messages=self.max_batch, timeout=self.poll_timeout_s)
                if polled and not self.handle(polled, stop, consumer):
                    break
        finally:
            consumer.close()
            self.producer.flush(5.0)
            if self._own_producer:
                self.producer.close()

    def handle(self, polled: list[Message], stop: threading.Event, consumer: Consumer) -> bool:
        """Processes one polled batch and commits it; False when `stop` came first (nothing committed)."""
        t0 = time.perf_counter()
        batch = []
        for msg in polled:
            if msg.error() is None:
                batch.append(msg)
            else:
                log.warning("%s: consumer error on %s: %s", self.name, ", ".join(self.topics), msg.error())
        if not batch:
            return True
        done = self.process(batch)
        if done is None:
            return False
        for out in done.outputs:
            produce(self.producer, out.topic, out.key, out.value)
        if not flush_until_acknowledged(self.producer, stop, f"{self.name} output"):
            return False
        if done.then is not None and not done.then():
            return False
        commit_batch(consumer, batch)
        if self.batch_metrics:
            metrics.BATCH_SIZE.labels(self.name).observe(len(batch))
            metrics.BATCH_DURATION.labels(self.name).observe(time.perf_counter() - t0)
        return True
