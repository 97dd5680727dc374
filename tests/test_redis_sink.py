"""RiskWriter, RiskClient and the Redis sink against a real redis-server (and a real broker for the sink)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import msgspec
import orjson
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from helpers import wait_for
from msgspec.structs import replace

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer, start_redis
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import decode_deadletter, encode_risk, load_schema
from gpuwatch.schemas.fields import FailureMode
from gpuwatch.schemas.records import Risk
from gpuwatch.sinks.redis_writer import RiskWriter
from gpuwatch.sinks.risk_client import RiskClient
from gpuwatch.sinks.risk_sink import group_id, run_risk_sink
from gpuwatch.sinks.top import Frame, render

NOW = 1_750_000_000.0


def rec(host: str, gpu: int, ts: float, risk: float, mode: FailureMode = "none", **optional: Any) -> Risk:
    return Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=risk, horizon_s=3600.0, mode=mode,
                model="test-model", scored_at=ts + 0.5, **optional)


def assert_follows_schema(name: str, answer: msgspec.Struct | None) -> None:
    """A RiskClient answer is the JSON object its schema file (schemas/{name}.json) describes."""
    assert answer is not None
    jsonschema.Draft202012Validator(load_schema(name)).validate(msgspec.to_builtins(answer))


@pytest.fixture()
def writer(redis_client: redis.Redis) -> RiskWriter:
    return RiskWriter(redis_client, history_len=5, expire_after_s=3600.0)


@pytest.fixture()
def client(redis_client: redis.Redis) -> RiskClient:
    return RiskClient(redis_client, stale_after_s=60.0, clock=lambda: NOW)


# ------------------------------------------------------------------------------------------ RiskWriter


def test_out_of_order_and_duplicate_records_leave_the_newest(writer: RiskWriter, client: RiskClient) -> None:
    assert writer.write_batch([rec("n1", 0, NOW - 10, 0.5), rec("n1", 0, NOW, 0.9, "memory")]) == 2
    # an older record, a duplicate of the newest and (within one batch) an old one after a newer one
    assert writer.write_batch([rec("n1", 0, NOW - 5, 0.1), rec("n1", 0, NOW, 0.2)]) == 0
    assert writer.write_batch([rec("n1", 1, NOW, 0.3), rec("n1", 1, NOW - 1, 0.99)]) == 1

    gpu0 = client.risk("n1", 0)
    assert gpu0 is not None
    assert (gpu0.risk, gpu0.mode, gpu0.ts) == (0.9, "memory", NOW)
    assert client.risk("n1", 1).risk == 0.3  # type: ignore[union-attr]
    assert [r.risk for r in client.history("n1", 0)] == [0.9, 0.5]  # only applied records, newest first
    assert client.host_risk("n1").max_risk == 0.9  # type: ignore[union-attr]


def test_a_record_stamped_ahead_of_the_sink_is_stored_at_the_sink_clock_and_holds_nothing_back(
    writer: RiskWriter, redis_client: redis.Redis
) -> None:
    # A node clock 120 s fast: its ts would read as fresh (negative age) and block the real records after it.
    assert writer.write_batch([rec("n1", 0, NOW + 120, 0.4)], written_at=NOW) == 1
    gpu = RiskClient(redis_client, stale_after_s=60.0, clock=lambda: NOW + 1).risk("n1", 0)
    assert gpu is not None and gpu.ts == NOW and gpu.age_s == pytest.approx(1.0)
    assert redis_client.zscore(k.LASTSEEN, "n1:0") == NOW
    # The next record on the right clock is applied; without any, the GPU goes stale as a silent one should.
    assert writer.write_batch([rec("n1", 0, NOW + 1, 0.5)], written_at=NOW + 1.5) == 1
    assert RiskClient(redis_client, stale_after_s=60.0, clock=lambda: NOW + 2).risk("n1", 0).risk == 0.5  # type: ignore[union-attr]
    later = RiskClient(redis_client, stale_after_s=60.0, clock=lambda: NOW + 100).risk("n1", 0)
    assert later is not None and later.stale is True


def test_host_rollup_goes_down_when_the_riskiest_gpu_recovers(writer: RiskWriter, client: RiskClient) -> None:
    writer.write_batch([rec("n1", g, NOW - 20, 0.1 * g) for g in range(8)])
    writer.write_batch([rec("n1", 5, NOW - 10, 0.97, "thermal")])
    host = client.host_risk("n1")
    assert host is not None
    assert (host.max_risk, host.max_gpu, host.max_mode, host.gpus) == (0.97, 5, "thermal", 8)

    writer.write_batch([rec("n1", 5, NOW, 0.05)])
    host = client.host_risk("n1")
    assert host is not None
    assert (host.max_risk, host.max_gpu) == (pytest.approx(0.7), 7)
    assert client.top(1)[0].gpu_index == 7
    assert (host.oldest_ts, host.newest_ts) == (NOW - 20, NOW)


def test_history_is_capped_and_keys_expire(writer: RiskWriter, redis_client: redis.Redis) -> None:
    writer.write_batch([rec("n1", 0, NOW + i, i / 10) for i in range(8)])
    assert redis_client.llen(k.hist_key("n1", 0)) == 5
    for key in (k.gpu_key("n1", 0), k.hist_key("n1", 0), k.host_key("n1"), k.host_gpus_key("n1")):
        assert 0 < redis_client.ttl(key) <= 3600


def test_prune_forgets_gpus_gone_for_good(writer: RiskWriter, client: RiskClient) -> None:
    writer.write_batch([rec("n1", 0, NOW - 4000, 0.9), rec("n1", 1, NOW, 0.2), rec("n2", 0, NOW - 5000, 0.5)])
    assert writer.prune(NOW) == 2
    assert client.risk("n1", 0) is None and client.host_risk("n2") is None
    assert client.host_risk("n1").max_risk == 0.2  # type: ignore[union-attr]
    assert [g.host for g in client.top(10)] == ["n1"]
    assert client.healthy_hosts(0.5) == ["n1"]


def test_the_hashes_hold_the_fields_the_layout_names(writer: RiskWriter, redis_client: redis.Redis) -> None:
    """schemas/redis_keys.py (and docs/redis.md) name every field the sink writes, no more, no fewer."""
    writer.write_batch([rec("n1", 0, NOW, 0.5, "memory", alarm=True, op="model:0.5x1")])
    assert {f.decode() for f in redis_client.hkeys(k.gpu_key("n1", 0))} == set(k.GPU_FIELDS)
    assert {f.decode() for f in redis_client.hkeys(k.host_key("n1"))} == set(k.HOST_FIELDS)


def test_big_batches_are_split_and_survive_a_script_flush(
    redis_client: redis.Redis, client: RiskClient
) -> None:
    writer = RiskWriter(redis_client, chunk=7)
    batch = [rec(f"n{h}", g, NOW, (h * 8 + g) / 1000) for h in range(10) for g in range(8)]
    assert writer.write_batch(batch) == 80
    redis_client.script_flush()
    assert writer.write_batch([rec("n0", 0, NOW + 1, 0.5)]) == 1
    assert client.top(1)[0].risk == 0.5


# ------------------------------------------------------------------------------------------ RiskClient


def test_risk_client_answers_and_marks_stale_data(writer: RiskWriter, redis_client: redis.Redis) -> None:
    writer.write_batch(
        [rec("a", g, NOW - 5, 0.1) for g in range(8)]
        + [rec("b", g, NOW - 5, 0.2) for g in range(8)]
        + [rec("b", 3, NOW - 4, 0.95, "memory")]
        + [rec("c", g, NOW - 5, 0.3) for g in range(8) if g != 6]
        + [rec("c", 6, NOW - 300, 0.05)]  # c's GPU 6 stopped reporting: c is stale
    )
    client = RiskClient(redis_client, stale_after_s=60.0, clock=lambda: NOW)

    gpu = client.risk("b", 3)
    assert gpu is not None
    assert (
        gpu.risk == 0.95
        and gpu.mode == "memory"
        and gpu.uuid == "GPU-b-3"
        and gpu.model == "test-model"
    )
    assert gpu.stale is False and gpu.age_s == pytest.approx(4.0)
    assert isinstance(gpu.gpu_index, int) and isinstance(gpu.written_at, float)
    assert client.risk("b", 9) is None and client.host_risk("zzz") is None
    assert_follows_schema("gpu_risk", gpu)
    assert_follows_schema("host_risk", client.host_risk("c"))
    assert_follows_schema("fleet_gpu", client.fleet()[0])

    assert client.host_risk("c").stale is True  # type: ignore[union-attr]
    assert client.host_risk("a").stale is False  # type: ignore[union-attr]
    assert [(g.host, g.gpu_index) for g in client.top(2)] == [("b", 3), ("c", 7)]
    assert client.healthy_hosts(0.5) == ["a"]  # b is too risky, c is stale
    assert client.healthy_hosts(0.99) == ["a", "b"]
    assert client.stale_gpus() == ["c:6"]

    later = RiskClient(redis_client, stale_after_s=60.0, clock=lambda: NOW + 120)
    assert later.risk("b", 3).stale is True  # type: ignore[union-attr]
    assert later.healthy_hosts(1.0) == []


def test_a_gpu_hash_without_a_readable_ts_reads_as_stale_not_as_an_error(
    writer: RiskWriter, client: RiskClient, redis_client: redis.Redis
) -> None:
    writer.write_batch([rec("a", 0, NOW - 5, 0.9), rec("a", 1, NOW - 5, 0.5), rec("b", 0, NOW - 5, 0.1)])
    redis_client.hdel(k.gpu_key("a", 0), "ts", "gpu_index")  # written by another tool, or cut short
    redis_client.hset(k.gpu_key("a", 1), mapping={"ts": "soon", "risk": "high"})
    redis_client.hset(k.host_key("b"), mapping={"oldest_ts": "soon", "max_gpu": "x", "alarms": "?"})

    gpu = client.risk("a", 0)
    assert gpu is not None
    assert (gpu.ts, gpu.age_s, gpu.stale, gpu.gpu_index, gpu.risk) == (None, None, True, 0, 0.9)
    odd = client.risk("a", 1)
    assert odd is not None and (odd.ts, odd.risk, odd.stale) == (None, None, True)
    assert [(g.host, g.gpu_index, g.stale) for g in client.top(3)] == [
        ("a", 0, True), ("a", 1, True), ("b", 0, False)
    ]
    host = client.host_risk("b")
    assert host is not None and (host.oldest_ts, host.max_gpu, host.alarms, host.stale) == (
        None, None, 0, True
    )  # fmt: skip
    assert client.healthy_hosts() == ["a"]  # b's rollup has no readable oldest_ts: unknown, so not healthy
    assert_follows_schema("gpu_risk", odd)
    assert_follows_schema("host_risk", host)
    table = render(Frame(client.top(3), 3, 2, 0, 0, None, NOW), n=3)
    assert "a:1        ?  -" in table and "STALE" in table


def test_alarms_and_failures_are_kept_per_gpu_per_host_and_fleet_wide(writer: RiskWriter, client: RiskClient) -> None:
    alarm = rec("a", 1, NOW, 3e-4, "memory", alarm=True, op="model:0.66x2")
    failed = rec("b", 2, NOW, 1.0, "memory", failed=True, failed_since=NOW - 30)
    quiet = [rec(h, 0, NOW, 1e-6) for h in ("a", "b", "c")]
    writer.write_batch([alarm, failed, *quiet])
    gpu = client.risk("a", 1)
    assert gpu is not None and (gpu.alarm, gpu.drain, gpu.failed, gpu.op) == (True, False, False, "model:0.66x2")
    assert client.risk("b", 2).failed is True  # type: ignore[union-attr]
    assert (client.alarms(), client.failed()) == (["a:1"], ["b:2"])
    assert [(h.alarms, h.failed) for h in map(client.host_risk, "abc")] == [(1, 0), (0, 1), (0, 0)]  # type: ignore[union-attr]
    assert client.healthy_hosts() == ["c"]  # a has a GPU in alarm, b a failed one, whatever their risk
    # the alarm clears and the failed GPU is repaired: both hosts are healthy again
    writer.write_batch([replace(alarm, ts=NOW + 5, alarm=False), replace(failed, ts=NOW + 5, failed=False, risk=1e-6)])
    assert (client.alarms(), client.failed()) == ([], [])
    assert sorted(client.healthy_hosts()) == ["a", "b", "c"]


def test_risk_client_from_a_url_and_a_bytes_client(writer: RiskWriter, redis_server: EmbeddedServer) -> None:
    writer.write_batch([rec("n1", 2, NOW, 0.4)])
    with RiskClient(redis_server.url, clock=lambda: NOW) as by_url:
        assert by_url.risk("n1", 2).risk == 0.4  # type: ignore[union-attr]
    raw = redis.Redis.from_url(redis_server.url)  # decode_responses=False
    assert RiskClient(raw, clock=lambda: NOW).top(1)[0].host == "n1"
    raw.close()


def test_the_top_level_package_exports_risk_client() -> None:
    import gpuwatch

    assert gpuwatch.RiskClient is RiskClient


# ------------------------------------------------------------------------------------------ the sink


def read_all(settings: Settings, topic: str, n: int, timeout: float = 15.0) -> list[bytes]:
    """Reads `n` messages of `topic` from the beginning by direct assignment (no group join)."""
    consumer = Consumer(
        {**settings.kafka_client_config(), "group.id": "test-reader", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            out.append(msg.value())
    consumer.close()
    return out


@pytest.fixture()
def sink(settings: Settings) -> Iterator[tuple[list[Risk], threading.Event]]:
    ensure_topics(settings, [settings.topic_risk, settings.topic_deadletter])
    written: list[Risk] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=run_risk_sink,
        args=(settings,),
        kwargs={"stop": stop, "on_written": lambda recs, at: written.extend(recs), "poll_timeout_s": 0.05},
        daemon=True,
    )
    thread.start()
    yield written, stop
    stop.set()
    thread.join(15)
    assert not thread.is_alive()


def test_sink_writes_records_dead_letters_garbage_and_commits(
    settings: Settings, sink: tuple[list[Risk], threading.Event], redis_client: redis.Redis
) -> None:
    written, stop = sink
    producer = make_producer(settings)
    now = time.time()
    for h in range(3):
        for g in range(8):
            producer.produce(settings.topic_risk, encode_risk(rec(f"h{h}", g, now, g / 10)), key=f"h{h}")
    producer.produce(settings.topic_risk, b'{"schema": "gpuwatch.risk/1", "host": 7}', key=b"h0")
    producer.flush(10)

    wait_for(lambda: len(written) == 24, what="24 records in Redis")
    client = RiskClient(redis_client)
    assert client.host_risk("h2").max_risk == 0.7  # type: ignore[union-attr]
    assert len(client.top(100)) == 24

    [dead] = read_all(settings, settings.topic_deadletter, 1)
    letter = decode_deadletter(dead)
    assert letter.stage == "risk-sink" and "host" in letter.error
    assert orjson.loads(letter.original)["host"] == 7

    def committed() -> int:
        c = Consumer({**settings.kafka_client_config(), "group.id": group_id(settings)})
        parts = c.committed([TopicPartition(settings.topic_risk, p) for p in range(settings.partitions)], 10)
        c.close()
        return sum(max(tp.offset, 0) for tp in parts)

    wait_for(lambda: committed() == 25, what="offsets of all 25 messages committed")


def test_sink_waits_out_a_redis_outage(
    settings: Settings, redis_server: EmbeddedServer, sink: tuple[list[Risk], threading.Event]
) -> None:
    written, _ = sink
    producer = make_producer(settings)
    now = time.time()
    producer.produce(settings.topic_risk, encode_risk(rec("h0", 0, now, 0.1)), key="h0")
    producer.flush(10)
    wait_for(lambda: len(written) == 1, what="first record")

    redis_server.stop()
    producer.produce(settings.topic_risk, encode_risk(rec("h0", 1, now, 0.6)), key="h0")
    producer.flush(10)
    time.sleep(0.5)  # let the sink hit the outage (not a timing assertion)
    assert len(written) == 1

    restarted = start_redis(port=redis_server.port)
    try:
        wait_for(lambda: len(written) == 2, what="the record held during the outage")
        fresh = redis.Redis.from_url(restarted.url)
        assert RiskClient(fresh).risk("h0", 1).risk == 0.6  # type: ignore[union-attr]
        fresh.close()
    finally:
        restarted.stop()
