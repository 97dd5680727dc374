"""Every GPU-sample produced is either scored or in the dead-letter topic with a reason: counted at both ends.

1,024 simulated GPUs send four minutes of 1 Hz telemetry (fleet time; published as fast as the worker takes
it) with bad snapshots mixed in. The producer counts what the broker acknowledged; at the other end the
worker's own counters say what it folded into windows or rejected, and the dead-letter topic is read back.
"""

from __future__ import annotations

import time

import orjson
import pytest
from confluent_kafka import KafkaError, Message

from gpuwatch.apps.bench.reliability import claimed_gpus, committed_offsets, end_offsets
from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_producer, partition_count, read_partitions_to_end
from gpuwatch.processes import StatsFollower, start_stream_worker
from gpuwatch.schemas.codecs import decode_deadletter
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator

pytestmark = pytest.mark.slow

HOSTS, STEPS = 128, 240  # 1,024 GPUs, four minutes at 1 Hz


def _bad(kind: str, raw: bytes, older: bytes) -> bytes:
    obj = orjson.loads(raw)
    if kind == "wrong type":
        obj["gpus"][1]["temp_c"] = "71"
    elif kind == "negative counter":
        obj["gpus"][2]["ecc_dbe_volatile"] = -3
    elif kind == "absurd value":
        obj["gpus"][3]["power_w"] = 1e300
    elif kind == "far future ts":
        obj["ts"] += 7200.0
    elif kind == "deep nesting":
        obj["extra"] = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]
    elif kind == "NaN":
        return raw.replace(b'"power_w":', b'"power_w":NaN,"was":', 1)
    elif kind == "invalid UTF-8":
        return raw.replace(b'"host":"', b'"host":"\xc3\x28', 1)
    elif kind == "resent":  # an older snapshot of the same host again: its GPUs already have newer samples
        return older
    return orjson.dumps(obj)


KINDS = ("wrong type", "negative counter", "absurd value", "far future ts", "deep nesting", "NaN",
         "invalid UTF-8", "resent")  # fmt: skip


def test_every_gpu_sample_is_scored_or_dead_lettered_at_1024_gpus(settings: Settings) -> None:
    settings = settings.replace(partitions=4, rescore_interval_s=5.0)
    ensure_topics(settings, [settings.topic_samples, settings.topic_risk, settings.topic_deadletter])
    worker = start_stream_worker(settings, "accounting-worker", stats_interval_s=0.5)
    stats = StatsFollower(worker)
    stats.wait(lambda s: s.partitions == 4, 120, "the worker's partitions")

    sim = FleetSimulator(FleetConfig(hosts=HOSTS, seed=31, start_ts=time.time() - STEPS - 30))
    producer = make_producer(settings, **{"linger.ms": 20})
    acked = {"good": 0, "bad": 0, "resent": 0}
    injected: dict[bytes, str] = {}

    def delivered(kind: str, gpus: int) -> object:
        def report(err: KafkaError | None, msg: Message) -> None:
            assert err is None, err
            acked[kind] += gpus

        return report

    history: list[list[tuple[str, bytes]]] = []
    try:
        for step in range(STEPS):
            pairs = sim.step_json()
            for host, value in pairs:
                producer.produce(settings.topic_samples, value, key=host, on_delivery=delivered("good", 8))
            history.append(pairs[: len(KINDS)])
            if step % 20 == 10:  # bad snapshots of real hosts, in their partitions, between good ones
                for i, kind in enumerate(KINDS):
                    host, raw = pairs[i]
                    bad = _bad(kind, raw, dict(history[-6])[host])
                    injected[bad] = kind
                    bucket = "resent" if kind == "resent" else "bad"
                    producer.produce(
                        settings.topic_samples,
                        bad,
                        key=host,
                        on_delivery=delivered(bucket, claimed_gpus(bad)),
                    )
            producer.poll(0)
        assert producer.flush(60) == 0
        produced = acked["good"] + acked["bad"] + acked["resent"]
        assert produced == HOSTS * 8 * STEPS + 8 * len(KINDS) * (STEPS // 20)

        def drained() -> bool:
            ends = end_offsets(settings, settings.topic_samples, 4)
            done = committed_offsets(settings, settings.stream_app_id, settings.topic_samples, 4)
            seen = {int(p): o for p, o in stats.latest.offsets.items()}
            return all(done[p] >= e and seen.get(p, 0) >= e for p, e in ends.items())

        deadline = time.monotonic() + 240
        while not drained():
            assert time.monotonic() < deadline, f"the worker did not finish; stats {stats.latest}"
            assert worker.alive(), worker.log_tail(30)
            time.sleep(1.0)
        counts = stats.latest
        n = partition_count(settings, settings.topic_deadletter)
        letters = [decode_deadletter(v) for _, v in read_partitions_to_end(settings, settings.topic_deadletter,
                                                                           list(range(n)))]  # fmt: skip
    finally:
        worker.stop()

    # The dead-letter side: one letter per bad snapshot, each with a reason and the original bytes.
    assert len(letters) == counts.deadletters == len(injected)
    by_kind: dict[str, int] = {}
    undecodable = rejected = 0
    for letter in letters:
        original = letter.original
        kind = injected[original]
        by_kind[kind] = by_kind.get(kind, 0) + 1
        assert letter.error and letter.stage == "stream"
        if "duplicate or out of order" in letter.error:
            assert kind == "resent"
            rejected += len(letter.error.split("GPU(s) ", 1)[1].split(" already")[0].split(","))
        else:
            undecodable += claimed_gpus(original)
    assert by_kind == dict.fromkeys(KINDS, STEPS // 20)

    # Both ends agree: produced = scored + dead-lettered, none unaccounted.
    scored = counts.samples
    dead_lettered = undecodable + counts.rejected_samples
    assert counts.rejected_samples == rejected == acked["resent"]
    assert scored == acked["good"]  # every good GPU-sample went into its window
    unaccounted = produced - (scored + dead_lettered)
    assert unaccounted == 0, (produced, scored, dead_lettered)
