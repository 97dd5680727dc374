"""Faults with real processes: a broker restart, a killed stream worker, a Redis restart, a controller killed
between claiming a remediation and recording its outcome. Each test counts what went in and what came out.

Tansu (the embedded broker) keeps everything in memory: after a restart every topic, offset and the windows
changelog are gone. So before the broker stops, the agents pause until the worker has consumed everything
(an Apache Kafka would keep it); what the test proves is that the agents spool through the outage, that the
worker waits the outage out, notices the recreated topic before it processes any of it, hands its windows
to the new broker and restarts, and that its successor consumes the new topic from its start: nothing lost.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from helpers import wait_for

from gpuwatch.apps.bench.reliability import committed_offsets, end_offsets
from gpuwatch.config import Settings
from gpuwatch.controller.executors import Outcome
from gpuwatch.controller.worker import run_controller
from gpuwatch.embedded import EmbeddedServer, spawn_child, start_kafka, start_redis
from gpuwatch.kafka import (
    ensure_compacted_topic,
    ensure_topics,
    make_producer,
    partition_count,
    read_partitions_to_end,
)
from gpuwatch.processes import StatsFollower, settings_env, start_stream_worker
from gpuwatch.producers.agent import Agent, SimulatedSource
from gpuwatch.producers.publisher import Publisher
from gpuwatch.producers.spool import Spool
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import (
    decode_outcome,
    decode_risk,
    encode_remediation,
    encode_risk,
    remediation_id,
)
from gpuwatch.schemas.fields import Action
from gpuwatch.schemas.records import Outcome as OutcomeRecord
from gpuwatch.schemas.records import Remediation, Risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.app import RESTART_EXIT_CODE, windows_changelog_topic

pytestmark = pytest.mark.slow

STATS_S = 0.5  # the stream workers' STATS cadence: the waits below see their progress within this long


def _topics(settings: Settings) -> None:
    ensure_topics(settings, [settings.topic_samples, settings.topic_risk, settings.topic_deadletter])
    ensure_compacted_topic(settings, windows_changelog_topic(settings), settings.partitions)


def _read(settings: Settings, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    n = partition_count(settings, topic)
    return read_partitions_to_end(settings, topic, list(range(n))) if n else []


def _drained(settings: Settings, stats: StatsFollower) -> bool:
    """The worker has consumed, reported and committed everything in the samples topic."""
    topic, n = settings.topic_samples, settings.partitions
    ends = end_offsets(settings, topic, n)
    done = committed_offsets(settings, settings.stream_app_id, topic, n)
    seen = {int(p): o for p, o in stats.latest.offsets.items()}
    return all(done[p] >= end and seen.get(p, 0) >= end for p, end in ends.items())


class _Gated(SimulatedSource):
    def __init__(self, hosts: int, interval_s: float) -> None:
        super().__init__(hosts, interval_s, seed=21)
        self.open = threading.Event()
        self.open.set()

    def tick(self) -> list[tuple[str, bytes]]:
        return super().tick() if self.open.is_set() else []  # paused agents still deliver their spool


@pytest.fixture()
def brokers() -> Iterator[list[EmbeddedServer]]:
    servers = [start_kafka()]
    yield servers
    for server in servers:
        server.stop()


def test_broker_restart_agents_spool_and_the_worker_resumes_on_the_new_topic_with_nothing_lost(
    brokers: list[EmbeddedServer], tmp_path: Path
) -> None:
    # 4 partitions: what Tansu gives a topic a client names before it is recreated.
    settings = Settings(kafka_bootstrap=brokers[0].url, partitions=4, topic_samples="f.samples", topic_risk="f.risk",
                        topic_deadletter="f.dl", stream_app_id="faults-broker", rescore_interval_s=1.0,
                        checkpoint_interval_s=2.0)  # fmt: skip
    _topics(settings)
    worker = start_stream_worker(settings, "faults-broker-worker", stats_interval_s=STATS_S)
    stats = StatsFollower(worker)
    stats.wait(lambda s: s.partitions == 4, 90, "the worker's partitions")
    source = _Gated(hosts=4, interval_s=0.25)  # 32 GPUs, four snapshots a second each
    publisher = Publisher(settings, Spool(tmp_path / "spool"), delivery_timeout_s=5.0)
    agent = Agent(source, publisher, interval_s=0.25)
    runner = threading.Thread(target=agent.run)
    runner.start()
    successor = None
    try:
        wait_for(lambda: publisher.sent >= 80, 60, "the first snapshots")
        source.open.clear()
        wait_for(lambda: publisher.pending == 0 and publisher.in_flight == 0, 60, "the agents' acks")
        wait_for(lambda: _drained(settings, stats), 90, "the worker to consume what the broker holds")
        before = stats.latest
        assert before.samples == agent.snapshots * 8
        span_before = max(decode_risk(v).history_s for _, v in _read(settings, settings.topic_risk))

        brokers[0].stop()
        source.open.set()
        ticks, deepest, outage_until = agent.ticks, 0, time.monotonic() + 8.0
        while time.monotonic() < outage_until:
            deepest = max(deepest, publisher.pending)
            time.sleep(0.1)
        assert agent.ticks - ticks >= 20 and deepest >= 4 * 20  # the agents kept sampling, into the spool
        assert worker.alive()  # and the worker waits for the broker

        brokers.append(start_kafka(port=brokers[0].port))  # same address, empty broker
        _topics(settings)
        # The worker sees the samples topic recreated, hands its windows to the new changelog before it
        # processes anything from the new topic, and exits to be restarted (here the test is the supervisor).
        wait_for(lambda: worker.proc.poll() is not None, 90, "the worker to notice the recreated topic")
        assert worker.proc.returncode == RESTART_EXIT_CODE, worker.log_tail(20)
        handed_over = stats.latest  # its last report, printed on the way out
        successor = start_stream_worker(settings, "faults-broker-worker-2", stats_interval_s=STATS_S)
        stats = StatsFollower(successor)
        wait_for(lambda: publisher.pending <= 8, 120, "the spool to drain into the new broker")
        source.open.clear()
        wait_for(lambda: publisher.pending == 0 and publisher.in_flight == 0, 60, "the last acks")
        wait_for(lambda: _drained(settings, stats), 120, "the successor to consume the recreated topic")
        after, taken = stats.latest, agent.snapshots
    finally:
        source.open.set()
        agent.stop_event.set()
        runner.join(60)
        for w in (worker, successor):
            if w is not None:
                w.stop()
    assert publisher.spool.dropped == 0
    # Counts are exact: the first worker processed nothing of the new topic, its successor all of it from the
    # start. Every snapshot the agents took was folded once.
    assert handed_over.samples == before.samples and handed_over.checkpointed > before.checkpointed
    assert before.samples + after.samples == taken * 8 > before.samples
    assert (after.rejected_samples, after.deadletters) == (0, 0)
    # The windows lived through the outage: restored from the handover, so scores after it are backed by the
    # history from before it.
    assert after.restored_gpus == 32
    fresh = [decode_risk(v) for _, v in _read(settings, settings.topic_risk)]
    assert fresh and min(r.history_s for r in fresh) >= span_before


def _feed(settings: Settings, sim: FleetSimulator, stop: threading.Event, produced: list[int]) -> None:
    producer = make_producer(settings)
    while not stop.is_set():
        pairs = sim.step_json()
        for host, value in pairs:
            producer.produce(settings.topic_samples, key=host.encode(), value=value)
        produced[0] += 8 * len(pairs)
        producer.poll(0)
        time.sleep(0.025)
    assert producer.flush(30) == 0


def test_a_killed_worker_is_replaced_resumes_from_committed_offsets_and_restores_windows(
    settings: Settings,
) -> None:
    settings = settings.replace(partitions=2, rescore_interval_s=1.0, checkpoint_interval_s=1.0)
    _topics(settings)
    sim = FleetSimulator(FleetConfig(hosts=4, seed=22, start_ts=time.time() - 3000))  # 32 GPUs
    first = start_stream_worker(settings, "faults-worker-a", stats_interval_s=STATS_S)
    stats_a = StatsFollower(first)
    stats_a.wait(lambda s: s.partitions == 2, 90, "the first worker's partitions")
    stop, produced = threading.Event(), [0]
    feeder = threading.Thread(target=_feed, args=(settings, sim, stop, produced))
    feeder.start()
    second = None
    try:
        stats_a.wait(
            lambda s: s.samples >= 300 * 32 and s.checkpointed >= 32, 120, "five minutes of history"
        )
        first.proc.send_signal(signal.SIGKILL)  # mid-stream: no revoke handler, no last checkpoint or commit
        first.proc.wait()
        killed_at_ts = sim.now
        last = stats_a.latest
        committed = committed_offsets(settings, settings.stream_app_id, settings.topic_samples, 2)
        second = start_stream_worker(settings, "faults-worker-b", stats_interval_s=STATS_S)
        stats_b = StatsFollower(second)
        stats_b.wait(lambda s: s.restored_gpus > 0 and s.samples > 0, 120, "the successor at work")
        time.sleep(2.0)
        stop.set()
        feeder.join(60)
        wait_for(lambda: _drained(settings, stats_b), 120, "the successor to catch up")
        now = stats_b.latest
        fresh = [decode_risk(v) for _, v in _read(settings, settings.topic_risk)]
    finally:
        stop.set()
        feeder.join(60)
        for w in (first, second):
            if w is not None:
                w.stop()
    assert now.restored_gpus == 32
    # Resumed from the committed offsets: what the killed worker had processed past them is processed again
    # (at least once), and nothing is skipped. Offsets tell exactly how many GPU-samples were replayed.
    reported = {int(p): o for p, o in last.offsets.items()}
    replayed = sum(reported.get(p, 0) - committed[p] for p in range(2)) * 8
    delivered = sum(s.samples + s.rejected_samples for s in (last, now))
    assert delivered == produced[0] + replayed, (delivered, produced[0], replayed, last.offsets, committed)
    # Scores after the takeover are backed by the history from before the crash (restored from the changelog),
    # not only by what the successor replayed from the committed offsets (a few seconds before the kill).
    after = [r for r in fresh if r.ts > killed_at_ts]
    assert len({r.uuid for r in after}) == 32
    assert max(r.ts - r.history_s for r in after) < killed_at_ts - 250


def _risk(host: str, gpu: int, ts: float) -> bytes:
    return encode_risk(Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=0.2, horizon_s=3600.0,
                            mode="none", model="test", scored_at=ts))


def test_redis_restart_the_sink_holds_the_batch_and_catches_up(settings: Settings) -> None:
    password = "faults-redis-secret"
    server = start_redis(password=password)
    settings = settings.replace(redis_url=server.url)
    ensure_topics(settings, [settings.topic_risk, settings.topic_deadletter, settings.topic_remediation])
    sink = spawn_child(
        "faults-sink", [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "sink"], env=settings_env(settings)
    )
    producer = make_producer(settings)
    gpus = [(f"node-{h}", g) for h in range(2) for g in range(8)]
    sent: list[float] = []

    def publish(ts: float) -> None:
        for host, gpu in gpus:
            producer.produce(settings.topic_risk, _risk(host, gpu, ts), key=host)
        assert producer.flush(10) == 0
        sent.append(ts)

    def history(client: redis.Redis) -> dict[tuple[str, int], set[float]]:
        return {
            (h, g): {json.loads(x)["ts"] for x in client.lrange(k.hist_key(h, g), 0, -1)} for h, g in gpus
        }

    restarted = None
    try:
        client = redis.Redis.from_url(server.url)
        t = time.time()
        publish(t)
        wait_for(lambda: client.zcard(k.FLEET_RISK) == 16, 60, "the sink's first writes")
        client.close()
        server.stop()
        outage = [t + i for i in range(1, 6)]
        for ts in outage:  # the sink holds its batch and retries; nothing is committed meanwhile
            publish(ts)
            time.sleep(0.3)
        restarted = start_redis(port=server.port, password=password)  # same port and password, empty
        client = redis.Redis.from_url(restarted.url)
        wait_for(lambda: all(set(outage) <= got for got in history(client).values()), 60,
                 "every record of the outage written to the new Redis")  # fmt: skip
        publish(t + 10)
        wait_for(lambda: all(max(got) == t + 10 for got in history(client).values()), 30, "the newest record")
        assert sink.alive()
        client.close()
    finally:
        sink.stop()
        for s in (server, restarted):
            if s is not None:
                s.stop()
    log = sink.log_path.read_text()
    assert "Redis is back" in log and password not in log


# ---------------------------------------------------------------- the controller

_SCRIPT = """
import json, os, sys, time
action, rid, work = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(work, "calls"), "a") as f:
    f.write(json.dumps({"pid": os.getpid(), "action": action, "id": rid}) + "\\n")
while not os.path.exists(os.path.join(work, "release-" + rid)):
    time.sleep(0.05)
if action == "reboot":  # not idempotent: every run reboots
    with open(os.path.join(work, "reboots"), "a") as f:
        f.write(rid + "\\n")
else:  # a drain: draining a drained node changes nothing (executors de-duplicate on the id)
    drained = os.path.join(work, "drained-" + rid)
    if not os.path.exists(drained):
        open(drained, "w").close()
"""


def _event(action: Action, gpu: int) -> Remediation:
    uuid = f"GPU-node-0007-{gpu}"
    return Remediation(id=remediation_id("node-0007", gpu, uuid, action, 1.75e9), host="node-0007", gpu_index=gpu,
                       uuid=uuid, action=action, reason="test", risk=0.97, ts=1.75e9)


def _calls(work: Path) -> list[dict[str, Any]]:
    path = work / "calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _outcomes(settings: Settings) -> list[OutcomeRecord]:
    return [decode_outcome(v) for _, v in _read(settings, settings.topic_outcomes)]


def test_a_controller_killed_mid_action_neither_loses_nor_doubles_it(
    settings: Settings, redis_client: redis.Redis, tmp_path: Path
) -> None:
    script = tmp_path / "remediate.py"
    script.write_text(_SCRIPT)
    settings = settings.replace(
        controller_executor="command", controller_timeout_s=60.0, controller_lease_s=30.0,
        controller_command=f"{sys.executable} {script} {{action}} {{id}} {tmp_path}",
    )  # fmt: skip
    ensure_topics(settings, [settings.topic_remediation, settings.topic_outcomes, settings.topic_deadletter])
    env = settings_env(settings)

    def controller(name: str) -> EmbeddedServer:
        return spawn_child(name, [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "controller"], env=env)

    def kill_mid_action(proc: EmbeddedServer, rid: str, calls: int) -> list[dict[str, Any]]:
        wait_for(lambda: len(_calls(tmp_path)) >= calls, 60, f"the executor to start on {rid}")
        assert redis_client.exists(k.claim_key(rid)) and not redis_client.exists(k.outcome_key(rid))
        proc.proc.send_signal(signal.SIGKILL)  # between claim and outcome
        proc.proc.wait()
        return _calls(tmp_path)

    migrate, reboot = _event("migrate", 1), _event("reboot", 2)
    producer = make_producer(settings)
    procs: list[EmbeddedServer] = []
    try:
        procs.append(controller("controller-1"))
        producer.produce(settings.topic_remediation, encode_remediation(migrate), key="node-0007")
        producer.flush(10)
        calls = kill_mid_action(procs[-1], migrate.id, 1)
        os.kill(calls[-1]["pid"], signal.SIGKILL)  # the drain never happened

        procs.append(controller("controller-2"))  # gets the event again: its offset was never committed
        wait_for(lambda: len(_calls(tmp_path)) >= 2, 60, "the migrate to be re-run")
        (tmp_path / f"release-{migrate.id}").touch()
        wait_for(lambda: redis_client.exists(k.outcome_key(migrate.id)), 60, "the migrate's outcome")

        producer.produce(settings.topic_remediation, encode_remediation(reboot), key="node-0007")
        producer.flush(10)
        kill_mid_action(procs[-1], reboot.id, 3)
        (tmp_path / f"release-{reboot.id}").touch()  # the reboot goes through although its controller died
        wait_for(lambda: (tmp_path / "reboots").exists(), 30, "the reboot")

        procs.append(controller("controller-3"))
        wait_for(lambda: redis_client.exists(k.outcome_key(reboot.id)), 60, "the reboot's outcome")
        time.sleep(1.0)
    finally:
        for proc in procs:
            proc.stop()
    outcomes = _outcomes(settings)
    assert sorted(o.id for o in outcomes) == sorted([migrate.id, reboot.id])  # one each
    by_id = {o.id: o for o in outcomes}
    # The drain: re-run after the interruption (harmless to repeat), done exactly once.
    assert by_id[migrate.id].ok and by_id[migrate.id].attempt == 2
    assert "re-run after an interrupted attempt" in by_id[migrate.id].detail
    assert (tmp_path / f"drained-{migrate.id}").exists()
    # The reboot: never run twice; the outcome says what happened and what to check.
    assert (tmp_path / "reboots").read_text().split() == [reboot.id]
    assert [c["action"] for c in _calls(tmp_path)] == ["migrate", "migrate", "reboot"]
    assert not by_id[reboot.id].ok and "not retried" in by_id[reboot.id].detail
    stored = redis_client.hgetall(k.outcome_key(reboot.id))
    assert stored[b"ok"] == b"false" and stored[b"attempt"] == b"2"
    assert json.loads(redis_client.get(k.claim_key(reboot.id)))["done"] is True


class _Reboots:
    """An executor that can tell whether a reboot already happened (like a BMC's boot counter)."""

    name = "reboots"

    def __init__(self, done: set[str]) -> None:
        self.done = done
        self.runs: list[str] = []

    def execute(self, event: Remediation) -> Outcome:
        self.runs.append(event.id)
        self.done.add(event.id)
        return Outcome(ok=True, detail="rebooted")

    def already_done(self, event: Remediation) -> Outcome | None:
        return Outcome(ok=True, detail="boot counter moved") if event.id in self.done else None


def test_another_hosts_claim_is_taken_over_when_its_lease_ends_and_checked_before_a_rerun(
    settings: Settings, redis_client: redis.Redis
) -> None:
    settings = settings.replace(controller_lease_s=3.0)
    ensure_topics(settings, [settings.topic_remediation, settings.topic_outcomes, settings.topic_deadletter])
    happened, pending = _event("reboot", 3), _event("reboot", 4)
    for ev, lease_left in ((happened, -1.0), (pending, 2.0)):  # a dead controller elsewhere, a live one
        claim = {"owner": "other-host:1:abc", "attempt": 1, "claimed_at": time.time() - 10,
                 "lease_until": time.time() + lease_left, "done": False}  # fmt: skip
        redis_client.set(k.claim_key(ev.id), json.dumps(claim))
    executor = _Reboots({happened.id})
    outcomes: list[OutcomeRecord] = []
    stop = threading.Event()
    thread = threading.Thread(target=run_controller, args=(settings,), daemon=True, kwargs={
        "stop": stop, "executor": executor, "on_outcome": outcomes.append, "redis_client": redis_client})  # fmt: skip
    thread.start()
    try:
        producer = make_producer(settings)
        for ev in (happened, pending):
            producer.produce(settings.topic_remediation, encode_remediation(ev), key="node-0007")
        producer.flush(10)
        wait_for(lambda: len(outcomes) == 2, 60, "both outcomes")
    finally:
        stop.set()
        thread.join(15)
    first, second = outcomes
    assert (
        first.id == happened.id and first.ok and "done by the interrupted attempt" in first.detail
    )
    assert second.id == pending.id and "had not acted" in second.detail
    assert executor.runs == [pending.id]  # the reboot that had happened was not repeated
