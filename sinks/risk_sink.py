"""The Redis sink: consumes risk records from Kafka and writes them to Redis with `RiskWriter`.

At-least-once: offsets are committed only after the batch is in Redis and its dead letters are in Kafka
(a `ReliableProducer` resends dead letters not acknowledged, however long the broker is away); a redelivered
record is harmless because the writer drops records that are not newer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from confluent_kafka import Consumer, KafkaException, Message

from gpuwatch import metrics
from gpuwatch.config import Settings
from gpuwatch.kafka import ReliableProducer, ensure_topics, flush_until_acknowledged, make_consumer, produce

from ..schemas.codecs import decode_risk, make_deadletter
from ..schemas.records import Risk
from .redis_writer import RiskWriter

log = logging.getLogger(__name__)

STAGE = "risk-sink"
PRUNE_EVERY_S = 60.0
OnWritten = Callable[[list[Risk], float], None]


def group_id(settings: Settings) -> str:
    """Consumer group of the Redis sink."""
    return settings.stream_app_id + "-redis-sink"


def redis_retryable(exc: redis.RedisError) -> bool:
    """False only for a script error caused by the data (dead-letter the record); every other error,
    Redis down, loading, out of memory, read-only after a failover, auth, is waited out."""
    return not (type(exc) is redis.ResponseError and "@user_script" in str(exc))


class _Sink:
    """One consumer loop; split into methods so each step reads on its own."""

    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        on_written: OnWritten | None,
        redis_client: redis.Redis | None,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.on_written = on_written
        self.redis = redis_client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=10, socket_connect_timeout=5
        )
        self.writer = RiskWriter(
            self.redis, history_len=settings.redis_history_len, expire_after_s=settings.redis_expire_after_s
        )
        self.dlq = ReliableProducer(settings)

    def decode(self, msgs: list[Message]) -> list[tuple[Message, Risk]]:
        out = []
        for msg in msgs:
            if msg.error() is not None:
                log.warning("consumer error on %s: %s", self.settings.topic_risk, msg.error())
                continue
            try:
                out.append((msg, decode_risk(msg.value())))
            except ValueError as exc:
                self.dead_letter(msg, str(exc))
        return out

    def dead_letter(self, msg: Message, error: str, stage: str = STAGE) -> None:
        raw = make_deadletter(
            msg.value(),
            error,
            topic=msg.topic() or "",
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            stage=stage,
        )
        produce(self.dlq, self.settings.topic_deadletter, msg.key(), raw)
        metrics.DEADLETTERS.labels(stage).inc()

    def write(self, batch: list[tuple[Message, Risk]]) -> bool:
        """Writes until Redis takes the batch (True) or `stop` is set while it is down (False)."""
        records = [rec for _, rec in batch]
        delay, down_since = 0.1, 0.0
        while True:
            try:
                self.writer.write_batch(records)
                if down_since:
                    log.warning(
                        "Redis is back after %.1f s; risk sink resumes", time.monotonic() - down_since
                    )
                return True
            except redis.RedisError as exc:
                if not redis_retryable(exc):
                    self.write_one_by_one(batch)
                    return True
                if not down_since:
                    down_since = time.monotonic()
                    log.warning("Redis write failed (%s); retrying with backoff until it answers", exc)
            if self.stop.wait(delay):
                return False
            delay = min(delay * 2, 5.0)

    def write_one_by_one(self, batch: list[tuple[Message, Risk]]) -> None:
        # A record Redis rejects (not an outage) must not block the partition forever: dead-letter it.
        for msg, rec in batch:
            try:
                self.writer.write_batch([rec])
            except redis.RedisError as exc:
                if redis_retryable(exc):
                    raise
                self.dead_letter(msg, f"Redis rejected the record: {exc}", stage=STAGE + "/redis")

    def flush_dead_letters(self) -> bool:
        """Waits until every dead letter is acknowledged (True), or `stop` is set first (False)."""
        return flush_until_acknowledged(self.dlq, self.stop, "dead letters")

    def prune(self) -> None:
        try:
            removed = self.writer.prune()
            if removed:
                log.info("forgot %d GPUs with no risk record for %.0f s", removed, self.writer.expire_after_s)
        except redis.RedisError as exc:
            log.debug("prune skipped: %s", exc)


def _commit(consumer: Consumer) -> None:
    try:
        consumer.commit(asynchronous=True)
    except KafkaException as exc:  # e.g. a rebalance took the partitions: they will be redelivered
        log.info("offset commit skipped: %s", exc)


def run_risk_sink(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_written: OnWritten | None = None,
    max_batch: int = 5000,
    redis_client: redis.Redis | None = None,
    poll_timeout_s: float = 0.05,  # how long a record may wait for its batch to fill: part of the latency to Redis
) -> None:
    """Consumes `settings.topic_risk` into Redis until `stop` is set (forever without one).

    Group: `group_id(settings)`. Undecodable records go to `settings.topic_deadletter`. After each batch is
    in Redis, `on_written(records, written_at)` gets the batch's decoded records (including those Redis
    already had newer) and the wall-clock time the write returned. While Redis is down the loop retries
    with backoff (logging once per outage) and commits nothing. `redis_client` overrides `settings.redis_url`.
    """
    stop = stop or threading.Event()
    ensure_topics(settings, [settings.topic_risk, settings.topic_deadletter])
    sink = _Sink(settings, stop, on_written, redis_client)
    consumer = make_consumer(settings, group_id(settings), **{"enable.auto.commit": False})
    consumer.subscribe([settings.topic_risk])
    next_prune = time.monotonic() + PRUNE_EVERY_S
    metrics.FLEET_RISK.configure(
        fresh_for_s=settings.stale_after_s, forget_after_s=settings.redis_expire_after_s
    )
    lag = metrics.ConsumerLagProbe(consumer, group_id(settings))
    try:
        while not stop.is_set():
            msgs = consumer.consume(num_messages=max_batch, timeout=poll_timeout_s)
            t0 = time.perf_counter()
            batch = sink.decode(msgs)
            if batch:
                if not sink.write(batch):
                    break  # stopped during an outage: leave the offsets for the next run
                records = [rec for _, rec in batch]
                metrics.RISK_RECORDS_WRITTEN.inc(len(records))
                metrics.FLEET_RISK.update(records)
                if on_written is not None:
                    try:
                        on_written(records, time.time())
                    except Exception:
                        log.exception("on_written callback failed")
            if msgs:
                if not sink.flush_dead_letters():
                    break
                _commit(consumer)
                metrics.BATCH_SIZE.labels(STAGE).observe(len(msgs))
                metrics.BATCH_DURATION.labels(STAGE).observe(time.perf_counter() - t0)
            lag.maybe_update()
            if time.monotonic() >= next_prune:
                sink.prune()
                next_prune = time.monotonic() + PRUNE_EVERY_S
    finally:
        consumer.close()
        sink.dlq.flush(5.0)
        if redis_client is None:
            sink.redis.close()
