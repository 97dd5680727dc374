"""The controller end to end, with the real broker and redis-server."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import orjson
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from helpers import wait_for

from gpuwatch.config import ConfigError, Settings
from gpuwatch.controller.executors import Executor, Outcome, make_executor
from gpuwatch.controller.executors.dry_run import DryRunExecutor
from gpuwatch.controller.worker import run_controller
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import decode_deadletter, decode_outcome, encode_remediation, remediation_id
from gpuwatch.schemas.fields import Action
from gpuwatch.schemas.records import ClaimInfo, Remediation
from gpuwatch.schemas.records import Outcome as OutcomeRecord
from gpuwatch.schemas.redis_keys import CorruptClaim, decode_claim, encode_claim
from gpuwatch.sinks.policy import set_killswitch


def event(
    action: Action = "migrate", host: str = "node-0003", gpu: int = 5, episode_ts: float = 1_750_000_000.0
) -> Remediation:
    uuid = f"GPU-{host}-{gpu}"
    return Remediation(id=remediation_id(host, gpu, uuid, action, episode_ts), host=host, gpu_index=gpu, uuid=uuid,
                       action=action, reason="risk 0.97 >= 0.85, mode memory", risk=0.97, ts=episode_ts + 360)


class Recording:
    """An executor that remembers what it was asked to do."""

    name = "recording"

    def __init__(self) -> None:
        self.calls: list[Remediation] = []

    def execute(self, ev: Remediation) -> Outcome:
        self.calls.append(ev)
        if ev.action == "reboot":
            raise RuntimeError("BMC unreachable")
        return Outcome(ok=True, detail=f"did {ev.action}")


def read_topic(settings: Settings, topic: str, n: int) -> list[Any]:
    consumer = Consumer({**settings.kafka_client_config(), "group.id": "test-reader"})
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    out: list[Any] = []
    deadline = time.monotonic() + 15
    while len(out) < n and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            out.append(msg)
    consumer.close()
    return out


@pytest.fixture()
def controller(settings: Settings) -> Iterator[tuple[Settings, Recording, list[OutcomeRecord]]]:
    settings = settings.replace(topic_outcomes=settings.topic_remediation + ".outcomes")
    ensure_topics(settings, [settings.topic_remediation, settings.topic_outcomes, settings.topic_deadletter])
    executor = Recording()
    outcomes: list[OutcomeRecord] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=run_controller,
        args=(settings,),
        kwargs={"stop": stop, "executor": executor, "on_outcome": outcomes.append, "poll_timeout_s": 0.05},
        daemon=True,
    )
    thread.start()
    yield settings, executor, outcomes
    stop.set()
    thread.join(15)
    assert not thread.is_alive()


def test_an_event_delivered_twice_executes_once(
    controller: tuple[Settings, Recording, list[OutcomeRecord]], redis_client: redis.Redis
) -> None:
    settings, executor, outcomes = controller
    producer = make_producer(settings)
    ev, other = event(), event("checkpoint", gpu=2)
    for e in (ev, ev, other, ev):
        producer.produce(settings.topic_remediation, encode_remediation(e), key=e.host)
    producer.flush(10)

    wait_for(lambda: len(outcomes) == 2)
    assert sorted(c.id for c in executor.calls) == sorted([ev.id, other.id])
    assert redis_client.exists(k.claim_key(ev.id))
    stored = {key.decode(): v.decode() for key, v in redis_client.hgetall(k.outcome_key(ev.id)).items()}
    assert stored["ok"] == "true" and stored["dry_run"] == "false" and stored["executor"] == "recording"
    assert stored["action"] == "migrate" and float(stored["duration_s"]) >= 0
    assert stored == k.outcome_fields(next(o for o in outcomes if o.id == ev.id))  # the record, as text

    published = [decode_outcome(m.value()) for m in read_topic(settings, settings.topic_outcomes, 2)]
    assert sorted(p.id for p in published) == sorted([ev.id, other.id])
    assert all(p.ok and p.attempt == 1 for p in published)


def test_an_event_due_while_the_kill_switch_is_on_is_recorded_as_skipped_and_never_runs(
    controller: tuple[Settings, Recording, list[OutcomeRecord]], redis_client: redis.Redis
) -> None:
    settings, executor, outcomes = controller
    producer = make_producer(settings)
    held, later = event("checkpoint"), event("migrate", gpu=2)
    # The policy published `held` before the switch went on: it waits on the topic (or in a backlog).
    set_killswitch(redis_client, True, "alice: maintenance")
    producer.produce(settings.topic_remediation, encode_remediation(held), key=held.host)
    producer.flush(10)

    wait_for(lambda: len(outcomes) == 1)
    assert executor.calls == []
    skipped = outcomes[0]
    assert skipped.id == held.id and skipped.ok is False and skipped.dry_run is False
    assert skipped.detail.startswith("skipped: killswitch") and "alice: maintenance" in skipped.detail
    stored = {key.decode(): v.decode() for key, v in redis_client.hgetall(k.outcome_key(held.id)).items()}
    assert stored["ok"] == "false" and stored["detail"] == skipped.detail

    # Clearing the switch does not release what it held back: a redelivery of it is a duplicate.
    set_killswitch(redis_client, False)
    for e in (held, later):
        producer.produce(settings.topic_remediation, encode_remediation(e), key=e.host)
    producer.flush(10)
    wait_for(lambda: len(outcomes) == 2)
    assert [c.id for c in executor.calls] == [later.id] and outcomes[1].ok is True


def test_undecodable_messages_are_dead_lettered_and_a_failing_executor_is_recorded(
    controller: tuple[Settings, Recording, list[OutcomeRecord]], redis_client: redis.Redis
) -> None:
    settings, executor, outcomes = controller
    producer = make_producer(settings)
    bad_action = {**msgspec.to_builtins(event()), "action": "format-disk"}
    producer.produce(settings.topic_remediation, b"\xff\xfe not json", key="node-0003")
    producer.produce(settings.topic_remediation, orjson.dumps(bad_action), key="node-0003")
    producer.produce(settings.topic_remediation, encode_remediation(event("reboot")), key="node-0003")
    producer.flush(10)

    wait_for(lambda: len(outcomes) == 1)
    assert outcomes[0].ok is False and "BMC unreachable" in outcomes[0].detail
    assert [c.action for c in executor.calls] == ["reboot"]
    letters = [decode_deadletter(m.value()) for m in read_topic(settings, settings.topic_deadletter, 2)]
    assert sorted(letter.stage for letter in letters) == ["controller", "controller"]
    assert any("action" in letter.error for letter in letters)


def test_an_event_whose_claim_in_redis_is_corrupt_is_dead_lettered_and_the_controller_goes_on(
    controller: tuple[Settings, Recording, list[OutcomeRecord]], redis_client: redis.Redis
) -> None:
    settings, executor, outcomes = controller
    soon, half, fine = event(gpu=1), event(gpu=2), event(gpu=3)
    claim = {"owner": "other-host:1:abc", "attempt": 1, "claimed_at": time.time(), "done": False}
    redis_client.set(k.claim_key(soon.id), json.dumps({**claim, "lease_until": "soon"}))
    redis_client.set(k.claim_key(half.id), json.dumps({**claim, "attempt": 1.5, "lease_until": time.time()}))
    producer = make_producer(settings)
    for e in (soon, half, fine):
        producer.produce(settings.topic_remediation, encode_remediation(e), key=e.host)
    producer.flush(10)

    wait_for(lambda: len(outcomes) == 1)
    assert [c.id for c in executor.calls] == [fine.id] and outcomes[0].ok is True
    letters = [decode_deadletter(m.value()) for m in read_topic(settings, settings.topic_deadletter, 2)]
    assert sorted(letter.error for letter in letters) == sorted([
        f"claim {k.claim_key(half.id)} in Redis is unreadable: attempt is 1.5, not a whole number; not executed: "
        "delete the key (or fix it) and replay the event from the dead letter",
        f'claim {k.claim_key(soon.id)} in Redis is unreadable: lease_until is "soon", not a number; not '
        "executed: delete the key (or fix it) and replay the event from the dead letter",
    ])
    assert all(letter.stage == "controller" for letter in letters)
    assert json.loads(redis_client.get(k.claim_key(soon.id)))["lease_until"] == "soon"  # left for an operator


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('{"owner": "h:1:t", "lease_until": NaN}', "lease_until is NaN, not a number"),
        ('{"owner": "h:1:t", "done": "yes"}', 'done is "yes", not true or false'),
        ('{"owner": "h:1:t", "attempt": true}', "attempt is true, not a whole number"),
        ('{"owner": "h:1:t", "claimed_at": "10"}', 'claimed_at is "10", not a number'),
        ('{"owner": 5, "attempt": 1}', "owner is 5, not text"),
    ],
)
def test_a_claim_field_of_the_wrong_type_is_corrupt(value: str, error: str) -> None:
    with pytest.raises(CorruptClaim, match=f"^claim K in Redis is unreadable: {error}$"):
        decode_claim("K", value)


def test_claims_of_older_versions_and_null_fields_still_read() -> None:
    assert decode_claim("K", b"h:1 12.5") == ClaimInfo(owner="h:1", claimed_at=12.5)
    assert decode_claim("K", '{"owner": "h:1:t", "claimed_at": null, "lease_until": 20}') == ClaimInfo(
        owner="h:1:t", lease_until=20.0
    )
    assert decode_claim("K", '{"owner": "h:1:t", "attempt": 0, "claimed_at": -5}') == ClaimInfo(
        owner="h:1:t", claimed_at=-5.0
    )  # out of the writer's range but not of the wrong type: read as before


def test_a_claim_reads_back_as_written() -> None:
    claim = ClaimInfo(owner="h:1:t", attempt=2, claimed_at=10.5, lease_until=70.5, done=True)
    value = encode_claim(claim)
    assert json.loads(value) == {"owner": "h:1:t", "attempt": 2, "claimed_at": 10.5, "lease_until": 70.5,
                                 "done": True}  # fmt: skip
    assert decode_claim("K", value) == decode_claim("K", value.encode()) == claim


def test_dry_run_is_the_default_executor(caplog: pytest.LogCaptureFixture) -> None:
    executor = make_executor(Settings())
    assert isinstance(executor, DryRunExecutor) and isinstance(executor, Executor)
    with caplog.at_level(logging.INFO):
        outcome = executor.execute(event())
    assert outcome == Outcome(ok=True, detail=outcome.detail, dry_run=True)
    assert "would drain node-0003 GPU 5" in caplog.text
    with pytest.raises(ConfigError, match="controller_executor"):
        make_executor(Settings(controller_executor="ansible"))
