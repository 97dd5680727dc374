"""`gpuwatch bench reliability`: the pipeline under load, faults and bad input, with every GPU-sample accounted.

On the embedded stack (a Tansu broker and a password-protected redis-server as child processes) it runs:
node agents for `--gpus` simulated GPUs at 1 Hz (the agent's own spool and publisher, in this process), one
`gpuwatch stream` worker, one `gpuwatch sink` and one `gpuwatch controller` (dry run) as real processes, a
trickle of bad snapshots, and probes for the stages after the worker (see Downstream accounting). Every stage
runs with a short delivery timeout (`kafka_delivery_timeout_s` = DELIVERY_TIMEOUT_S). For `--seconds` (default
600) it samples the worker's resident memory and the consumer backlog every 5 s and injects four faults, each
checked before the run goes on:

1. broker restart (at 20 %): the agents pause, the worker drains the broker, the broker stops for 15 s while
   the agents sample into their spools, then starts again on the same port. Tansu keeps everything in memory,
   so the restarted broker is empty: the drain is what makes the accounting close (an Apache Kafka keeps its
   log, and nothing would need draining). The worker notices the recreated topic, hands its windows to the new
   changelog and exits to be restarted (this bench is its supervisor). Survived when it did, its restart
   restored the windows, and the spools emptied into the new broker.
2. broker outage longer than the delivery timeout (at 40 %): a burst of OUTAGE_PROBES probes is injected, and
   as their outputs are on their way the broker is frozen (SIGSTOP: its connections hang as in a network
   partition, and it keeps its log, as an Apache Kafka would) for OUTAGE_S, several delivery timeouts, then
   resumed. A bare producer gives up on what it holds after the delivery timeout; here every stage holds its
   batch and resends. Survived when every process is still running, the worker caught up and every probe so
   far is accounted for; the detail counts the held-batch and resend warnings the processes logged.
3. worker kill (at 60 %): SIGKILL mid-stream; a replacement starts at once (this bench is its supervisor),
   resumes from the committed offsets and restores the windows from the changelog. Survived when it restored
   windows and caught up.
4. Redis restart (at 80 %): redis-server stops for 10 s (the sink retries) and restarts empty on the same port.
   Survived when every GPU's risk is back in Redis.

Accounting. `samples_produced` are the GPU-samples the broker acknowledged (bad ones counted by the GPUs they
carry). The worker counts every GPU-sample it folds (`scored`) or rejects as a duplicate; the dead-letter
topic, read throughout, holds the rest (`dead_lettered` counts both; dead letters deduplicated by source). A worker
killed mid-stream leaves batches that its successor processes again (from the committed offset to the last
offset the killed worker reported): `replayed` counts them; batches it processed and committed after its last
report are counted by nobody: `processed_unreported`. Both are measured from offsets. During the outage a
worker whose group session expired reads its uncommitted batches again and rejects them as duplicates: every
such rejection the bench did not inject (a duplicate dead letter at an offset that is not a resent snapshot)
is counted in `replayed` too. So `unaccounted = samples_produced - (scored + dead_lettered - replayed +
processed_unreported)` must be 0.

Downstream accounting (the policy's incident guard, `policy_max_unhealthy_hosts`, is off in this run: the probes
are dozens of hosts in alarm at once). Every 20 s (and right before the outage) the bench injects, next to the worker's
output: one risk record in alarm for a GPU of its own (the policy's checkpoint for it has a known id), one
remediation event for another (straight to the controller), one undecodable risk record (the risk sink must
dead-letter it) and one undecodable remediation event (the controller must dead-letter it). Taps read the remediation, outcome and dead-letter topics all along.
`downstream_unaccounted` = probe episodes with no remediation event + remediation events (the probes' and the
fleet's) with no outcome + injected bad records with no dead letter at their offset; it must be 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from gpuwatch.apps.bench.table import emit
from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer, spawn_child, start_kafka, start_redis
from gpuwatch.kafka import ensure_compacted_topic, ensure_topics, make_producer
from gpuwatch.processes import StatsFollower, settings_env, start_stream_worker
from gpuwatch.producers.agent import Agent, SimulatedSource
from gpuwatch.producers.publisher import Publisher
from gpuwatch.producers.spool import Spool
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import decode_deadletter, encode_remediation, encode_risk, remediation_id
from gpuwatch.schemas.records import Remediation, Risk, StreamStats

log = logging.getLogger(__name__)

GPUS_PER_HOST = 8
SAMPLE_EVERY_S = 5.0
DUPLICATE = "duplicate or out of order"  # the stream's reason for a sample not newer than its GPU's last
DELIVERY_TIMEOUT_S = 2.0  # kafka_delivery_timeout_s of every stage in the run (15 s by default)
OUTAGE_S = 4 * DELIVERY_TIMEOUT_S
PROBE_EVERY_S = 20.0
OUTAGE_PROBES = 20  # injected right before the outage
# What the stages log (gpuwatch/kafka/producer.py): a batch held with its offsets uncommitted, and a fresh
# producer resending what Kafka did not acknowledge.
HELD = "not yet acknowledged by Kafka"
RESENT = "resending them"


def _say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def slope_per_min(ts: list[float], values: list[float]) -> float:
    """Least-squares slope of `values` over `ts` (seconds), per minute; 0 with fewer than 3 points."""
    if len(ts) < 3:
        return 0.0
    return float(np.polyfit(np.asarray(ts) - ts[0], np.asarray(values, dtype=np.float64), 1)[0] * 60.0)


def end_offsets(settings: Settings, topic: str, partitions: int, timeout: float = 30.0) -> dict[int, int]:
    """Offset after the last message of each partition of `topic`.

    Read to the end of each partition's last batch rather than asked for: Tansu 0.6 answers the "latest
    offset" request with the last batch's first offset + 1, short of the end when that batch holds several.
    """
    conf = {**settings.kafka_client_config(), "group.id": f"gpuwatch-probe-{time.time_ns()}",
            "enable.partition.eof": True, "enable.auto.commit": False}  # fmt: skip
    consumer = Consumer(conf)
    try:
        marks = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)
        }
        ends = {p: 0 for p, mark in marks.items() if mark == 0}
        consumer.assign([TopicPartition(topic, p, mark - 1) for p, mark in marks.items() if mark > 0])
        deadline = time.monotonic() + timeout
        while len(ends) < partitions:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"could not read to the end of {topic} partitions {sorted(set(marks) - set(ends))}"
                )
            msg = consumer.poll(0.2)
            if (
                msg is not None
                and msg.error() is not None
                and msg.error().code() == KafkaError._PARTITION_EOF
            ):
                ends[msg.partition()] = msg.offset()
        return ends
    finally:
        consumer.close()


def committed_offsets(settings: Settings, group: str, topic: str, partitions: int) -> dict[int, int]:
    """Offsets `group` committed on `topic` (0 where none); reads them without joining the group."""
    consumer = Consumer({**settings.kafka_client_config(), "group.id": group, "enable.auto.commit": False})
    try:
        tps = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: max(tp.offset, 0) for tp in tps}
    finally:
        consumer.close()


def _log_count(proc: EmbeddedServer, needles: tuple[str, ...]) -> tuple[int, ...]:
    """How many lines of a child's log contain each of `needles`."""
    try:
        lines = proc.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return tuple(0 for _ in needles)
    return tuple(sum(needle in line for line in lines) for needle in needles)


def claimed_gpus(original: bytes) -> int:
    """GPU-samples a snapshot carries, even a corrupt one: how many GPU entries it names (at least 1)."""
    return max(1, original.count(b'"gpu_index"'))


@dataclass
class Letter:
    generation: int  # incarnation of the broker's topics (a memory-only broker restarts empty)
    partition: int
    offset: int
    error: str
    gpus: int
    topic: str = ""  # where the original came from
    stage: str = ""  # who dead-lettered it


class TopicTap:
    """Reads `topic` from the start, all along (a memory-only broker forgets it when it stops); `_add` keeps
    what each message says."""

    def __init__(self, settings: Settings, partitions: int, topic: str) -> None:
        self.settings = settings
        self.partitions = partitions
        self.topic = topic
        self.generation = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._positions: dict[int, int] = {}
        self._consumer = self._open()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"tap-{topic}")
        self._thread.start()

    def _open(self) -> Consumer:
        conf = {**self.settings.kafka_client_config(), "group.id": f"gpuwatch-tap-{time.time_ns()}",
                "enable.auto.commit": False}  # fmt: skip
        consumer = Consumer(conf)
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(self.partitions)])
        self._positions = dict.fromkeys(range(self.partitions), 0)
        return consumer

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                msgs = self._consumer.consume(500, 0.2)
                for msg in msgs:
                    if msg.error() is None:
                        self._add(msg)
                        self._positions[msg.partition()] = msg.offset() + 1

    def _add(self, msg: Message) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """After the broker restarted empty: read the recreated topic from its start."""
        with self._lock:
            self._consumer.close()
            self.generation += 1
            self._consumer = self._open()

    def caught_up(self) -> bool:
        ends = end_offsets(self.settings, self.topic, self.partitions)
        with self._lock:
            return all(self._positions.get(p, 0) >= end for p, end in ends.items())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


class DeadLetterTap(TopicTap):
    """Every dead letter, with where its original came from."""

    def __init__(self, settings: Settings, partitions: int) -> None:
        self.letters: list[Letter] = []
        super().__init__(settings, partitions, settings.topic_deadletter)

    def _add(self, msg: Message) -> None:
        rec = decode_deadletter(msg.value())
        src = rec.source
        gpus = claimed_gpus(rec.original)
        if DUPLICATE in rec.error:  # "GPU(s) 0, 1, ... already have a sample": only those were rejected
            gpus = rec.error.split("GPU(s) ", 1)[1].split(" already", 1)[0].count(",") + 1
        self.letters.append(Letter(self.generation, src.partition, src.offset, rec.error, gpus, src.topic,
                                   rec.stage))  # fmt: skip


class IdTap(TopicTap):
    """The `id` of every remediation event or outcome (a redelivered one is seen once)."""

    def __init__(self, settings: Settings, partitions: int, topic: str) -> None:
        self.ids: set[str] = set()
        super().__init__(settings, partitions, topic)

    def _add(self, msg: Message) -> None:
        try:
            rec = orjson.loads(msg.value())
        except orjson.JSONDecodeError:
            return  # one of the bench's undecodable events: the controller dead-letters it
        if isinstance(rec, dict) and isinstance(rec.get("id"), str):
            self.ids.add(rec["id"])


class _Gate(SimulatedSource):
    """The simulated fleet's agents, which the bench can pause (they keep delivering what they spooled, and
    their clock stops); keeps recent snapshots to spoil."""

    def __init__(self, hosts: int, interval_s: float = 1.0) -> None:
        super().__init__(hosts, interval_s, gpus_per_host=GPUS_PER_HOST, seed=17)
        self.open = threading.Event()
        self.open.set()
        self.recent: list[list[tuple[str, bytes]]] = []

    def tick(self) -> list[tuple[str, bytes]]:
        if not self.open.is_set():
            return []
        pairs = super().tick()
        self.recent = [*self.recent[-9:], pairs[:4]]
        return pairs


@dataclass
class Injected:
    generation: int
    partition: int
    offset: int
    kind: str
    gpus: int
    decodable: bool  # decodes, so the worker counts its GPUs (a resent old snapshot: rejected as duplicates)


def _spoil(kind: str, raw: bytes, older: bytes) -> bytes:
    text = raw.decode()
    if kind == "wrong type":
        return text.replace('"temp_c":', '"temp_c":"hot","was":', 1).encode()
    if kind == "NaN":
        return text.replace('"power_w":', '"power_w":NaN,"was":', 1).encode()
    if kind == "negative counter":
        return text.replace('"ecc_sbe_volatile":', '"ecc_sbe_volatile":-1,"was":', 1).encode()
    if kind == "far future ts":
        obj = orjson.loads(raw)
        return orjson.dumps({**obj, "ts": obj["ts"] + 86400.0})
    if kind == "invalid UTF-8":
        return raw.replace(b'"host":"', b'"host":"\xff\xfe', 1)
    return older  # "resent": an older snapshot of the same host again


BAD_KINDS = ("wrong type", "NaN", "negative counter", "far future ts", "invalid UTF-8", "resent")


class BadInput:
    """Produces spoiled copies of real snapshots, noting where each landed (for the replay correction)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.injected: list[Injected] = []
        self.generation = 0
        self._producer = make_producer(settings)

    def inject(self, source: _Gate) -> None:
        if len(source.recent) < 6:
            return
        for i, kind in enumerate(BAD_KINDS):
            host, raw = source.recent[-1][i % len(source.recent[-1])]
            older = dict(source.recent[-6])[host]
            bad = _spoil(kind, raw, older)

            def done(err: KafkaError | None, msg: Message, kind: str = kind, bad: bytes = bad) -> None:
                if err is None:
                    gen = self.generation
                    entry = Injected(
                        gen, msg.partition(), msg.offset(), kind, claimed_gpus(bad), kind == "resent"
                    )
                    self.injected.append(entry)

            self._producer.produce(
                self.settings.topic_samples, value=bad, key=host.encode(), on_delivery=done
            )
        if self._producer.flush(30) != 0:
            raise RuntimeError("the broker did not take the bad snapshots")

    def restart(self) -> None:
        """A fresh producer for the restarted broker (which forgot our producer id)."""
        self._producer = make_producer(self.settings)
        self.generation += 1


@dataclass
class Placed:
    """Where an injected message landed."""

    generation: int
    partition: int
    offset: int


class Downstream:
    """Probes for the sinks and the controller, whose outputs are known in advance (see the module docstring),
    and taps on what those stages publish."""

    def __init__(self, settings: Settings, partitions: int, tap: DeadLetterTap) -> None:
        self.settings = settings
        self.letters = tap
        self.events = IdTap(settings, partitions, settings.topic_remediation)
        self.outcomes = IdTap(settings, partitions, settings.topic_outcomes)
        self.expected: list[str] = []  # id of the checkpoint each probe's alarm must cause
        self.direct = 0  # events injected straight onto the remediation topic
        self.bad_risk: list[Placed] = []  # for the risk sink to dead-letter
        self.bad_events: list[Placed] = []  # for the controller to dead-letter
        self.generation = 0
        self.probes = 0
        self._producer = make_producer(settings)

    def inject(self, count: int = 1, spacing_s: float = 0.0) -> None:
        """`count` times, `spacing_s` apart: one alarm episode of a GPU of its own (for the policy), one event
        of another (straight to the controller), one undecodable risk record and one undecodable event;
        returns once the broker has them all."""
        gen = self.generation

        def placed(into: list[Placed]) -> Callable[[KafkaError | None, Message], None]:
            def done(err: KafkaError | None, msg: Message) -> None:
                if err is None:
                    into.append(Placed(gen, msg.partition(), msg.offset()))

            return done

        expected = []
        for i in range(count):
            if i and spacing_s:
                time.sleep(spacing_s)
            self.probes += 1
            host, gpu, ts = f"probe-{self.probes:05d}", 0, time.time()
            uuid, key = f"GPU-{host}-{gpu}", host.encode()
            risk = Risk(host=host, gpu_index=gpu, uuid=uuid, ts=ts, risk=0.5, horizon_s=3600.0, mode="memory",
                        model="bench-probe", scored_at=ts, alarm=True, drain=False, failed=False, op="bench-probe")
            self._producer.produce(self.settings.topic_risk, value=encode_risk(risk), key=key)
            direct = Remediation(host=host, gpu_index=gpu + 1, uuid=f"GPU-{host}-{gpu + 1}", action="checkpoint",
                                 reason="bench probe", risk=0.5, ts=ts,
                                 id=remediation_id(host, gpu + 1, f"GPU-{host}-{gpu + 1}", "checkpoint", ts))
            self._producer.produce(self.settings.topic_remediation, value=encode_remediation(direct), key=key)
            self._producer.produce(self.settings.topic_risk, value=f"not a risk record {self.probes}".encode(),
                                   key=key, on_delivery=placed(self.bad_risk))  # fmt: skip
            self._producer.produce(self.settings.topic_remediation, value=f"not an event {self.probes}".encode(),
                                   key=key, on_delivery=placed(self.bad_events))  # fmt: skip
            self._producer.poll(0)
            expected.append(remediation_id(host, gpu, uuid, "checkpoint", ts))
        if self._producer.flush(30) != 0:
            raise RuntimeError("the broker did not take the downstream probes")
        self.expected += expected
        self.direct += count

    def restart(self) -> None:
        """After the broker restarted empty: a fresh producer, fresh taps."""
        self._producer = make_producer(self.settings)
        self.generation += 1
        self.events.restart()
        self.outcomes.restart()

    def caught_up(self) -> bool:
        return self.events.caught_up() and self.outcomes.caught_up()

    def stop(self) -> None:
        self.events.stop()
        self.outcomes.stop()

    def accounting(self) -> dict[str, int]:
        """What the probes and the fleet's events became; `downstream_unaccounted` must be 0."""
        # Event ids are deterministic, so they are matched whatever broker incarnation carried them.
        events, outcomes = set(self.events.ids), set(self.outcomes.ids)
        letters = {(x.generation, x.topic, x.partition, x.offset, x.stage) for x in self.letters.letters}
        risk_topic, event_topic = self.settings.topic_risk, self.settings.topic_remediation
        risk_letters = sum((p.generation, risk_topic, p.partition, p.offset, "risk-sink") in letters
                           for p in self.bad_risk)  # fmt: skip
        event_letters = sum((p.generation, event_topic, p.partition, p.offset, "controller") in letters
                            for p in self.bad_events)  # fmt: skip
        missing_events = sum(e not in events for e in self.expected)
        without_outcome = len(events - outcomes)
        injected = len(self.bad_risk) + len(self.bad_events)
        unlettered = injected - risk_letters - event_letters
        return {
            "remediation_probes": len(self.expected),
            "remediation_direct": self.direct,
            "remediation_events": len(events),
            "remediation_outcomes": len(events & outcomes),
            "downstream_bad_injected": injected,
            "downstream_dead_lettered": risk_letters + event_letters,
            "downstream_unaccounted": missing_events + without_outcome + unlettered,
        }

    def settled(self) -> bool:
        return self.accounting()["downstream_unaccounted"] == 0

    def missing(self) -> str:
        """What is not accounted for yet, for a message."""
        events, outcomes = set(self.events.ids), set(self.outcomes.ids)
        letters = {(x.generation, x.topic, x.partition, x.offset) for x in self.letters.letters}
        risk_topic, event_topic = self.settings.topic_risk, self.settings.topic_remediation
        unlettered = [(p.generation, risk_topic, p.partition, p.offset) for p in self.bad_risk]
        unlettered += [(p.generation, event_topic, p.partition, p.offset) for p in self.bad_events]
        return (f"probes without their event: {[e for e in self.expected if e not in events]}; "
                f"events without an outcome: {sorted(events - outcomes)}; bad records (generation, topic, "
                f"partition, offset) without a dead letter: {[u for u in unlettered if u not in letters]}")  # fmt: skip


@dataclass
class Fault:
    name: str
    at_s: float
    survived: bool = False
    detail: str = ""
    recovery_s: float = 0.0


@dataclass
class Ledger:
    """Worker counts per incarnation and the replay measured at a kill."""

    delivered: int = 0  # GPU-samples the worker folded or rejected, summed over its incarnations
    scored: int = 0
    rejected: int = 0
    replayed: int = 0
    unreported: int = 0  # processed and committed by a killed worker after its last report
    worker_deadletters: int = 0
    notes: list[str] = field(default_factory=list)

    def close_incarnation(self, stats: StreamStats) -> None:
        self.scored += stats.samples
        self.rejected += stats.rejected_samples
        self.delivered += stats.samples + stats.rejected_samples
        self.worker_deadletters += stats.deadletters


class ReliabilityRun:
    """The scenario; `run()` returns the figures."""

    def __init__(self, gpus: int, seconds: float, workdir: Path, interval_s: float = 1.0) -> None:
        self.hosts = max(1, gpus // GPUS_PER_HOST)
        self.interval_s = interval_s  # seconds between a node's snapshots
        self.gpus = self.hosts * GPUS_PER_HOST
        self.seconds = seconds
        self.workdir = workdir
        self.partitions = 4  # Tansu creates topics with 4 partitions when a client names a missing one
        self.redis_password = "bench-" + workdir.name[-8:]
        self.samples: list[
            tuple[float, float, float, int, int]
        ] = []  # t, worker rss, broker rss, backlog, spool
        self.faults: list[Fault] = []
        self.ledger = Ledger()
        self.restarts = 0
        self.t0 = time.monotonic()

    # ------------------------------------------------------------------ set-up and tear-down
    def start(self) -> None:
        self.kafka = start_kafka()
        self.redis = start_redis(password=self.redis_password)
        self.settings = Settings(
            kafka_bootstrap=self.kafka.url, redis_url=self.redis.url, partitions=self.partitions,
            topic_samples="bench.samples", topic_risk="bench.risk", topic_deadletter="bench.deadletter",
            topic_remediation="bench.remediation", topic_outcomes="bench.outcomes", topic_commands="bench.commands",
            stream_app_id="bench-reliability", checkpoint_interval_s=60.0, rescore_interval_s=5.0,
            kafka_delivery_timeout_s=DELIVERY_TIMEOUT_S,
            # The probes put dozens of hosts in alarm at once, which the incident guard rightly reads as an
            # incident (no action at all): off, so that each probe's checkpoint is due.
            policy_max_unhealthy_hosts=0,
        )  # fmt: skip
        self._topics()
        self.worker = self._start_worker()
        self.sink = spawn_child("bench-sink", [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "sink"],
                                env=settings_env(self.settings))  # fmt: skip
        self.controller = spawn_child("bench-controller", [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "controller"],
                                      env=settings_env(self.settings))  # fmt: skip
        self.tap = DeadLetterTap(self.settings, self.partitions)
        self.downstream = Downstream(self.settings, self.partitions, self.tap)
        self.bad = BadInput(self.settings)
        self.source = _Gate(self.hosts, self.interval_s)
        spool = Spool(self.workdir / "spool", max_bytes=2 << 30)
        self.publisher = Publisher(self.settings, spool, client_id="bench-agents", delivery_timeout_s=10.0)
        self.agent = Agent(self.source, self.publisher, interval_s=self.interval_s, flush_timeout_s=30.0)
        self.agent_thread = threading.Thread(target=self.agent.run, name="bench-agents", daemon=True)

    def _topics(self) -> None:
        from gpuwatch.streams.app import windows_changelog_topic  # imports torch: only when needed

        ensure_topics(self.settings)
        ensure_compacted_topic(self.settings, windows_changelog_topic(self.settings), self.partitions)

    def _start_worker(self) -> EmbeddedServer:
        worker = start_stream_worker(self.settings, f"bench-worker-{self.restarts}")
        self.stats = StatsFollower(worker)
        self.stats.wait(
            lambda s: s.partitions == self.partitions, 180, "the worker to own every partition"
        )
        return worker

    def stop(self) -> None:
        self.source.open.set()
        self.agent.stop_event.set()
        if self.agent_thread.is_alive():
            self.agent_thread.join(60)
        self.tap.stop()
        self.downstream.stop()
        for proc in (getattr(self, "worker", None), getattr(self, "sink", None), getattr(self, "controller", None),
                     getattr(self, "redis", None), getattr(self, "kafka", None)):  # fmt: skip
            if proc is not None and proc.name == "tansu" and proc.alive():
                os.kill(proc.proc.pid, signal.SIGCONT)  # in case the run ended during the outage
            if proc is not None:
                proc.stop()

    # ------------------------------------------------------------------ measuring
    def produced(self) -> int:
        good = self.publisher.sent * GPUS_PER_HOST
        return good + sum(i.gpus for i in self.bad.injected)

    def backlog(self) -> int:
        group, topic = self.settings.stream_app_id, self.settings.topic_samples
        ends = end_offsets(self.settings, topic, self.partitions)
        done = committed_offsets(self.settings, group, topic, self.partitions)
        return sum(max(0, ends[p] - done.get(p, 0)) for p in ends) * GPUS_PER_HOST

    def sample(self, t0: float) -> None:
        try:
            backlog = self.backlog()
        except Exception as exc:  # the broker is down during its fault
            log.debug("backlog not measured: %s", exc)
            backlog = -1
        self.samples.append((time.monotonic() - t0, rss_mb(self.worker.proc.pid), rss_mb(self.kafka.proc.pid),
                             backlog, self.publisher.pending))  # fmt: skip

    def drained(self) -> bool:
        """Everything the broker holds is consumed and committed, reported by the worker, and tapped; and the
        risk and remediation topics are consumed and committed by the sinks and the controller."""
        topic = self.settings.topic_samples
        ends = end_offsets(self.settings, topic, self.partitions)
        done = committed_offsets(self.settings, self.settings.stream_app_id, topic, self.partitions)
        seen = {int(p): o for p, o in self.stats.latest.offsets.items()}
        return (
            all(done.get(p, 0) >= e and seen.get(p, 0) >= e for p, e in ends.items())
            and self.tap.caught_up()
            and self.downstream_drained()
        )

    def downstream_drained(self) -> bool:
        from gpuwatch.controller.worker import group_id as controller_group
        from gpuwatch.sinks.remediation_sink import group_id as remediation_group
        from gpuwatch.sinks.risk_sink import group_id as risk_sink_group

        s = self.settings
        for topic, groups in ((s.topic_risk, (risk_sink_group(s), remediation_group(s))),
                              (s.topic_remediation, (controller_group(s),))):  # fmt: skip
            ends = end_offsets(s, topic, self.partitions)
            for group in groups:
                done = committed_offsets(s, group, topic, self.partitions)
                if any(done.get(p, 0) < e for p, e in ends.items()):
                    return False
        return self.downstream.caught_up() and self.tap.caught_up() and self.downstream.settled()

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> float:
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            if not self.worker.alive():
                raise RuntimeError(
                    f"the stream worker died while waiting for {what}:\n{self.worker.log_tail(30)}"
                )
            time.sleep(0.5)
        return time.monotonic() - t0

    # ------------------------------------------------------------------ faults
    def broker_restart(self, outage_s: float = 15.0) -> Fault:
        from gpuwatch.streams.app import RESTART_EXIT_CODE

        fault = Fault("broker restart", time.monotonic() - self.t0)
        self.source.open.clear()  # agents pause: the memory-only broker must hold nothing unconsumed when it stops
        self.wait(
            lambda: self.publisher.pending == 0 and self.publisher.in_flight == 0, 120, "the spools to empty"
        )
        try:
            self.wait(self.drained, 300, "the worker to drain the broker")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; downstream: {self.downstream.missing()}") from None
        self.kafka.stop()
        self.source.open.set()  # the agents sample into their spools while the broker is away
        time.sleep(outage_s)
        spooled = self.publisher.pending
        self.kafka = start_kafka(port=self.kafka.port)
        self._topics()
        self.tap.restart()
        self.bad.restart()
        self.downstream.restart()
        up = time.monotonic()
        # The worker notices the recreated samples topic before it processes any of it, hands its windows to
        # the new changelog and exits to be restarted clean: this bench is its supervisor.
        while self.worker.proc.poll() is None:
            if time.monotonic() - up > 120:
                raise RuntimeError("the stream worker did not notice that the broker lost its topics")
            time.sleep(0.2)
        code = self.worker.proc.returncode
        self.ledger.close_incarnation(self.stats.latest)  # its last report, printed on the way out
        self.worker.stop()
        self.restarts += 1
        self.worker = self._start_worker()
        restored = self.stats.wait(lambda s: s.restored_gpus > 0, 120, "windows restored").restored_gpus
        self.wait(
            lambda: self.publisher.pending < self.hosts * 2, 600, "the spools to drain into the new broker"
        )
        self.wait(lambda: self.backlog() < self.hosts * GPUS_PER_HOST * 5, 600, "the worker to catch up")
        fault.recovery_s = time.monotonic() - up
        fault.survived = code == RESTART_EXIT_CODE and restored >= self.gpus * 0.99
        fault.detail = (f"{spooled} snapshots spooled during {outage_s:.0f} s; the worker handed its windows over "
                        f"(exit {code}) and its restart restored {restored} of {self.gpus}")  # fmt: skip
        return fault

    def broker_outage(self) -> Fault:
        """The broker frozen for OUTAGE_S (several delivery timeouts) while the probes' outputs are on their way."""
        fault = Fault(f"broker outage {OUTAGE_S:.0f} s", time.monotonic() - self.t0)
        procs = {"worker": self.worker, "sink": self.sink, "controller": self.controller}
        before = {name: _log_count(proc, (HELD, RESENT)) for name, proc in procs.items()}
        letters_before, restored_before = len(self.tap.letters), self.stats.latest.restored_gpus
        # A burst, so that the sinks are busy with its last records and the controller (one event at a time)
        # with a backlog of checkpoints when the broker freezes: their outputs are on the way.
        self.downstream.inject(OUTAGE_PROBES, spacing_s=0.01)
        time.sleep(0.03)
        os.kill(self.kafka.proc.pid, signal.SIGSTOP)
        try:
            time.sleep(OUTAGE_S)
        finally:
            os.kill(self.kafka.proc.pid, signal.SIGCONT)
        up = time.monotonic()
        try:
            self.wait(self.downstream.settled, 300, "every probe accounted for after the outage")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.downstream.missing()}") from None
        self.wait(lambda: self.backlog() < self.hosts * GPUS_PER_HOST * 5, 600, "the worker to catch up")
        fault.recovery_s = time.monotonic() - up
        # A worker whose group session expired meanwhile reads its uncommitted batches again and rejects what
        # it had folded as duplicates: each such rejection the bench did not inject is a replay.
        self.wait(self.tap.caught_up, 60, "the dead letters of the outage")
        resent = {(i.generation, i.partition, i.offset) for i in self.bad.injected if i.kind == "resent"}
        replays = {(x.generation, x.partition, x.offset): x.gpus for x in self.tap.letters[letters_before:]
                   if DUPLICATE in x.error and (x.generation, x.partition, x.offset) not in resent}  # fmt: skip
        replayed = sum(replays.values())
        self.ledger.replayed += replayed
        after = {name: _log_count(proc, (HELD, RESENT)) for name, proc in procs.items()}
        counts = ", ".join(f"{name} {after[name][0] - before[name][0]}/{after[name][1] - before[name][1]}"
                           for name in procs)  # fmt: skip
        rebalanced = self.stats.latest.restored_gpus != restored_before
        self.ledger.notes.append(f"outage: {replayed} GPU-samples read again by the worker")
        fault.survived = all(proc.alive() for proc in procs.values())
        fault.detail = (f"broker frozen {OUTAGE_S:.0f} s with a {DELIVERY_TIMEOUT_S:.0f} s delivery timeout; "
                        f"held-batch / resend warnings logged: {counts}; "
                        f"worker {'rejoined its group' if rebalanced else 'kept its partitions'}, "
                        f"{replayed} GPU-samples replayed; every probe accounted for")  # fmt: skip
        return fault

    def worker_kill(self) -> Fault:
        fault = Fault("stream worker SIGKILL", time.monotonic() - self.t0)
        killed = self.worker
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
        last = self.stats.latest
        topic = self.settings.topic_samples
        committed = committed_offsets(self.settings, self.settings.stream_app_id, topic, self.partitions)
        self.ledger.close_incarnation(last)
        reported = {int(p): o for p, o in last.offsets.items()}
        undecodable = [
            i for i in self.bad.injected if i.generation == self.bad.generation and not i.decodable
        ]
        replayed = unreported = 0
        for p in range(self.partitions):
            lo, hi = sorted((committed.get(p, 0), reported.get(p, 0)))
            skip = sum(1 for i in undecodable if i.partition == p and lo <= i.offset < hi)
            gpus = (hi - lo - skip) * GPUS_PER_HOST  # decodable snapshots in between (undecodable: dead letters)
            if reported.get(p, 0) >= committed.get(p, 0):
                replayed += gpus  # reported but not committed: the successor processes them again
            else:
                unreported += gpus  # processed and committed after the last report: counted by nobody
        self.ledger.replayed += replayed
        self.ledger.unreported += unreported
        self.ledger.notes.append(
            f"kill: committed {committed}, last reported {reported}: {replayed} GPU-samples replayed, "
            f"{unreported} processed after the last report"
        )
        killed.stop()
        self.restarts += 1
        started = time.monotonic()
        self.worker = self._start_worker()
        restored = self.stats.wait(lambda s: s.restored_gpus > 0, 120, "windows restored").restored_gpus
        self.wait(lambda: self.backlog() < self.hosts * GPUS_PER_HOST * 5, 600, "the new worker to catch up")
        fault.recovery_s = time.monotonic() - started
        fault.survived = restored >= self.gpus * 0.99
        fault.detail = (
            f"replacement restored {restored} of {self.gpus} windows; {replayed} GPU-samples replayed, "
            f"{unreported} processed after the killed worker's last report"
        )
        return fault

    def redis_restart(self, outage_s: float = 10.0) -> Fault:
        fault = Fault("redis restart", time.monotonic() - self.t0)
        port = self.redis.port
        self.redis.stop()
        time.sleep(outage_s)
        self.redis = start_redis(port=port, password=self.redis_password)
        back = self.source.sim.now  # sample time (the agents' clock stopped while they were paused)
        client = redis.Redis.from_url(self.redis.url, socket_timeout=10)
        try:

            def fresh() -> bool:
                return int(client.zcount(k.LASTSEEN, back, "+inf")) >= self.gpus

            fault.recovery_s = self.wait(fresh, 180, "every GPU's risk back in Redis")
        finally:
            client.close()
        fault.survived = self.sink.alive()
        fault.detail = (
            f"sink process kept running; all {self.gpus} GPUs in Redis again {fault.recovery_s:.1f} s later"
        )
        return fault

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        self.start()
        schedule: list[tuple[float, Callable[[], Fault]]] = [
            (0.20, self.broker_restart), (0.40, self.broker_outage), (0.60, self.worker_kill),
            (0.80, self.redis_restart),
        ]  # fmt: skip
        _say(
            f"{self.gpus:,} GPUs ({self.hosts:,} hosts) at 1 Hz for {self.seconds:.0f} s; faults at 20/40/60/80 %"
        )
        self.agent_thread.start()
        t0 = self.t0 = time.monotonic()
        next_sample = next_bad = t0
        while (elapsed := time.monotonic() - t0) < self.seconds:
            if schedule and elapsed >= schedule[0][0] * self.seconds:
                _, inject = schedule.pop(0)
                fault = inject()
                self.faults.append(fault)
                _say(f"{fault.name}: {'survived' if fault.survived else 'NOT survived'} ({fault.detail}); "
                     f"recovered in {fault.recovery_s:.1f} s")  # fmt: skip
            now = time.monotonic()
            if now >= next_bad:
                self.bad.inject(self.source)
                self.downstream.inject()
                next_bad = now + PROBE_EVERY_S
            if now >= next_sample:
                self.sample(t0)
                next_sample = now + SAMPLE_EVERY_S
                _say(f"t={elapsed:5.0f} s  produced {self.produced():,}  backlog {self.samples[-1][3]:,}  "
                     f"worker rss {self.samples[-1][1]:.0f} MiB  broker rss {self.samples[-1][2]:.0f} MiB")  # fmt: skip
            if not self.worker.alive():
                raise RuntimeError(f"the stream worker died:\n{self.worker.log_tail(30)}")
            time.sleep(0.2)
        self.source.open.clear()  # the agents stop sampling; what they took is delivered and accounted
        self.wait(
            lambda: self.publisher.pending == 0 and self.publisher.in_flight == 0, 300, "the spools to empty"
        )
        try:
            self.wait(self.drained, 600, "the worker to process everything")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; downstream: {self.downstream.missing()}") from None
        time.sleep(2.5)  # one more STATS line after the last batch
        self.ledger.close_incarnation(self.stats.latest)
        return self.figures()

    def figures(self) -> dict[str, Any]:
        ledger = self.ledger
        letters: dict[tuple[int, int, int], Letter] = {}
        for letter in self.tap.letters:
            # rejected duplicates are counted by the worker; the sinks' and the controller's letters below
            if DUPLICATE not in letter.error and letter.topic == self.settings.topic_samples:
                letters.setdefault((letter.generation, letter.partition, letter.offset), letter)
        undecodable = sum(letter.gpus for letter in letters.values())
        injected = sum(i.gpus for i in self.bad.injected if not i.decodable)
        produced = self.produced()
        dead_lettered = ledger.rejected + undecodable
        measured = [s for s in self.samples if s[3] >= 0]
        windows = [(f.at_s, f.at_s + f.recovery_s + 30.0) for f in self.faults]
        calm = [s for s in measured if not any(a <= s[0] <= b for a, b in windows)]
        kills = [f.at_s for f in self.faults if f.name == "stream worker SIGKILL"]
        last_worker = [s for s in measured if s[0] >= (kills[-1] + 60.0 if kills else 60.0)]
        return {
            "samples_produced": produced,
            "scored": ledger.scored,
            "dead_lettered": dead_lettered,
            "replayed": ledger.replayed,
            "processed_unreported": ledger.unreported,
            "unaccounted": produced - (ledger.scored + dead_lettered - ledger.replayed + ledger.unreported),
            **self.downstream.accounting(),
            "bad_snapshots_injected": len(self.bad.injected),
            "undecodable_dead_lettered_match_injected": undecodable == injected,
            "faults_injected": len(self.faults),
            "faults_survived": sum(f.survived for f in self.faults),
            "peak_rss_mb": round(max((s[1] for s in measured), default=0.0), 1),
            "rss_trend_mb_per_min": round(
                slope_per_min([s[0] for s in last_worker], [s[1] for s in last_worker]), 2
            ),
            "lag_trend_samples_per_min": round(slope_per_min([s[0] for s in calm], [s[3] for s in calm]), 1),
            "lag_max_samples": max((s[3] for s in measured), default=0),
            "lag_final_samples": measured[-1][3] if measured else 0,
            "broker_peak_rss_mb": round(max((s[2] for s in self.samples), default=0.0), 1),
            "gpus": self.gpus,
            "seconds": self.seconds,
            "agent_late_ticks": self.agent.late_ticks,
            "spool_dropped": self.publisher.spool.dropped,
            "faults": [
                {**vars(f), "at_s": round(f.at_s, 1), "recovery_s": round(f.recovery_s, 1)}
                for f in self.faults
            ],  # fmt: skip
            "series": [
                {
                    "t_s": round(s[0], 1),
                    "worker_rss_mb": round(s[1], 1),
                    "broker_rss_mb": round(s[2], 1),
                    "backlog_samples": s[3],
                    "spool_snapshots": s[4],
                }
                for s in self.samples
            ],  # fmt: skip
            "notes": ledger.notes,
        }


def run_reliability_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the scenario (`args.gpus`, `args.seconds`), prints the table, writes `args.json_path`."""
    gpus = args.gpus or 10_000
    seconds = args.seconds or 600.0
    workdir = Path(tempfile.mkdtemp(prefix="gpuwatch-bench-reliability-"))
    run = ReliabilityRun(gpus, seconds, workdir)
    try:
        figures = run.run()
    finally:
        run.stop()
        subprocess.run(["rm", "-rf", str(workdir)], check=False)
    notes = {
        "samples_produced": "GPU-samples the broker acknowledged (bad snapshots included)",
        "scored": "folded into a GPU's window (replays counted again)",
        "dead_lettered": "rejected duplicates + GPU-samples of undecodable snapshots",
        "replayed": "processed twice after the worker kill (from offsets)",
        "processed_unreported": "folded by the killed worker after its last report (offsets)",
        "unaccounted": "produced - (scored + dead_lettered - replayed + unreported); must be 0",
        "remediation_probes": "alarm episodes injected, each must give one checkpoint",
        "remediation_direct": "events injected straight to the controller",
        "remediation_events": "distinct event ids on the topic (probes', direct, fleet's)",
        "remediation_outcomes": "of those, with an outcome from the controller",
        "downstream_bad_injected": "undecodable risk records + remediation events",
        "downstream_dead_lettered": "of those, dead-lettered at their offset (risk sink, controller)",
        "downstream_unaccounted": "probes without event + events without outcome + bad without letter; must be 0",
        "faults_survived": f"of {figures['faults_injected']}",
        "peak_rss_mb": "stream worker, MiB",
        "rss_trend_mb_per_min": "worker RSS slope after its last start (+60 s)",
        "lag_trend_samples_per_min": "backlog slope outside fault windows",
        "broker_peak_rss_mb": "Tansu keeps every message in memory",
    }
    rows = [(key, value, notes.get(key, "")) for key, value in figures.items() if not isinstance(value, list)]
    title = (f"gpuwatch bench reliability ({figures['gpus']:,} GPUs at 1 Hz, {seconds:.0f} s, "
             f"delivery timeout {DELIVERY_TIMEOUT_S:.0f} s)")  # fmt: skip
    emit(title, rows, figures,
         args.json_path)  # fmt: skip
    return figures
