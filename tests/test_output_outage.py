"""What the remediation sink, the risk sink (its dead letters) and the controller publish survives a broker
outage longer than the delivery timeout: the batch is held and resent, and nothing downstream of it (on_event,
the next batch, on_outcome, the outcome in Redis, the input's offsets) moves before Kafka has acknowledged it.

A real broker (Tansu) is stopped for several delivery timeouts while an output is on its way, then started
again on the same port. Tansu keeps everything in memory, so the restarted broker has forgotten every topic:
the test creates the topics again and reads the output topic from its start (what arrived after the outage).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import redis
from helpers import wait_for

from gpuwatch.config import Settings
from gpuwatch.controller.executors import Outcome
from gpuwatch.controller.worker import run_controller
from gpuwatch.embedded import EmbeddedServer, start_kafka
from gpuwatch.kafka import ensure_topics, make_producer, read_partitions_to_end
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import decode_deadletter, encode_remediation, encode_risk, remediation_id
from gpuwatch.schemas.records import Outcome as OutcomeRecord
from gpuwatch.schemas.records import Remediation, Risk
from gpuwatch.sinks.policy import PolicyRules, RedisKillSwitch, RemediationPolicy
from gpuwatch.sinks.remediation_sink import run_remediation_sink
from gpuwatch.sinks.risk_sink import run_risk_sink

DELIVERY_TIMEOUT_S = 1.0
# Several delivery timeouts: a bare producer has reported the message lost (and moved on) long before.
OUTAGE_S = 4 * DELIVERY_TIMEOUT_S
PARTITIONS = 2


@pytest.fixture()
def brokers() -> Iterator[list[EmbeddedServer]]:
    """A broker this test stops and starts again; every incarnation is stopped at the end."""
    servers = [start_kafka()]
    yield servers
    for server in servers:
        server.stop(timeout=1.0)  # Tansu waits out connected clients on SIGTERM; killed after 1 s


def _settings(broker: EmbeddedServer, redis_server: EmbeddedServer) -> Settings:
    return Settings(kafka_bootstrap=broker.url, redis_url=redis_server.url, partitions=PARTITIONS,
                    kafka_delivery_timeout_s=DELIVERY_TIMEOUT_S)  # fmt: skip


def _broker_away(brokers: list[EmbeddedServer], release: threading.Event) -> None:
    """Stops the broker (killed if it has not exited in 0.5 s, as a crash), lets the held output go, and keeps
    the broker away for OUTAGE_S."""
    brokers[-1].stop(timeout=0.5)
    release.set()
    time.sleep(OUTAGE_S)


def _broker_back(brokers: list[EmbeddedServer], settings: Settings, topics: list[str]) -> None:
    """An empty broker on the same port, with `topics` created again."""
    brokers.append(start_kafka(port=brokers[0].port))
    ensure_topics(settings, topics)


def _read(settings: Settings, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(v) for _, v in read_partitions_to_end(settings, topic, list(range(PARTITIONS)))]


def _risk(ts: float, alarm: bool, host: str = "node-0001", gpu: int = 3) -> Risk:
    return Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=2e-3 if alarm else 1e-6,
                horizon_s=3600.0, mode="memory", model="m", scored_at=ts, alarm=alarm, op="model:0.658x2")


class _HeldPolicy(RemediationPolicy):
    """The real policy, holding the first batch that decides something until the test releases it."""

    def __init__(self, settings: Settings, redis_client: redis.Redis) -> None:
        super().__init__(PolicyRules.from_settings(settings), killswitch=RedisKillSwitch(redis_client))
        self.holding = threading.Event()
        self.release = threading.Event()

    def observe(self, records: Sequence[Risk], now: float) -> list[Remediation]:
        events = super().observe(records, now)
        if events and not self.holding.is_set():
            self.holding.set()
            self.release.wait(60)
        return events


def _start_remediation_sink(
    settings: Settings, redis_client: redis.Redis
) -> tuple[threading.Thread, threading.Event, _HeldPolicy, list[Remediation]]:
    """A remediation sink whose policy holds its checkpoint decision: (thread, stop, policy, events seen)."""
    ensure_topics(settings, [settings.topic_risk, settings.topic_remediation])
    policy = _HeldPolicy(settings, redis_client)
    seen: list[Remediation] = []
    stop = threading.Event()
    sink = threading.Thread(target=run_remediation_sink, args=(settings,),
                            kwargs={"stop": stop, "on_event": seen.append, "policy": policy})  # fmt: skip
    sink.start()
    producer = make_producer(settings)
    now = time.time()
    for i in range(6):  # 30 s of history, in alarm from the third record: one checkpoint
        producer.produce(settings.topic_risk, encode_risk(_risk(now - 30 + 5 * i, i >= 2)), key="node-0001")
    producer.flush(10)
    return sink, stop, policy, seen


def test_a_remediation_event_outlives_an_outage_longer_than_the_delivery_timeout(
    brokers: list[EmbeddedServer], redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    settings = _settings(brokers[0], redis_server)
    sink, stop, policy, seen = _start_remediation_sink(settings, redis_client)
    try:
        wait_for(policy.holding.is_set, 30, "the policy's checkpoint decision")

        _broker_away(brokers, policy.release)
        assert seen == [], "on_event fired for an event Kafka never acknowledged"
        _broker_back(brokers, settings, [settings.topic_risk, settings.topic_remediation])

        wait_for(lambda: seen, 60, "the event to be acknowledged after the outage")
        published = _read(settings, settings.topic_remediation)
    finally:
        stop.set()
        policy.release.set()
        sink.join(30)
    assert not sink.is_alive()
    assert [(e.action, e.gpu_index) for e in seen] == [("checkpoint", 3)]  # once, not once per resend
    assert [e["id"] for e in published] == [seen[0].id]


def test_a_remediation_sink_stopped_during_the_outage_reports_nothing_and_ends(
    brokers: list[EmbeddedServer], redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    settings = _settings(brokers[0], redis_server)
    sink, stop, policy, seen = _start_remediation_sink(settings, redis_client)
    try:
        wait_for(policy.holding.is_set, 30, "the policy's checkpoint decision")
        _broker_away(brokers, policy.release)
    finally:
        stop.set()
        policy.release.set()
        sink.join(30)
    assert not sink.is_alive()
    assert seen == []  # and its offsets stay uncommitted: the next sink decides again (same event id)


def test_a_dead_letter_of_the_risk_sink_outlives_an_outage_longer_than_the_delivery_timeout(
    brokers: list[EmbeddedServer], redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    settings = _settings(brokers[0], redis_server)
    ensure_topics(settings, [settings.topic_risk, settings.topic_deadletter])
    producer = make_producer(settings)
    now = time.time()
    # One partition, offsets 0 to 2, all fetched together: a record, garbage, a record.
    for value in (encode_risk(_risk(now - 1, False)), b"not json", encode_risk(_risk(now, False))):
        producer.produce(settings.topic_risk, value, key="node-0001")
    producer.flush(10)
    written: list[list[Risk]] = []
    holding, release = threading.Event(), threading.Event()

    def on_written(records: list[Risk], _at: float) -> None:
        written.append(records)
        holding.set()
        release.wait(60)  # only the first batch waits: release stays set

    stop = threading.Event()
    sink = threading.Thread(target=run_risk_sink, args=(settings,),
                            kwargs={"stop": stop, "on_written": on_written, "max_batch": 1,
                                    "redis_client": redis_client})  # fmt: skip
    sink.start()
    try:
        wait_for(holding.is_set, 30, "the first record in Redis")
        _broker_away(brokers, release)  # the garbage is dead-lettered into a broker that is away
        assert len(written) == 1, "the sink went on past a dead letter Kafka never acknowledged"
        _broker_back(brokers, settings, [settings.topic_risk, settings.topic_deadletter])

        # The new broker forgot the third record; a fresh one shows the sink went on after the dead letter.
        producer = make_producer(settings)
        producer.produce(settings.topic_risk, encode_risk(_risk(now + 1, False)), key="node-0001")
        assert producer.flush(10) == 0
        wait_for(lambda: [r for batch in written for r in batch if r.ts == now + 1], 60, "a record after the outage")
        letters = [decode_deadletter(v) for _, v in
                   read_partitions_to_end(settings, settings.topic_deadletter, list(range(PARTITIONS)))]  # fmt: skip
    finally:
        stop.set()
        release.set()
        sink.join(30)
    assert not sink.is_alive()
    assert [(d.stage, d.source.offset) for d in letters] == [("risk-sink", 1)]


class _HeldExecutor:
    """Executes (a dry run) once the test releases it."""

    name = "held"

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()

    def execute(self, event: Remediation) -> Outcome:
        self.holding.set()
        self.release.wait(60)
        return Outcome(ok=True, detail=f"would {event.action}", dry_run=True)


def test_a_controller_outcome_outlives_an_outage_longer_than_the_delivery_timeout(
    brokers: list[EmbeddedServer], redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    settings = _settings(brokers[0], redis_server)
    topics = [settings.topic_remediation, settings.topic_outcomes, settings.topic_deadletter]
    ensure_topics(settings, topics)
    host, gpu, uuid, episode_ts = "node-0003", 5, "GPU-node-0003-5", time.time() - 60
    event = Remediation(id=remediation_id(host, gpu, uuid, "migrate", episode_ts), host=host, gpu_index=gpu,
                        uuid=uuid, action="migrate", reason="risk 0.97 >= 0.85, mode memory", risk=0.97,
                        ts=episode_ts + 30)
    executor = _HeldExecutor()
    outcomes: list[OutcomeRecord] = []
    stop = threading.Event()
    controller = threading.Thread(target=run_controller, args=(settings,),
                                  kwargs={"stop": stop, "executor": executor, "on_outcome": outcomes.append,
                                          "redis_client": redis_client})  # fmt: skip
    controller.start()
    try:
        producer = make_producer(settings)
        producer.produce(settings.topic_remediation, encode_remediation(event), key=host)
        producer.flush(10)
        wait_for(executor.holding.is_set, 30, "the executor to run")

        _broker_away(brokers, executor.release)
        assert outcomes == [], "on_outcome fired for an outcome Kafka never acknowledged"
        assert not redis_client.exists(k.outcome_key(event.id)), "the claim was done before Kafka had it"
        _broker_back(brokers, settings, topics)

        wait_for(lambda: outcomes, 60, "the outcome to be acknowledged after the outage")
        published = _read(settings, settings.topic_outcomes)
    finally:
        stop.set()
        executor.release.set()
        controller.join(30)
    assert not controller.is_alive()
    assert [(o.id, o.ok, o.dry_run) for o in outcomes] == [(event.id, True, True)]
    assert [o["id"] for o in published] == [event.id]
    assert redis_client.hget(k.outcome_key(event.id), "ok") == b"true"
