"""The agent against a real Kafka-protocol broker (Tansu): valid snapshots, metrics and health, spooling
through a broker outage with nothing missing and per-host order kept, restart and SIGTERM flushes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer, free_port, start_kafka
from gpuwatch.kafka import ensure_topics, partition_count, read_partitions_to_end
from gpuwatch.producers.agent import Agent, MetricsServer, NvmlSource, SimulatedSource, build_agent
from gpuwatch.producers.nvml import NvmlSampler
from gpuwatch.producers.publisher import Publisher
from gpuwatch.producers.spool import Spool
from gpuwatch.schemas.codecs import decode_snapshot
from gpuwatch.simulator.fake_nvml import FakeNvml


def _read_all(settings: Settings) -> list[tuple[bytes | None, bytes | None]]:
    n = partition_count(settings, settings.topic_samples)
    return read_partitions_to_end(settings, settings.topic_samples, list(range(n)), timeout=30) if n else []


def _wait(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _nvml_agent(settings: Settings, spool_dir: Path, *, gpus: int = 8, interval_s: float = 0.1,
                host: str = "gpu-node-1", flush_timeout_s: float = 10.0) -> Agent:  # fmt: skip
    source = NvmlSource(NvmlSampler(FakeNvml(gpus), xid_wait_ms=100), host)
    publisher = Publisher(settings, Spool(spool_dir), delivery_timeout_s=5.0)
    return Agent(source, publisher, interval_s=interval_s, flush_timeout_s=flush_timeout_s)


def test_nvml_agent_publishes_valid_snapshots_and_serves_metrics(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings, [settings.topic_samples])
    agent = _nvml_agent(settings, tmp_path / "spool")
    fake = agent.source.sampler.nvml  # type: ignore[attr-defined]
    fake.gpus[5].lost = True
    fake.inject_xid(2, 48)
    server = MetricsServer(agent, free_port(), "127.0.0.1")
    try:
        agent.run(max_ticks=12)
        code, body = _get(f"http://127.0.0.1:{server.port}/healthz")
        health = json.loads(body)
        assert code == 200 and health["status"] == "ok"
        assert (health["sent"], health["spool_depth"], health["gpus"], health["gpus_lost"]) == (12, 0, 8, 1)
        code, body = _get(f"http://127.0.0.1:{server.port}/metrics")
        metrics = body.decode()
        assert code == 200
        for line in ("gpuwatch_agent_snapshots_sent_total 12.0", "gpuwatch_agent_spool_messages 0.0",
                     "gpuwatch_agent_nvml_errors_total 0.0", "gpuwatch_agent_gpus 8.0",
                     "gpuwatch_agent_xid_total 1.0", "gpuwatch_agent_snapshots_dropped_total 0.0"):  # fmt: skip
            assert line in metrics.splitlines(), line
    finally:
        server.stop()

    records = _read_all(settings)
    assert len(records) == 12
    snaps = [decode_snapshot(value) for _, value in records]
    assert {key for key, _ in records} == {b"gpu-node-1"}
    assert [s.seq for s in snaps] == list(range(12))
    assert all(len(s.uuids) == 8 for s in snaps)
    assert sum(len(x) for s in snaps for x in s.xids) == 1  # the XID appears in exactly one snapshot


class _GatedSource(SimulatedSource):
    """A simulated fleet whose ticks the test can hold, so nothing is in flight when the broker stops."""

    def __init__(self, hosts: int, interval_s: float) -> None:
        super().__init__(hosts, interval_s)
        self.gate = threading.Event()
        self.gate.set()

    def tick(self) -> list[tuple[str, bytes]]:
        self.gate.wait()
        return super().tick()


@pytest.fixture()
def own_broker() -> Iterator[list[EmbeddedServer]]:
    """A broker this test may stop and restart; every incarnation is stopped at the end."""
    servers = [start_kafka()]
    yield servers
    for server in servers:
        server.stop()


def _outage(brokers: list[EmbeddedServer], tmp_path: Path, outage_s: float, interval_s: float) -> None:
    """Publish 3 hosts, stop the broker for `outage_s` while the agent keeps sampling, restart it on the
    same port, and check that every snapshot arrived once, in order per host."""
    first = brokers[0]
    settings = Settings(kafka_bootstrap=first.url, topic_samples="samples", partitions=2)
    ensure_topics(settings, [settings.topic_samples])
    source = _GatedSource(3, interval_s)
    publisher = Publisher(settings, Spool(tmp_path / "spool"), delivery_timeout_s=10.0)
    agent = Agent(source, publisher, interval_s=interval_s)
    runner = threading.Thread(target=agent.run)
    runner.start()
    try:
        _wait(lambda: publisher.sent >= 9, 30, "the first snapshots")
        # Hold the ticks and let the in-flight window drain: Tansu keeps topics in memory only, so what it
        # acknowledged must be read before it stops (a real broker would keep it).
        source.gate.clear()
        _wait(lambda: publisher.pending == 0 and publisher.in_flight == 0, 30, "the first snapshots' acks")
        before = _read_all(settings)
        assert len(before) == agent.snapshots
        first.stop()
        source.gate.set()

        ticks_at_stop, deepest = agent.ticks, 0
        deadline = time.monotonic() + outage_s
        while time.monotonic() < deadline:
            deepest = max(deepest, publisher.pending)
            time.sleep(0.1)
        assert agent.ticks - ticks_at_stop >= int(0.8 * outage_s / interval_s)  # it kept sampling
        assert deepest >= 3 * int(0.8 * outage_s / interval_s)  # ... into the spool
        assert publisher.sent == len(before)

        brokers.append(start_kafka(port=first.port))  # the same address, an empty broker
        ensure_topics(settings, [settings.topic_samples])
        _wait(lambda: publisher.pending <= 3, 120, "the spool to drain")
        ticks = agent.ticks
        _wait(lambda: agent.ticks >= ticks + 2, 30, "two more ticks")
    finally:
        source.gate.set()
        agent.stop_event.set()
        runner.join(60)
    assert not runner.is_alive()
    assert publisher.spool.dropped == 0 and publisher.pending == 0

    after = _read_all(settings)
    seqs: dict[str, list[int]] = {}
    for key, value in before + after:  # per partition in offset order; a host lives on one partition
        snap = decode_snapshot(value)
        assert key == snap.host.encode()
        seqs.setdefault(snap.host, []).append(snap.seq)
    assert sorted(seqs) == ["node-0000", "node-0001", "node-0002"]
    per_host = agent.snapshots // 3
    for host, got in seqs.items():
        assert got == list(range(per_host)), f"{host}: missing, repeated or out of order"


def test_broker_outage_spools_then_drains_in_order(own_broker: list[EmbeddedServer], tmp_path: Path) -> None:
    _outage(own_broker, tmp_path, outage_s=10.0, interval_s=0.25)


@pytest.mark.slow
def test_broker_outage_of_60_s_at_1_hz(own_broker: list[EmbeddedServer], tmp_path: Path) -> None:
    _outage(own_broker, tmp_path, outage_s=60.0, interval_s=1.0)


def test_unacknowledged_snapshots_survive_an_agent_restart(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings, [settings.topic_samples])
    nowhere = settings.replace(kafka_bootstrap=f"127.0.0.1:{free_port()}")  # nothing listens there
    down = _nvml_agent(nowhere, tmp_path / "spool", gpus=2, interval_s=0.05, flush_timeout_s=0.5)
    down.run(max_ticks=10)
    assert down.publisher.sent == 0
    reopened = Spool(tmp_path / "spool")
    assert reopened.pending == 10  # the first run's snapshots wait on disk
    reopened.close()

    up = _nvml_agent(settings, tmp_path / "spool", gpus=2, interval_s=0.05)
    up.run(max_ticks=5)
    records = _read_all(settings)
    snaps = [decode_snapshot(value) for _, value in records]
    assert [s.seq for s in snaps] == list(range(10)) + list(range(5))  # the backlog first, then the new run
    assert [s.ts for s in snaps] == sorted(s.ts for s in snaps)


def test_sigterm_flushes_and_exits_zero(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings, [settings.topic_samples])
    port = free_port()
    env = {**os.environ, "GPUWATCH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "GPUWATCH_TOPIC_SAMPLES": settings.topic_samples, "GPUWATCH_AGENT_HOST": "sigterm-node"}  # fmt: skip
    argv = [sys.executable, "-P", "-c", "import sys; from gpuwatch.apps.cli import main; sys.exit(main())", "agent",
            "--fake-nvml", "2", "--interval", "0.2", "--spool-dir", str(tmp_path / "spool"),
            "--metrics-port", str(port)]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:

        def snapshots() -> int:
            try:
                return json.loads(_get(f"http://127.0.0.1:{port}/healthz")[1])["snapshots"]
            except OSError:
                return 0

        _wait(lambda: snapshots() >= 5, 60, "the agent's first snapshots")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()
    assert b"every snapshot was acknowledged by Kafka" in out
    seqs = [decode_snapshot(value).seq for _, value in _read_all(settings)]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 5
    reopened = Spool(tmp_path / "spool")
    assert reopened.pending == 0
    reopened.close()


def test_simulated_fleet_is_published_in_real_time(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings, [settings.topic_samples])
    conf = settings.replace(agent_spool_dir=str(tmp_path / "spool"), agent_interval_s=0.1)
    agent = build_agent(conf, simulate_hosts=3)
    started = time.time()
    agent.run(max_ticks=4)
    snaps = [decode_snapshot(value) for _, value in _read_all(settings)]
    assert sorted((s.host, s.seq) for s in snaps) == [
        (f"node-{h:04d}", q) for h in range(3) for q in range(4)
    ]
    assert all(abs(s.ts - started) < 30 for s in snaps)  # the simulated clock is the wall clock
    assert all(len(s.uuids) == 8 for s in snaps)


def test_a_sampler_exception_does_not_stop_the_agent(settings: Settings, tmp_path: Path) -> None:
    ensure_topics(settings, [settings.topic_samples])
    agent = _nvml_agent(settings, tmp_path / "spool", gpus=1, interval_s=0.05)
    sampler = agent.source.sampler  # type: ignore[attr-defined]
    real_read, calls = sampler.read, []

    def flaky_read() -> list[dict]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a bug in the sampler")
        return real_read()

    sampler.read = flaky_read
    agent.run(max_ticks=4)
    assert agent.tick_errors == 1
    assert [decode_snapshot(v).seq for _, v in _read_all(settings)] == [0, 2, 3]  # the failed tick is a gap


def test_kafka_security_settings_pass_through() -> None:
    conf = Settings(
        kafka_bootstrap="kafka:9093", kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="agent", kafka_sasl_password="pw", kafka_ssl_cafile="/ca.pem",
        kafka_ssl_certfile="/cert.pem", kafka_ssl_keyfile="/key.pem", kafka_ssl_key_password="kpw",
    ).kafka_client_config()  # fmt: skip
    assert conf == {
        "bootstrap.servers": "kafka:9093", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "agent", "sasl.password": "pw", "ssl.ca.location": "/ca.pem",
        "ssl.certificate.location": "/cert.pem", "ssl.key.location": "/key.pem", "ssl.key.password": "kpw",
    }  # fmt: skip
