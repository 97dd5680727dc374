"""The controller: executes remediation events once each, and records how it went.

For each event on `settings.topic_remediation` it claims ``gpuwatch:claim:{id}`` in Redis (SET NX) *before*
acting, so a redelivered or duplicated event (same id) is executed at most once; then it runs the
executor, stores ``gpuwatch:outcome:{id}`` and publishes the outcome to `settings.topic_outcomes`
(future training labels). A crash between claim and outcome leaves a claim with no outcome hash: the
event is not retried automatically (a reboot twice is worse than once too few); operators can see it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis
from confluent_kafka import KafkaException, Message

from gpuwatch import metrics
from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_consumer, make_producer

from ..schemas.codecs import decode_remediation, make_deadletter
from ..sinks import redis_keys as k
from .executors import Executor, Outcome, make_executor

log = logging.getLogger(__name__)

OUTCOME_SCHEMA = "gpuwatch.outcome/1"
STAGE = "controller"

OnOutcome = Callable[[dict[str, Any]], None]


def group_id(settings: Settings) -> str:
    """Consumer group of the controller."""
    return settings.stream_app_id + "-controller"


def _retrying(stop: threading.Event, what: str, call: Callable[[], Any]) -> tuple[bool, Any]:
    """Runs `call` until Redis answers: (True, result), or (False, None) if `stop` is set first."""
    delay, down_since = 0.1, 0.0
    while True:
        try:
            result = call()
            if down_since:
                log.warning("Redis is back after %.1f s; controller resumes", time.monotonic() - down_since)
            return True, result
        except redis.RedisError as exc:  # down, loading, read-only after failover, out of memory
            if not down_since:
                down_since = time.monotonic()
                log.warning("cannot %s (%s); retrying with backoff until Redis answers", what, exc)
        if stop.wait(delay):
            return False, None
        delay = min(delay * 2, 5.0)


def _execute(executor: Executor, event: dict[str, Any]) -> tuple[Outcome, float, float]:
    started = time.time()
    t0 = time.monotonic()
    try:
        outcome = executor.execute(event)
    except Exception as exc:  # an executor bug must not stop the controller; it is recorded as a failure
        log.exception("executor %s failed on %s", executor.name, event["id"])
        outcome = Outcome(ok=False, detail=f"executor raised {type(exc).__name__}: {exc}")
    return outcome, started, time.monotonic() - t0


def outcome_record(
    event: dict[str, Any], executor: str, outcome: Outcome, started_at: float, duration_s: float
) -> dict[str, Any]:
    """The `gpuwatch.outcome/1` record published to `topic_outcomes` (and stored, as strings, in Redis)."""
    return {
        "schema": OUTCOME_SCHEMA,
        "id": event["id"],
        "host": event["host"],
        "gpu_index": event["gpu_index"],
        "uuid": event["uuid"],
        "action": event["action"],
        "risk": event["risk"],
        "event_ts": event["ts"],
        "executor": executor,
        "ok": outcome.ok,
        "dry_run": outcome.dry_run,
        "detail": outcome.detail,
        "started_at": started_at,
        "duration_s": duration_s,
    }


class _Controller:
    def __init__(
        self,
        settings: Settings,
        stop: threading.Event,
        executor: Executor,
        on_outcome: OnOutcome | None,
        redis_client: redis.Redis,
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.executor = executor
        self.on_outcome = on_outcome
        self.redis = redis_client
        self.producer = make_producer(settings)
        self.ttl_ms = max(1, int(settings.controller_claim_ttl_s * 1000))
        self.me = f"{socket.gethostname()}:{os.getpid()}"

    def handle(self, msg: Message) -> bool:
        """Processes one message; False if `stop` was set before it was done (do not commit it)."""
        try:
            event = decode_remediation(msg.value())
        except ValueError as exc:
            raw = make_deadletter(
                msg.value(),
                str(exc),
                topic=msg.topic() or "",
                partition=msg.partition() or 0,
                offset=msg.offset() or 0,
                stage=STAGE,
            )
            self.producer.produce(self.settings.topic_deadletter, raw, key=msg.key())
            log.warning("dead-lettered an undecodable remediation event at offset %s: %s", msg.offset(), exc)
            metrics.DEADLETTERS.labels(STAGE).inc()
            return self.flush()
        claim = f"{self.me} {time.time():.3f}"
        done, claimed = _retrying(
            self.stop,
            "claim a remediation",
            lambda: self.redis.set(k.claim_key(event["id"]), claim, nx=True, px=self.ttl_ms),
        )
        if not done:
            return False
        if not claimed:
            log.info(
                "remediation %s (%s %s GPU %s) already claimed; skipped",
                event["id"],
                event["action"],
                event["host"],
                event["gpu_index"],
            )
            metrics.REMEDIATION_ACTIONS.labels(event["action"], "duplicate").inc()
            return True
        outcome, started_at, duration_s = _execute(self.executor, event)
        result = "dry_run" if outcome.dry_run and outcome.ok else "ok" if outcome.ok else "failed"
        metrics.REMEDIATION_ACTIONS.labels(event["action"], result).inc()
        record = outcome_record(event, self.executor.name, outcome, started_at, duration_s)
        self.producer.produce(self.settings.topic_outcomes, orjson.dumps(record), key=event["host"])
        self.store(record)
        if self.on_outcome is not None:
            try:
                self.on_outcome(record)
            except Exception:
                log.exception("on_outcome callback failed")
        return self.flush()

    def store(self, record: dict[str, Any]) -> None:
        key = k.outcome_key(record["id"])
        fields: dict[Any, Any] = {
            name: ("true" if v else "false") if isinstance(v, bool) else str(v) for name, v in record.items()
        }

        def write() -> None:
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(key, mapping=fields)
            pipe.pexpire(key, self.ttl_ms)
            pipe.execute()

        if not _retrying(self.stop, "record a remediation outcome", write)[0]:
            log.error("outcome of %s not stored in Redis (stopping): %s", record["id"], record)

    def flush(self) -> bool:
        while self.producer.flush(1.0) > 0:
            if self.stop.is_set():
                return False
            log.warning("controller messages not yet acknowledged by Kafka; retrying")
        return True


def run_controller(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    executor: Executor | None = None,
    on_outcome: OnOutcome | None = None,
    redis_client: redis.Redis | None = None,
    poll_timeout_s: float = 0.2,
) -> None:
    """Executes the events of `settings.topic_remediation` until `stop` is set (forever without one).

    `executor` defaults to `make_executor(settings)` (dry-run). `on_outcome(record)` gets each
    `gpuwatch.outcome/1` record after it is published. Undecodable events go to `settings.topic_deadletter`.
    Group: `group_id(settings)`; an offset is committed after its event is handled.
    """
    stop = stop or threading.Event()
    ensure_topics(settings, [settings.topic_remediation, settings.topic_outcomes, settings.topic_deadletter])
    own_redis = redis_client is None
    client = redis_client or redis.Redis.from_url(
        settings.redis_url, socket_timeout=10, socket_connect_timeout=5
    )
    ctl = _Controller(settings, stop, executor or make_executor(settings), on_outcome, client)
    consumer = make_consumer(settings, group_id(settings), **{"enable.auto.commit": False})
    consumer.subscribe([settings.topic_remediation])
    lag = metrics.ConsumerLagProbe(consumer, group_id(settings))
    try:
        while not stop.is_set():
            lag.maybe_update()
            msg = consumer.poll(poll_timeout_s)
            if msg is None:
                continue
            if msg.error() is not None:
                log.warning("consumer error on %s: %s", settings.topic_remediation, msg.error())
                continue
            if not ctl.handle(msg):
                break
            try:
                consumer.commit(message=msg, asynchronous=True)
            except KafkaException as exc:
                log.info("offset commit skipped: %s", exc)
    finally:
        consumer.close()
        ctl.producer.flush(5.0)
        if own_redis:
            client.close()
