"""The remediation sink: consumes risk records, runs `RemediationPolicy`, publishes remediation events.

Runs on `BatchLoop` (gpuwatch/kafka/loop.py): events go to `settings.topic_remediation` keyed by host, and
offsets are committed only once Kafka has acknowledged every event of the batch. While the broker is away the
loop holds the batch and resends what was not acknowledged, however long the outage lasts (longer than the
delivery timeout too); stopped meanwhile, it commits nothing, so the records are read again. Undecodable risk records
are skipped here (the Redis sink, which reads the same topic, dead-letters them) and counted in the log.
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

from ..schemas.codecs import decode_risk, encode_remediation
from ..schemas.records import Remediation
from .guard_state import RedisGuardState
from .policy import PolicyRules, RedisAuditLog, RedisKillSwitch, RemediationPolicy

log = logging.getLogger(__name__)

OnEvent = Callable[[Remediation], None]


def group_id(settings: Settings) -> str:
    """Consumer group of the remediation sink."""
    return settings.stream_app_id + "-remediation"


def make_policy(settings: Settings, redis_client: redis.Redis) -> RemediationPolicy:
    """The policy with rules from `settings`, the Redis kill switch, audit stream and guard rails' state, its trips
    counted in `gpuwatch_policy_trips_total`."""
    return RemediationPolicy(
        PolicyRules.from_settings(settings),
        killswitch=RedisKillSwitch(redis_client),
        audit=RedisAuditLog(redis_client, maxlen=settings.audit_maxlen),
        guards=RedisGuardState(redis_client),
        on_trip=lambda guard: metrics.POLICY_TRIPS.labels(guard).inc(),
    )


def export_guards(policy: RemediationPolicy) -> None:
    """The policy's view of the guard rails as Prometheus gauges."""
    view = policy.guard_view
    metrics.export_policy_guards(
        breaker_open=view.breaker is not None and policy.rules.breaker_share > 0,
        incident=view.incident is not None and policy.rules.max_unhealthy_hosts > 0,
        fleet_hosts=view.fleet_hosts,
        unhealthy_hosts=view.unhealthy_hosts,
        escalated_hosts=len(view.escalated) if policy.rules.escalate_after else 0,
    )


def run_remediation_sink(
    settings: Settings,
    *,
    stop: threading.Event | None = None,
    on_event: OnEvent | None = None,
    policy: RemediationPolicy | None = None,
    redis_client: redis.Redis | None = None,
    max_batch: int = 5000,
    poll_timeout_s: float = 0.2,
) -> None:
    """Runs the policy over `settings.topic_risk` until `stop` is set (forever without one).

    Group: `group_id(settings)`. `on_event(event)` is called for each remediation event once Kafka has
    acknowledged every event of its batch. `policy` overrides the one built by `make_policy` (then `redis_client` is unused
    unless given); `redis_client` overrides `settings.redis_url`.
    """
    stop = stop or threading.Event()
    ensure_topics(settings, [settings.topic_risk, settings.topic_remediation])
    own_redis = redis_client is None and policy is None
    if policy is None:
        redis_client = redis_client or redis.Redis.from_url(
            settings.redis_url, socket_timeout=10, socket_connect_timeout=5
        )
        policy = make_policy(settings, redis_client)
    stage = _RemediationStage(settings, policy, on_event)
    loop = BatchLoop(settings, name="remediation-sink", group=group_id(settings), topics=[settings.topic_risk],
                     process=stage.process, max_batch=max_batch, poll_timeout_s=poll_timeout_s)  # fmt: skip
    try:
        loop.run(stop)
    finally:
        if own_redis and redis_client is not None:
            redis_client.close()


class _RemediationStage:
    """The policy over one batch of risk records (`process`, run by a `BatchLoop`)."""

    def __init__(self, settings: Settings, policy: RemediationPolicy, on_event: OnEvent | None) -> None:
        self.settings = settings
        self.policy = policy
        self.on_event = on_event
        self.bad = 0

    def process(self, msgs: list[Message]) -> Processed:
        """The batch's remediation events; `on_event` sees them once Kafka acknowledged all of them."""
        settings = self.settings
        records = []
        for msg in msgs:
            try:
                records.append(decode_risk(msg.value()))
            except ValueError:
                self.bad += 1
                if self.bad in (1, 10, 100) or self.bad % 1000 == 0:
                    log.warning("skipped %d undecodable risk records so far", self.bad)
        events = self.policy.observe(records, time.time())
        export_guards(self.policy)
        outputs = [
            Output(settings.topic_remediation, event.host.encode(), encode_remediation(event))
            for event in events
        ]

        def acknowledged() -> bool:
            for event in events:
                metrics.REMEDIATION_EVENTS.labels(event.action).inc()
                if self.on_event is not None:
                    try:
                        self.on_event(event)
                    except Exception:
                        log.exception("on_event callback failed")
            return True

        return Processed(outputs, then=acknowledged if events else None)
