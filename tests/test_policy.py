"""RemediationPolicy as a specification (no servers), then its Redis parts and the sink with real servers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from redis.backoff import NoBackoff
from redis.retry import Retry

from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.schemas.codecs import decode_remediation, encode_risk, remediation_id
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
    threshold=0.85,
    for_s=300,
    clear_below=0.7,
    migrate_after_s=300,
    checkpoint_grace_s=60,
    migrate_risk=0.95,
    reboot_after_s=600,
    cooldown_s=3600,
    max_concurrent_drains=2,
    drain_hold_s=3600,
    stale_after_s=60,
)


def rec(
    ts: float, risk: float, host: str = "node-0001", gpu: int = 3, mode: str = "memory", **kw: Any
) -> dict:
    return {
        "schema": "gpuwatch.risk/1",
        "host": host,
        "gpu_index": gpu,
        "uuid": kw.get("uuid", f"GPU-{host}-{gpu}"),
        "ts": ts,
        "risk": risk,
        "horizon_s": 3600.0,
        "mode": mode,
        "model": "m",
        "scored_at": ts,
    }


class Harness:
    """A policy fed one record stream at 10 s steps, with `now` equal to the record time (fresh data)."""

    def __init__(self, **overrides: Any) -> None:
        self.audit: list[dict] = []
        self.kill = False
        self.policy = RemediationPolicy(
            RULES, killswitch=lambda: self.kill, audit=self.audit.extend, **overrides
        )

    def run(self, start: float, end: float, risk: float | Callable[[float], float], **kw: Any) -> list[dict]:
        events = []
        t = start
        while t <= end:
            r = risk(t) if callable(risk) else risk
            events += self.policy.observe([rec(T0 + t, r, **kw)], now=T0 + t)
            t += 10
        return events


def actions(events: list[dict]) -> list[tuple[str, float]]:
    return [(e["action"], e["ts"] - T0) for e in events]


def test_checkpoint_only_after_risk_stays_high_for_the_for_duration() -> None:
    h = Harness()
    assert h.run(0, 290, 0.9) == []
    [event] = h.run(300, 300, 0.9)
    assert event["action"] == "checkpoint" and event["schema"] == "gpuwatch.remediation/1"
    assert event["id"] == remediation_id("node-0001", 3, "GPU-node-0001-3", "checkpoint", T0)
    assert decode_remediation(orjson.dumps(event)) == event  # it honours the wire contract


def test_hysteresis_keeps_the_episode_between_clear_below_and_threshold() -> None:
    h = Harness()
    # dips to 0.75 (< threshold, >= clear_below) do not restart the for-duration
    wobble = lambda t: 0.75 if int(t) % 50 == 0 else 0.9  # noqa: E731
    assert actions(h.run(0, 310, wobble)) == [("checkpoint", 310)]

    h = Harness()
    h.run(0, 200, 0.9)
    h.run(210, 210, 0.6)  # below clear_below: the episode ends
    assert h.run(220, 500, 0.9) == []  # a new episode began at 220
    assert actions(h.run(510, 520, 0.9)) == [("checkpoint", 520)]


def test_escalation_goes_checkpoint_then_migrate_then_reboot() -> None:
    h = Harness()
    events = h.run(0, 2000, 0.9, mode="sudden")  # high, not urgent: each step waits its full time
    assert actions(events) == [("checkpoint", 300), ("migrate", 600), ("reboot", 1200)]
    assert len({e["id"] for e in events}) == 3
    assert [a["decision"] for a in h.audit] == ["acted"] * 3


def test_very_high_risk_and_fast_modes_migrate_after_the_grace_only() -> None:
    assert actions(Harness().run(0, 400, 0.97, mode="thermal")) == [("checkpoint", 300), ("migrate", 360)]
    assert actions(Harness().run(0, 400, 0.91, mode="interconnect")) == [
        ("checkpoint", 300),
        ("migrate", 360),
    ]
    assert actions(Harness().run(0, 400, 0.91, mode="thermal")) == [("checkpoint", 300)]


def test_reboot_is_skipped_for_modes_a_reboot_cannot_fix() -> None:
    h = Harness()
    assert [a for a, _ in actions(h.run(0, 2000, 0.97, mode="power"))] == ["checkpoint", "migrate"]
    [suppressed] = [a for a in h.audit if a["decision"] == "suppressed"]
    assert (suppressed["action"], suppressed["reason"]) == ("reboot", "reboot_not_useful")


def test_replaying_the_same_records_gives_the_same_ids() -> None:
    first, second = Harness().run(0, 2000, 0.9), Harness().run(0, 2000, 0.9)
    assert [e["id"] for e in first] == [e["id"] for e in second]


def test_cooldown_blocks_a_new_episode_soon_after_an_action() -> None:
    h = Harness()
    h.run(0, 300, 0.9)  # checkpoint at 300
    h.run(310, 310, 0.5)  # recovered
    assert h.run(320, 1000, 0.9) == []  # the new episode is due at 620, but the cooldown runs to 3900
    assert [(a["decision"], a["reason"]) for a in h.audit][-2:] == [
        ("cleared", "recovered"),
        ("suppressed", "cooldown"),
    ]
    assert actions(h.run(1010, 3900, 0.9)) == [("checkpoint", 3900)]
    assert sum(a["reason"] == "cooldown" for a in h.audit) == 1  # a suppression is audited once per episode


def test_kill_switch_stops_actions_but_not_observation() -> None:
    h = Harness()
    h.kill = True
    assert h.run(0, 500, 0.9) == []
    assert [(a["decision"], a["action"], a["reason"]) for a in h.audit] == [
        ("suppressed", "checkpoint", "killswitch")
    ]
    h.kill = False
    assert actions(h.run(510, 510, 0.9)) == [("checkpoint", 510)]


def test_stale_duplicate_and_out_of_order_records_are_never_acted_on() -> None:
    h = Harness()
    # a backlog of high-risk records, all older than stale_after_s: nothing, one audit entry
    for t in range(0, 1000, 10):
        assert h.policy.observe([rec(T0 + t, 0.99)], now=T0 + 2000) == []
    assert [(a["decision"], a["reason"]) for a in h.audit] == [("suppressed", "stale")]

    h = Harness()
    h.run(0, 290, 0.9)
    late = h.policy.observe([rec(T0 + 100, 0.99), rec(T0 + 290, 0.99)], now=T0 + 300)  # old and duplicate
    assert late == []
    assert actions(h.run(300, 300, 0.9)) == [("checkpoint", 300)]


def test_a_replaced_gpu_starts_a_new_episode() -> None:
    h = Harness()
    h.run(0, 250, 0.9)
    assert h.run(260, 500, 0.9, uuid="GPU-new") == []  # the new card's episode began at 260
    assert [a["reason"] for a in h.audit] == []  # nothing acted or suppressed yet, so nothing to clear
    [event] = h.run(510, 560, 0.9, uuid="GPU-new")
    assert event["uuid"] == "GPU-new" and event["ts"] == T0 + 560


def test_blast_radius_holds_when_100_gpus_go_high_at_once() -> None:
    audit: list[dict] = []
    policy = RemediationPolicy(RULES, audit=audit.extend)
    gpus = [(f"node-{i:04d}", i % 8) for i in range(100)]
    events: list[dict] = []
    for t in range(0, 2000, 10):
        batch = [rec(T0 + t, 0.97, host=h, gpu=g) for h, g in gpus]
        events += policy.observe(batch, now=T0 + t)
    by_action = {a: [e for e in events if e["action"] == a] for a in ("checkpoint", "migrate", "reboot")}
    assert len(by_action["checkpoint"]) == 100
    assert len(by_action["migrate"]) == 2
    assert {e["host"] for e in by_action["reboot"]} == {e["host"] for e in by_action["migrate"]}
    assert len(policy.active_drains(T0 + 2000)) == 2
    assert sum(a["reason"] == "blast_radius" for a in audit) == 98  # once per suppressed GPU

    # a drained GPU recovers: its slot goes to the next one
    drained = by_action["migrate"][0]
    recovered = [rec(T0 + 2000, 0.1, host=drained["host"], gpu=drained["gpu_index"])]
    more = policy.observe(recovered + [rec(T0 + 2000, 0.97, host=h, gpu=g) for h, g in gpus], now=T0 + 2000)
    assert [e["action"] for e in more] == ["migrate"]
    assert len(policy.active_drains(T0 + 2000)) == 2


def test_two_gpus_of_one_host_take_one_drain_slot() -> None:
    policy = RemediationPolicy(RULES, max_concurrent_drains=1)
    events: list[dict] = []
    for t in range(0, 800, 10):
        events += policy.observe([rec(T0 + t, 0.97, gpu=g) for g in (1, 2)], now=T0 + t)
    assert sorted((e["action"], e["gpu_index"]) for e in events if e["action"] != "checkpoint") == [
        ("migrate", 1),
        ("migrate", 2),
    ]


def test_rules_are_validated_and_read_from_settings() -> None:
    with pytest.raises(ValueError):
        PolicyRules(threshold=0.5, clear_below=0.8)
    rules = PolicyRules.from_settings(Settings(risk_for_s=10.0, policy_max_concurrent_drains=5))
    assert (rules.for_s, rules.max_concurrent_drains) == (10.0, 5)


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
        policy.observe([rec(T0 + t, 0.9)], now=T0 + t)
    entries = read_audit(redis_client)
    assert [e["action"] for e in entries] == ["reboot", "migrate", "checkpoint"]
    assert entries[0]["id"] and entries[0]["risk"] == 0.9 and entries[0]["decision"] == "acted"


def test_kill_switch_fails_closed_when_redis_is_unreachable() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    assert RedisKillSwitch(dead)() is True


# ------------------------------------------------------------------------------ the sink, end to end


def test_remediation_sink_publishes_events_for_sustained_risk(
    settings: Settings, redis_client: redis.Redis
) -> None:
    settings = settings.replace(risk_for_s=20.0)
    ensure_topics(settings, [settings.topic_risk, settings.topic_remediation])
    seen: list[dict] = []
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
        for i in range(6):  # 30 s of history (fresh enough) with high risk on one GPU, low on another
            producer.produce(settings.topic_risk, encode_risk(rec(now - 30 + 5 * i, 0.9)), key="node-0001")
            producer.produce(
                settings.topic_risk, encode_risk(rec(now - 30 + 5 * i, 0.1, gpu=4)), key="node-0001"
            )
        producer.produce(settings.topic_risk, b"not json", key="node-0001")  # skipped, not fatal
        producer.flush(10)
        deadline = time.monotonic() + 20
        while not seen and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(15)
    assert [(e["action"], e["gpu_index"]) for e in seen] == [("checkpoint", 3)]

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
    assert decode_remediation(got.value())["id"] == seen[0]["id"]
    assert read_audit(redis_client)[0]["id"] == seen[0]["id"]
