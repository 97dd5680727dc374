"""The thin path end to end on real servers: snapshot in, risk on the topic and in Redis out."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import orjson
import pytest
import redis
from helpers import consume_from_start

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.processes import start_stream_worker
from gpuwatch.schemas.codecs import decode_deadletter, decode_risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.sinks.risk_client import RiskClient
from gpuwatch.sinks.risk_sink import run_risk_sink


@pytest.fixture()
def worker(settings: Settings) -> Iterator[EmbeddedServer]:
    """A real `gpuwatch stream` process on the test's topics, scoring every sample."""
    settings = settings.replace(rescore_interval_s=0.5)
    ensure_topics(settings)
    proc = start_stream_worker(settings)
    yield proc
    proc.stop()


def _collect(settings: Settings, topics: list[str], until: callable, timeout: float = 60.0) -> dict[str, list]:  # type: ignore[valid-type]
    return consume_from_start(settings, topics, until, timeout)  # assigned partitions: no group join to wait for


def test_snapshots_become_risk_on_topic_and_in_redis(settings: Settings, worker: EmbeddedServer) -> None:
    stop = threading.Event()
    sink = threading.Thread(target=run_risk_sink, args=(settings,), kwargs={"stop": stop}, daemon=True)
    sink.start()
    sim = FleetSimulator(FleetConfig(hosts=2, gpus_per_host=8, seed=3, start_ts=time.time() - 30))
    producer = make_producer(settings)
    for _ in range(30):
        for host, value in sim.step_json():
            producer.produce(settings.topic_samples, key=host.encode(), value=value)
    assert producer.flush(10) == 0

    got = _collect(settings, [settings.topic_risk], lambda g: len({decode_risk(v).uuid for v in g[settings.topic_risk]}) >= 16)
    records = [decode_risk(v) for v in got[settings.topic_risk]]
    assert {(r.host, r.gpu_index) for r in records} == {(h, g) for h in sim.hosts for g in range(8)}
    assert all(0.0 <= r.risk <= 1.0 and r.model for r in records)

    client = RiskClient(redis.Redis.from_url(settings.redis_url))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(client.top(100)) < 16:
        time.sleep(0.2)
    stop.set()
    sink.join(10)
    top = client.top(100)
    assert len(top) == 16
    newest = max(r.ts for r in records if r.host == sim.hosts[0] and r.gpu_index == 0)
    assert client.risk(sim.hosts[0], 0).ts == pytest.approx(newest)  # type: ignore[union-attr]


def test_malformed_message_is_dead_lettered_and_worker_keeps_going(settings: Settings, worker: EmbeddedServer) -> None:
    sim = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=8, seed=4, start_ts=time.time() - 10))
    producer = make_producer(settings)
    bad = [b"{not json", orjson.dumps({"schema": "gpuwatch.samples/1", "host": "x", "ts": 1.0, "seq": 0, "gpus": "oops"})]
    for value in bad:
        producer.produce(settings.topic_samples, key=b"bad", value=value)
    for _ in range(3):
        for host, value in sim.step_json():
            producer.produce(settings.topic_samples, key=host.encode(), value=value)
    assert producer.flush(10) == 0

    got = _collect(
        settings, [settings.topic_risk, settings.topic_deadletter],
        lambda g: len(g[settings.topic_deadletter]) >= 2 and len(g[settings.topic_risk]) >= 8,
    )
    letters = [decode_deadletter(v) for v in got[settings.topic_deadletter]]
    assert sorted(d.original for d in letters) == sorted(bad)
    assert all(d.error and d.source.topic == settings.topic_samples for d in letters)
    # The good snapshots after the bad ones were still scored.
    assert {decode_risk(v).gpu_index for v in got[settings.topic_risk]} == set(range(8))
    assert worker.alive()


def test_a_silent_gpu_keeps_getting_risk_records_with_its_last_ts(settings: Settings) -> None:
    settings = settings.replace(risk_refresh_s=3.0, rescore_interval_s=0.5)
    ensure_topics(settings)
    proc = start_stream_worker(settings)
    try:
        sim = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=8, seed=5, start_ts=time.time() - 5))
        producer = make_producer(settings)
        for _ in range(5):
            for host, value in sim.step_json():
                producer.produce(settings.topic_samples, key=host.encode(), value=value)
        assert producer.flush(10) == 0
        last_ts = sim.now
        # The host then goes silent: its GPUs' last records are published again (every risk_refresh_s), stamped
        # with their last sample's ts, as they were: not a new scoring of a sample eval would not score.
        def at_last(g: dict) -> list[bytes]:
            return [v for v in g[settings.topic_risk] if decode_risk(v).ts == pytest.approx(last_ts, abs=1e-3)]

        got = _collect(settings, [settings.topic_risk], lambda g: len(at_last(g)) >= 24)
        copies: dict[str, list[bytes]] = {}
        for v in at_last(got):
            copies.setdefault(decode_risk(v).uuid, []).append(v)
        assert len(copies) == 8
        assert all(len(c) >= 2 and len(set(c)) == 1 for c in copies.values())  # re-published unchanged
    finally:
        proc.stop()
