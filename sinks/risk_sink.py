"""The Redis sink: consumes risk records from Kafka and writes them to Redis with `RiskWriter`.

Runs on `BatchLoop` (gpuwatch/kafka/loop.py): offsets are committed only after the batch is in Redis and its
dead letters are acknowledged by Kafka (resent however long the broker is away); a redelivered record is
harmless because the writer drops records that are not newer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from confluent_kafka import Message

from gpuwatch import metrics
from gpuwatch.config import Settings
from gpuwatch.kafka import BatchLoop, Output, Processed, ensure_topics
from gpuwatch.redis_backoff import until_redis_answers

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
    """What the sink does with one batch (`process`, run by a `BatchLoop`); a method per step."""

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
        self.letters: list[Output] = []  # the current batch's dead letters
        self.next_prune = time.monotonic() + PRUNE_EVERY_S

    def process(self, msgs: list[Message]) -> Processed | None:
        """Decodes the batch and writes it to Redis; returns its dead letters, or None if `stop` was set while
        Redis was down."""
        self.letters = []
        batch = self.decode(msgs)
        if batch:
            if not self.write(batch):
                return None  # stopped during an outage: leave the offsets for the next run
            records = [rec for _, rec in batch]
            metrics.RISK_RECORDS_WRITTEN.inc(len(records))
            metrics.FLEET_RISK.update(records)
            if self.on_written is not None:
                try:
                    self.on_written(records, time.time())
                except Exception:
                    log.exception("on_written callback failed")
        return Processed(outputs=self.letters)

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
        self.letters.append(Output(self.settings.topic_deadletter, msg.key(), raw))
        metrics.DEADLETTERS.labels(stage).inc()

    def write(self, batch: list[tuple[Message, Risk]]) -> bool:
        """Writes until Redis takes the batch (True) or `stop` is set while it is down (False)."""
        records = [rec for _, rec in batch]
        letters = len(self.letters)

        def write() -> None:
            del self.letters[letters:]  # a retry after a failed one-by-one write starts over
            try:
                self.writer.write_batch(records)
            except redis.RedisError as exc:
                if redis_retryable(exc):
                    raise
                self.write_one_by_one(batch)

        ok, _ = until_redis_answers(self.stop, "write risk records to Redis", write)
        return ok

    def write_one_by_one(self, batch: list[tuple[Message, Risk]]) -> None:
        # A record Redis rejects (not an outage) must not block the partition forever: dead-letter it.
        for msg, rec in batch:
            try:
                self.writer.write_batch([rec])
            except redis.RedisError as exc:
                if redis_retryable(exc):
                    raise
                self.dead_letter(msg, f"Redis rejected the record: {exc}", stage=STAGE + "/redis")

    def maybe_prune(self) -> None:
        if time.monotonic() >= self.next_prune:
            self.prune()
            self.next_prune = time.monotonic() + PRUNE_EVERY_S

    def prune(self) -> None:
        try:
            removed = self.writer.prune()
            if removed:
                log.info("forgot %d GPUs with no risk record for %.0f s", removed, self.writer.expire_after_s)
        except redis.RedisError as exc:
            log.debug("prune skipped: %s", exc)


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
    metrics.FLEET_RISK.configure(
        fresh_for_s=settings.stale_after_s, forget_after_s=settings.redis_expire_after_s
    )
    loop = BatchLoop(settings, name=STAGE, group=group_id(settings), topics=[settings.topic_risk],
                     process=sink.process, max_batch=max_batch, poll_timeout_s=poll_timeout_s,
                     every_round=sink.maybe_prune)  # fmt: skip
    try:
        loop.run(stop)
    finally:
        if redis_client is None:
            sink.redis.close()
