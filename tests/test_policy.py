"""RemediationPolicy as a specification (no servers), then its Redis parts and the sink with real servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.schemas.codecs import decode_remediation, encode_remediation, encode_risk, remediation_id
from gpuwatch.schemas.records import AuditEntry, Remediation, Risk
from gpuwatch.sinks.policy import (
    PolicyRules,
    RedisAuditLog,
    RedisKillSwitch,
    RemediationPolicy,
    read_audit,
    set_killswitch,
)
from gpuwatch.sinks.remediation_sink import run_remediation_sink

T0 = 1_750_000_000.0
RULES = PolicyRules(
    episode_gap_s=600,
    checkpoint_grace_s=60,
    reboot_after_s=600,
    cooldown_s=3600,
    max_concurrent_drains=2,
    drain_hold_s=3600,
    stale_after_s=60,
)
# What the stream decides per record (the operating points live in the model artifact, not in the policy).
QUIET, ALARM, DRAIN, FAILED = "quiet", "alarm", "drain", "failed"


def rec(ts: float, level: str = ALARM, host: str = "node-0001", gpu: int = 3, mode: str = "memory", **kw: Any) -> Risk:
    failed = level == FAILED
    return Risk(host=host, gpu_index=gpu, uuid=kw.get("uuid", f"GPU-{host}-{gpu}"), ts=ts,
                risk=1.0 if failed else {QUIET: 1e-6, ALARM: 2e-3, DRAIN: 0.05}[level], horizon_s=3600.0,
                mode=mode, model="m", scored_at=ts, alarm=level in (ALARM, DRAIN), drain=level == DRAIN,
                failed=failed, op="model:0.658x2",
                failed_since=kw.get("failed_since", ts) if failed else msgspec.UNSET)  # type: ignore[arg-type]


class Harness:
    """A policy fed one record stream at 10 s steps, with `now` equal to the record time (fresh data)."""

    def __init__(self, **overrides: Any) -> None:
        self.audit: list[AuditEntry] = []
        self.kill = False
        self.policy = RemediationPolicy(
            RULES, killswitch=lambda: self.kill, audit=self.audit.extend, **overrides
        )

    def run(self, start: float, end: float, level: str | Callable[[float], str], **kw: Any) -> list[Remediation]:
        events = []
        t = start
        while t <= end:
            lv = level(t) if callable(level) else level
            events += self.policy.observe([rec(T0 + t, lv, **kw)], now=T0 + t)
            t += 10
        return events


def actions(events: list[Remediation]) -> list[tuple[str, float]]:
    return [(e.action, e.ts - T0) for e in events]


def test_the_first_alarm_record_checkpoints_at_once() -> None:
    h = Harness()
    assert h.run(0, 100, QUIET) == []
    [event] = h.run(110, 400, ALARM)
    assert (event.action, event.ts) == ("checkpoint", T0 + 110) and type(event) is Remediation
    assert event.id == remediation_id("node-0001", 3, "GPU-node-0001-3", "checkpoint", T0 + 110)
    assert "operating point model:0.658x2" in event.reason
    assert decode_remediation(encode_remediation(event)) == event  # it honours the wire contract


def test_an_episode_outlives_gaps_shorter_than_episode_gap_s() -> None:
    h = Harness()
    wobble = lambda t: QUIET if int(t) % 50 == 0 else ALARM  # noqa: E731
    assert actions(h.run(0, 700, wobble)) == [("checkpoint", 10)]  # one episode, one checkpoint

    h = Harness(cooldown_s=0)
    h.run(0, 0, ALARM)
    h.run(10, 600, QUIET)  # 600 s without an alarm: the episode ends
    assert [(a.decision, a.reason) for a in h.audit][-1] == ("cleared", "recovered")
    assert actions(h.run(610, 610, ALARM)) == [("checkpoint", 610)]  # a new episode


def test_escalation_goes_checkpoint_then_migrate_then_reboot_on_the_drain_operating_point() -> None:
    h = Harness()
    events = h.run(0, 2000, DRAIN, mode="sudden")
    assert actions(events) == [("checkpoint", 0), ("migrate", 60), ("reboot", 660)]
    assert len({e.id for e in events}) == 3
    assert [a.decision for a in h.audit] == ["acted"] * 3


def test_an_alarm_alone_never_drains() -> None:
    assert actions(Harness().run(0, 3000, ALARM)) == [("checkpoint", 0)]
    h = Harness()
    assert actions(h.run(0, 50, ALARM) + h.run(60, 200, DRAIN)) == [("checkpoint", 0), ("migrate", 60)]


def test_reboot_is_skipped_for_modes_a_reboot_cannot_fix() -> None:
    h = Harness()
    assert [a for a, _ in actions(h.run(0, 2000, DRAIN, mode="power"))] == ["checkpoint", "migrate"]
    [suppressed] = [a for a in h.audit if a.decision == "suppressed"]
    assert (suppressed.action, suppressed.reason) == ("reboot", "reboot_not_useful")


def test_replaying_the_same_records_gives_the_same_ids() -> None:
    first, second = Harness().run(0, 2000, DRAIN), Harness().run(0, 2000, DRAIN)
    assert [e.id for e in first] == [e.id for e in second]


def test_cooldown_blocks_a_new_episode_soon_after_an_action() -> None:
    h = Harness()
    h.run(0, 0, ALARM)  # checkpoint at 0
    h.run(10, 610, QUIET)  # the episode ends at 610
    assert h.run(620, 1000, ALARM) == []  # a new episode, but the cooldown runs to 3600
    assert [(a.decision, a.reason) for a in h.audit][-2:] == [("cleared", "recovered"), ("suppressed", "cooldown")]
    assert actions(h.run(1010, 3600, ALARM)) == [("checkpoint", 3600)]
    assert sum(a.reason == "cooldown" for a in h.audit) == 1  # a suppression is audited once per episode


def test_kill_switch_stops_actions_but_not_observation() -> None:
    h = Harness()
    h.kill = True
    assert h.run(0, 500, ALARM) == []
    assert [(a.decision, a.action, a.reason) for a in h.audit] == [("suppressed", "checkpoint", "killswitch")]
    h.kill = False
    assert actions(h.run(510, 510, ALARM)) == [("checkpoint", 510)]


def test_stale_duplicate_and_out_of_order_records_are_never_acted_on() -> None:
    h = Harness()
    # a backlog of alarm records, all older than stale_after_s: nothing, one audit entry
    for t in range(0, 1000, 10):
        assert h.policy.observe([rec(T0 + t, DRAIN)], now=T0 + 2000) == []
    assert [(a.decision, a.reason) for a in h.audit] == [("suppressed", "stale")]

    h = Harness()
    assert actions(h.run(0, 290, ALARM)) == [("checkpoint", 0)]
    late = h.policy.observe([rec(T0 + 100, DRAIN), rec(T0 + 290, DRAIN)], now=T0 + 300)  # old and duplicate
    assert late == []  # either would have been due to migrate
    assert actions(h.run(300, 300, DRAIN)) == [("migrate", 300)]


def test_a_record_stamped_ahead_of_the_clock_holds_back_none_of_the_next_ones() -> None:
    h = Harness()
    # A node clock 120 s fast: its record counts as now, so the real records after it are not out of order.
    assert actions(h.policy.observe([rec(T0 + 120, DRAIN)], now=T0)) == [("checkpoint", 120)]
    assert actions(h.run(10, 300, DRAIN)) == [("migrate", 60)]  # the grace runs from the checkpoint's now


def test_a_replaced_gpu_starts_a_new_episode() -> None:
    h = Harness(cooldown_s=0)
    h.run(0, 0, ALARM)
    [event] = h.run(10, 20, ALARM, uuid="GPU-new")
    assert (event.uuid, event.ts) == ("GPU-new", T0 + 10)
    assert [(a.decision, a.reason) for a in h.audit if a.decision == "cleared"] == [("cleared", "replaced")]


def test_a_failed_gpu_gets_one_repair_and_no_more_predictions() -> None:
    h = Harness()
    events = h.run(0, 100, DRAIN) + h.run(110, 2000, FAILED, failed_since=T0 + 110)
    assert actions(events) == [("checkpoint", 0), ("migrate", 60), ("repair", 110)]
    assert events[-1].id == remediation_id("node-0001", 3, "GPU-node-0001-3", "repair", T0 + 110)
    assert ("cleared", "failed") in [(a.decision, a.reason) for a in h.audit]
    # repaired, then failed again later: a second repair for the second failure only
    more = h.run(2010, 2100, QUIET) + h.run(2110, 2200, FAILED, failed_since=T0 + 2110)
    assert actions(more) == [("repair", 2110)]


def test_repairs_are_held_by_the_kill_switch_not_by_the_blast_radius() -> None:
    h = Harness(max_concurrent_drains=0)
    assert actions(h.run(0, 50, FAILED, failed_since=T0)) == [("repair", 0)]
    h = Harness()
    h.kill = True
    assert h.run(0, 50, FAILED, failed_since=T0) == []
    assert [(a.action, a.reason) for a in h.audit] == [("repair", "killswitch")]  # audited once
    h.kill = False
    assert actions(h.run(60, 70, FAILED, failed_since=T0)) == [("repair", 60)]


def test_blast_radius_holds_when_100_gpus_go_high_at_once() -> None:
    audit: list[AuditEntry] = []
    policy = RemediationPolicy(RULES, audit=audit.extend)
    gpus = [(f"node-{i:04d}", i % 8) for i in range(100)]
    events: list[dict] = []
    for t in range(0, 2000, 10):
        batch = [rec(T0 + t, DRAIN, host=h, gpu=g) for h, g in gpus]
        events += policy.observe(batch, now=T0 + t)
    by_action = {a: [e for e in events if e.action == a] for a in ("checkpoint", "migrate", "reboot")}
    assert len(by_action["checkpoint"]) == 100
    assert len(by_action["migrate"]) == 2
    assert {e.host for e in by_action["reboot"]} == {e.host for e in by_action["migrate"]}
    assert len(policy.active_drains(T0 + 2000)) == 2
    assert sum(a.reason == "blast_radius" for a in audit) == 98  # once per suppressed GPU

    # a drained GPU's episode ends: its slot goes to the next one
    drained = by_action["migrate"][0]
    quiet = [rec(T0 + 2000 + t, QUIET, host=drained.host, gpu=drained.gpu_index) for t in range(0, 610, 10)]
    policy.observe(quiet, now=T0 + 2600)
    more = policy.observe([rec(T0 + 2610, DRAIN, host=h, gpu=g) for h, g in gpus], now=T0 + 2610)
    assert [e.action for e in more] == ["migrate"]
    assert len(policy.active_drains(T0 + 2610)) == 2


def test_two_gpus_of_one_host_take_one_drain_slot() -> None:
    policy = RemediationPolicy(RULES, max_concurrent_drains=1)
    events: list[dict] = []
    for t in range(0, 800, 10):
        events += policy.observe([rec(T0 + t, DRAIN, gpu=g) for g in (1, 2)], now=T0 + t)
    assert sorted((e.action, e.gpu_index) for e in events if e.action in ("migrate",)) == [
        ("migrate", 1),
        ("migrate", 2),
    ]


def test_rules_are_validated_and_read_from_settings() -> None:
    with pytest.raises(ValueError):
        PolicyRules(max_concurrent_drains=-1)
    rules = PolicyRules.from_settings(Settings(policy_episode_gap_s=120.0, policy_max_concurrent_drains=5))
    assert (rules.episode_gap_s, rules.max_concurrent_drains) == (120.0, 5)


# ------------------------------------------------------------------------------ Redis-backed parts


def test_kill_switch_and_audit_stream_in_redis(redis_client: redis.Redis) -> None:
    switch = RedisKillSwitch(redis_client)
    assert switch() is False
    set_killswitch(redis_client, True, "ops: maintenance window")
    assert switch() is True
    set_killswitch(redis_client, False)
    assert switch() is False

    log = RedisAuditLog(redis_client, maxlen=10)
    policy = RemediationPolicy(RULES, killswitch=switch, audit=log)
    for t in range(0, 2000, 10):
        policy.observe([rec(T0 + t, DRAIN)], now=T0 + t)
    entries = read_audit(redis_client)
    assert [e.action for e in entries] == ["reboot", "migrate", "checkpoint"]
    assert entries[0].id and entries[0].risk == 0.05 and entries[0].decision == "acted"


def test_kill_switch_fails_closed_when_redis_is_unreachable() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    assert RedisKillSwitch(dead)() is True


# ------------------------------------------------------------------------------ the sink, end to end


def test_remediation_sink_publishes_events_for_sustained_risk(
    settings: Settings, redis_client: redis.Redis
) -> None:
    ensure_topics(settings, [settings.topic_risk, settings.topic_remediation])
    seen: list[Remediation] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=run_remediation_sink,
        args=(settings,),
        kwargs={"stop": stop, "on_event": seen.append},
        daemon=True,
    )
    thread.start()
    try:
        producer = make_producer(settings)
        now = time.time()
        for i in range(6):  # 30 s of history (fresh enough): one GPU in alarm from the third record, one quiet
            level = ALARM if i >= 2 else QUIET
            producer.produce(settings.topic_risk, encode_risk(rec(now - 30 + 5 * i, level)), key="node-0001")
            producer.produce(settings.topic_risk, encode_risk(rec(now - 30 + 5 * i, QUIET, gpu=4)), key="node-0001")
        producer.produce(settings.topic_risk, b"not json", key="node-0001")  # skipped, not fatal
        producer.flush(10)
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(15)
    assert [(e.action, e.gpu_index) for e in seen] == [("checkpoint", 3)]

    consumer = Consumer({**settings.kafka_client_config(), "group.id": "test-reader"})
    consumer.assign([TopicPartition(settings.topic_remediation, p, OFFSET_BEGINNING) for p in range(4)])
    got = None
    deadline = time.monotonic() + 10
    while got is None and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            got = msg
    consumer.close()
    assert got is not None and got.key() == b"node-0001"
    assert decode_remediation(got.value()).id == seen[0].id
    assert read_audit(redis_client)[0].id == seen[0].id
