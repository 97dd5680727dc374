"""Security with real servers: Redis with a password and ACL users, Kafka over TLS (client certificates,
an encrypted key) and SASL settings reaching every client, no secret in any log, signed commands only.

What the embedded servers allow: redis-server has passwords and ACLs, so those are exercised end to end.
Tansu 0.6 has no working TLS listener (`--cert` and `--key` refuse each other and the port stays plain),
so TLS is exercised through a TLS terminator in front of Tansu that also demands a client certificate:
every gpuwatch client (confluent-kafka admin, producer, consumer, and the stream worker's aiokafka consumer)
must complete a verified TLS handshake to reach the broker. Tansu's SASL needs a SCRAM user, which can only
be created through an authenticated connection and is forgotten on restart (memory storage), so no login
can succeed: the tests check that clients negotiate SCRAM-SHA-512 with the broker and are refused as an
unknown user, and that the settings reach the aiokafka consumer unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest
import redis
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from helpers import wait_for

from gpuwatch.config import Settings, redact_url
from gpuwatch.controller.executors import make_executor
from gpuwatch.controller.worker import run_controller
from gpuwatch.embedded import EmbeddedServer, free_port, spawn_child, start_redis, tansu_binary
from gpuwatch.kafka import (
    ensure_topics,
    faust_credentials,
    make_producer,
    partition_count,
    read_partitions_to_end,
)
from gpuwatch.processes import StatsFollower, settings_env, start_stream_worker
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import (
    decode_command,
    decode_risk,
    encode_remediation,
    encode_risk,
    remediation_id,
)
from gpuwatch.schemas.records import Outcome as OutcomeRecord
from gpuwatch.schemas.records import Remediation, Risk
from gpuwatch.signing import CommandRejected, MemoryNonceStore, sign, verify
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.sinks.risk_client import RiskClient

ADMIN_PW, SINK_PW, READER_PW = "admin-Secret-0x71", "sink-Secret-0x72", "reader-Secret-0x73"
KEY_PW, SASL_PW = "tls-key-Secret-0x74", "sasl-Secret-0x75"
SIGNING_KEY = "signing-Secret-0x76-abcdefghijklmnop"
SECRETS = (ADMIN_PW, SINK_PW, READER_PW, KEY_PW, SASL_PW, SIGNING_KEY)


def _no_secret_in(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a secret appears in a log"


# ---------------------------------------------------------------- Redis: password and ACL users


@pytest.fixture()
def acl_redis() -> Iterator[EmbeddedServer]:
    users = ["--user", "gw-sink", "on", f">{SINK_PW}", "~gpuwatch:*", "+@all", "-@dangerous",
             "--user", "gw-reader", "on", f">{READER_PW}", "~gpuwatch:*", "+@read", "+@connection"]  # fmt: skip
    server = start_redis(password=ADMIN_PW, extra_args=users)
    yield server
    server.stop()


def _url(server: EmbeddedServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def _risk(host: str, gpu: int, ts: float, risk: float) -> bytes:
    return encode_risk(Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=risk, horizon_s=3600.0,
                            mode="memory", model="test", scored_at=ts))


@pytest.mark.slow
def test_sink_and_controller_write_as_a_limited_acl_user_and_readers_only_read(
    settings: Settings, acl_redis: EmbeddedServer
) -> None:
    sink_url, reader_url = _url(acl_redis, "gw-sink", SINK_PW), _url(acl_redis, "gw-reader", READER_PW)
    settings = settings.replace(redis_url=sink_url, controller_lease_s=5.0)
    ensure_topics(settings)
    sink = spawn_child(
        "security-sink", [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "sink"], env=settings_env(settings)
    )
    stop = threading.Event()
    outcomes: list[OutcomeRecord] = []
    controller = threading.Thread(target=run_controller, args=(settings,), daemon=True,
                                  kwargs={"stop": stop, "on_outcome": outcomes.append})  # fmt: skip
    controller.start()
    try:
        producer = make_producer(settings)
        now = time.time()
        for gpu in range(4):
            producer.produce(settings.topic_risk, _risk("node-0001", gpu, now, 0.1 * gpu), key="node-0001")
        event = Remediation(id=remediation_id("node-0001", 3, "GPU-node-0001-3", "migrate", now), host="node-0001",
                            gpu_index=3, uuid="GPU-node-0001-3", action="migrate", reason="test", risk=0.9, ts=now)
        producer.produce(settings.topic_remediation, encode_remediation(event), key="node-0001")
        assert producer.flush(10) == 0
        reader = RiskClient(reader_url)
        answer = wait_for(lambda: reader.risk("node-0001", 3), 60, "the sink's write, read as the reader")
        assert answer.risk == pytest.approx(0.3) and reader.host_risk("node-0001").gpus == 4  # type: ignore[union-attr]
        wait_for(lambda: outcomes, 60, "the controller's outcome, stored as the sink user")
    finally:
        stop.set()
        controller.join(15)
        sink.stop()

    as_reader = redis.Redis.from_url(reader_url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_reader.set(k.KILLSWITCH, "reader: not allowed")  # read-only: cannot even touch the kill switch
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_reader.get("not-gpuwatch")  # and only gpuwatch's keys
    as_reader.close()
    as_sink = redis.Redis.from_url(sink_url)
    with pytest.raises(redis.exceptions.NoPermissionError):
        as_sink.flushall()  # the writers' user has no dangerous commands
    assert as_sink.hget(k.outcome_key(event.id), "ok") == b"true"
    as_sink.close()
    for url in (f"redis://127.0.0.1:{acl_redis.port}/0", _url(acl_redis, "gw-sink", "wrong-password")):
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(url).ping()
    _no_secret_in(sink.log_path.read_text())
    assert SINK_PW not in str(settings.redacted()) and redact_url(sink_url).endswith("gw-sink:***@127.0.0.1:" +
                                                                                     f"{acl_redis.port}/0")  # fmt: skip


# ---------------------------------------------------------------- Kafka over TLS


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates: install it (Debian: apt-get install openssl)")
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server.key"), "-out",
             str(d / "server.pem"), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
             "subjectAltName=IP:127.0.0.1,DNS:localhost")  # fmt: skip
    # The client's key is encrypted: kafka_ssl_key_password must reach both Kafka clients.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-keyout", str(d / "client.key"), "-passout", f"pass:{KEY_PW}",
             "-out", str(d / "client.pem"), "-days", "1", "-subj", "/CN=gpuwatch-client")  # fmt: skip
    return {name: d / name for name in ("server.pem", "server.key", "client.pem", "client.key")}


class TlsTerminator:
    """Accepts TLS (requiring a client certificate signed by `client_ca`) and relays the bytes to a port."""

    def __init__(self, cert: Path, key: Path, client_ca: Path, backend: int) -> None:
        self.port = free_port()
        self.backend = backend
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.context.load_verify_locations(client_ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.handshakes = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._relay, "127.0.0.1", self.port,
                                                                   ssl=self.context))  # fmt: skip
        started.set()
        with contextlib.suppress(RuntimeError):
            self.loop.run_until_complete(server.serve_forever())

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            backend_r, backend_w = await asyncio.open_connection("127.0.0.1", self.backend)
        except OSError:
            client_w.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError, asyncio.IncompleteReadError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pipe(client_r, backend_w), pipe(backend_r, client_w))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture()
def tls_kafka(pki: dict[str, Path], tmp_path: Path) -> Iterator[Settings]:
    """Tansu on a plain port, reachable only through the TLS terminator it advertises."""
    backend = free_port()
    terminator = TlsTerminator(pki["server.pem"], pki["server.key"], pki["client.pem"], backend)
    argv = [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{backend}", "--advertised-listener-url",
            f"tcp://127.0.0.1:{terminator.port}", "--storage-engine", "memory://tansu/"]  # fmt: skip
    with open(tmp_path / "tansu.log", "wb") as log:
        broker = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Settings(
            kafka_bootstrap=f"127.0.0.1:{terminator.port}", kafka_security_protocol="SSL",
            kafka_ssl_cafile=str(pki["server.pem"]), kafka_ssl_certfile=str(pki["client.pem"]),
            kafka_ssl_keyfile=str(pki["client.key"]), kafka_ssl_key_password=KEY_PW, partitions=2,
            topic_samples="tls.samples", topic_risk="tls.risk", topic_deadletter="tls.dl", stream_app_id="tls-stream",
            rescore_interval_s=1.0,
        )  # fmt: skip
    finally:
        broker.terminate()
        broker.wait(10)
        terminator.stop()


@pytest.mark.slow
def test_every_kafka_client_speaks_verified_tls_with_a_client_certificate(tls_kafka: Settings) -> None:
    settings = tls_kafka
    ensure_topics(settings, [settings.topic_samples, settings.topic_risk, settings.topic_deadletter])  # admin
    # aiokafka consumer + confluent producer; STATS every 0.5 s so the wait below sees the partitions sooner
    worker = start_stream_worker(settings, "tls-worker", stats_interval_s=0.5)
    try:
        StatsFollower(worker).wait(lambda s: s.partitions == 2, 120, "the worker's partitions over TLS")
        sim = FleetSimulator(FleetConfig(hosts=2, seed=41, start_ts=time.time() - 30))
        producer = make_producer(settings)
        for _ in range(10):
            for host, value in sim.step_json():
                producer.produce(settings.topic_samples, value, key=host)
        assert producer.flush(30) == 0

        def scored() -> list[Risk]:
            found = [decode_risk(v) for _, v in read_partitions_to_end(settings, settings.topic_risk, list(range(2)))]
            return found if len({r.uuid for r in found}) == 16 else []

        assert wait_for(scored, 90, "risk for all 16 GPUs, read back over TLS")
        assert worker.alive()
    finally:
        worker.stop()
    _no_secret_in(worker.log_path.read_text())

    def reachable(**conf: str) -> bool:
        try:
            AdminClient({"bootstrap.servers": settings.kafka_bootstrap, **conf}).list_topics(timeout=4)
            return True
        except KafkaException:
            return False

    refused = {
        "plaintext to a TLS port": {},
        "no client certificate": {"security.protocol": "SSL", "ssl.ca.location": settings.kafka_ssl_cafile},
        "the server's self-signed cert not trusted": {"security.protocol": "SSL"},
    }
    # Each refusal takes its full 4 s timeout to show: the three clients try side by side.
    with ThreadPoolExecutor(len(refused)) as pool:
        got = dict(zip(refused, pool.map(lambda conf: reachable(**conf), refused.values())))
    assert got == dict.fromkeys(refused, False)


# ---------------------------------------------------------------- Kafka SASL


@pytest.fixture()
def sasl_broker(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    argv = [tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}", "--advertised-listener-url",
            f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/", "--authentication"]  # fmt: skip
    with open(tmp_path / "tansu.log", "wb") as log:
        broker = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        broker.terminate()
        broker.wait(10)


def test_sasl_settings_reach_both_kafka_clients_and_scram_is_negotiated(
    sasl_broker: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(kafka_bootstrap=sasl_broker, kafka_security_protocol="SASL_PLAINTEXT",
                        kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="gpuwatch",
                        kafka_sasl_password=SASL_PW)  # fmt: skip
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    auth = credentials_to_aiokafka_auth(faust_credentials(settings))  # what the stream worker's consumer gets
    assert auth == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_plain_username": "gpuwatch", "sasl_plain_password": SASL_PW, "ssl_context": None}  # fmt: skip
    assert repr(faust_credentials(settings)).count(SASL_PW) == 0

    errors: list[str] = []
    conf = {**settings.kafka_client_config(), "error_cb": lambda err: errors.append(err.str())}
    client = AdminClient(conf)
    with pytest.raises(KafkaException):
        client.list_topics(timeout=5)
    wait_for(lambda: client.poll(0.2) is not None and errors, 15, "the client's authentication error")
    # SCRAM on the wire, and the user refused
    assert any("SCRAM" in e and "unknown-user" in e for e in errors), errors
    with pytest.raises(KafkaException):
        AdminClient({"bootstrap.servers": sasl_broker}).list_topics(timeout=3)  # and no way in without it

    async def aiokafka_login() -> None:
        import aiokafka

        consumer = aiokafka.AIOKafkaConsumer("t", bootstrap_servers=sasl_broker, **auth)
        try:
            await asyncio.wait_for(consumer.start(), 15)
        finally:
            await consumer.stop()

    with pytest.raises(Exception):  # noqa: B017 - aiokafka's SCRAM client fails on the broker's refusal
        asyncio.run(aiokafka_login())
    _no_secret_in(caplog.text + "\n".join(errors))


# ---------------------------------------------------------------- signed commands


def test_checkpoint_commands_are_signed_and_only_signed_ones_verify(
    settings: Settings, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    # slurm has no checkpoint of its own: with a key, checkpoints become signed commands for the node agent
    settings = settings.replace(controller_executor="slurm", command_signing_key=SIGNING_KEY)
    ensure_topics(settings)
    stop = threading.Event()
    outcomes: list[OutcomeRecord] = []
    thread = threading.Thread(target=run_controller, args=(settings,), daemon=True, kwargs={
        "stop": stop, "executor": make_executor(settings), "on_outcome": outcomes.append,
        "redis_client": redis_client})  # fmt: skip
    thread.start()
    try:
        event = Remediation(id=remediation_id("node-0002", 1, "GPU-x", "checkpoint", 1.0), host="node-0002",
                            gpu_index=1, uuid="GPU-x", action="checkpoint", reason="test", risk=0.9, ts=time.time())
        producer = make_producer(settings)
        producer.produce(settings.topic_remediation, encode_remediation(event), key="node-0002")
        assert producer.flush(10) == 0
        wait_for(lambda: outcomes, 60, "the checkpoint's outcome")
    finally:
        stop.set()
        thread.join(15)
    n = partition_count(settings, settings.topic_commands)
    (raw,) = [v for _, v in read_partitions_to_end(settings, settings.topic_commands, list(range(n)))]
    assert SIGNING_KEY.encode() not in raw
    command = orjson.loads(raw)
    assert decode_command(raw).host == "node-0002"  # honours its contract
    now = time.time()
    verify(command, [SIGNING_KEY], now=now, seen_nonces=MemoryNonceStore())  # authentic
    refusals = {
        "unsigned": {k_: v for k_, v in command.items() if k_ != "sig"},
        "forged": sign({k_: v for k_, v in command.items() if k_ != "sig"}, "another-key-0123456789abcdef"),
        "tampered": {**command, "host": "node-9999"},
    }
    for name, bad in refusals.items():
        with pytest.raises(CommandRejected) as err:
            verify(json.loads(json.dumps(bad)), [SIGNING_KEY], now=now, seen_nonces=MemoryNonceStore())
        assert err.value.reason == ("unsigned" if name == "unsigned" else "forged"), name
    _no_secret_in(caplog.text)
