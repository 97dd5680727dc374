"""What the remediation sink, the risk sink (its dead letters), the controller and the agent's command
listener publish survives a broker outage longer than the delivery timeout: the batch is held and resent, and
nothing downstream of it (on_event, the next batch, on_outcome, the outcome in Redis, the input's offsets)
moves before Kafka has acknowledged it. They all run on `gpuwatch.kafka.BatchLoop`.

A real broker (Tansu) is stopped for several delivery timeouts while an output is on its way, then started
again on the same port. Tansu keeps everything in memory, so the restarted broker has forgotten every topic:
the test creates the topics again and reads the output topic from its start (what arrived after the outage).
The last test freezes the broker instead (SIGSTOP, as a network partition would: it keeps its log), so the
offsets committed during the outage can be read afterwards.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer, Message, TopicPartition
from helpers import wait_for

from gpuwatch.config import Settings
from gpuwatch.controller.executors import Outcome
from gpuwatch.controller.worker import run_controller
from gpuwatch.embedded import EmbeddedServer, start_kafka
from gpuwatch.kafka import BatchLoop, Output, Processed, ensure_topics, make_producer, read_partitions_to_end
from gpuwatch.producers.commands import CommandListener, Handled
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import decode_deadletter, encode_remediation, encode_risk, remediation_id
from gpuwatch.schemas.fields import COMMAND_SCHEMA
from gpuwatch.schemas.records import Command, Remediation, Risk
from gpuwatch.schemas.records import Outcome as OutcomeRecord
from gpuwatch.signing import MemoryNonceStore, sign
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


def test_a_command_ack_of_the_agent_outlives_an_outage_longer_than_the_delivery_timeout(
    brokers: list[EmbeddedServer], redis_server: EmbeddedServer
) -> None:
    settings = _settings(brokers[0], redis_server)
    topics = [settings.topic_commands, settings.topic_outcomes]
    ensure_topics(settings, topics)
    host, key = "node-0007", b"controller-key-for-the-outage"
    holding, release = threading.Event(), threading.Event()

    def handler(command: Command) -> Handled:
        holding.set()
        release.wait(60)
        return Handled(True, "checkpoint requested")

    nonces = MemoryNonceStore()
    listener = CommandListener(settings, host, keys=[key], seen_nonce_store=nonces, handler=handler)
    stop = threading.Event()
    agent = threading.Thread(target=listener.run, args=(stop,), kwargs={"poll_timeout_s": 0.1})
    agent.start()
    command = sign({"schema": COMMAND_SCHEMA, "id": "c-1", "host": host, "gpu_index": 2, "uuid": "GPU-2",
                    "action": "checkpoint", "reason": "alarm", "risk": 0.5}, key)  # fmt: skip
    try:
        producer = make_producer(settings)
        producer.produce(settings.topic_commands, orjson.dumps(command), key=host)
        producer.flush(10)
        wait_for(holding.is_set, 30, "the command to be handled")

        _broker_away(brokers, release)  # its ack goes to a broker that is away
        _broker_back(brokers, settings, topics)

        acks = wait_for(lambda: _read(settings, settings.topic_outcomes), 60, "the ack after the outage")
    finally:
        stop.set()
        release.set()
        agent.join(30)
    assert not agent.is_alive()
    assert [(a["id"], a["accepted"], a["ok"]) for a in acks] == [("c-1", True, True)]


class _HeldLoop(BatchLoop):
    """Echoes its input to `out`, holding the batch that carries `hold` until released; notes a batch given up."""

    def __init__(self, settings: Settings, hold: bytes = b"") -> None:
        super().__init__(settings, name="echo", group="echo-group", topics=["loop.in"], process=self.echo,
                         poll_timeout_s=0.1, batch_metrics=False, lag_metrics=False)  # fmt: skip
        self.hold = hold
        self.holding, self.release, self.gave_up = threading.Event(), threading.Event(), threading.Event()

    def echo(self, batch: list[Message]) -> Processed:
        if self.hold and any(m.value() == self.hold for m in batch):
            self.holding.set()
            self.release.wait(60)
        return Processed([Output("loop.out", m.key(), m.value() or b"") for m in batch])

    def handle(self, polled: list[Message], stop: threading.Event, consumer: Consumer) -> bool:
        done = super().handle(polled, stop, consumer)
        if not done:
            self.gave_up.set()
        return done


def _committed(settings: Settings) -> int:
    consumer = Consumer({**settings.kafka_client_config(), "group.id": "echo-group"})
    try:
        return int(consumer.committed([TopicPartition("loop.in", 0)], timeout=10)[0].offset)
    finally:
        consumer.close()


def test_a_batch_loop_stopped_during_an_outage_commits_nothing_and_its_successor_delivers_the_batch(
    brokers: list[EmbeddedServer],
) -> None:
    broker = brokers[0]
    settings = Settings(kafka_bootstrap=broker.url, partitions=1, kafka_delivery_timeout_s=DELIVERY_TIMEOUT_S)
    ensure_topics(settings, ["loop.in", "loop.out"])
    producer = make_producer(settings)
    first, stop = _HeldLoop(settings, hold=b"b"), threading.Event()
    runner = threading.Thread(target=first.run, args=(stop,))
    runner.start()
    frozen = False
    try:
        producer.produce("loop.in", b"a")
        producer.flush(10)
        wait_for(lambda: _committed(settings) == 1, 30, "the first batch committed")
        producer.produce("loop.in", b"b")
        producer.flush(10)
        wait_for(first.holding.is_set, 30, "the second batch")

        os.kill(broker.proc.pid, signal.SIGSTOP)  # frozen: its connections hang, its log is kept
        frozen = True
        first.release.set()
        time.sleep(OUTAGE_S)  # the echo of b is not acknowledged: the loop holds the batch
        assert runner.is_alive()
        stop.set()
        wait_for(first.gave_up.is_set, 10, "the loop to give the batch up")
    finally:
        first.release.set()
        stop.set()
        if frozen:
            os.kill(broker.proc.pid, signal.SIGCONT)
        runner.join(30)
    assert not runner.is_alive()
    assert _committed(settings) == 1  # b was not committed: its output was not acknowledged

    second, stop = _HeldLoop(settings), threading.Event()
    runner = threading.Thread(target=second.run, args=(stop,))
    runner.start()
    try:
        wait_for(lambda: _committed(settings) == 2, 30, "the successor to commit b")
    finally:
        stop.set()
        runner.join(30)
    echoed = [v for _, v in read_partitions_to_end(settings, "loop.out", [0])]
    assert echoed[0] == b"a" and set(echoed[1:]) == {b"b"}  # at least once: b may be there twice
