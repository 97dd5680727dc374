"""Signed checkpoint commands from the controller to the node agent, over the real broker.

A real child process with a SIGUSR1 handler stands in for a training job; only NVML is a stand-in
(it reports the child's pid on GPU 5).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import msgspec
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from helpers import wait_for

from gpuwatch.config import Settings
from gpuwatch.controller.worker import run_controller
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.producers.commands import CheckpointHandler, CommandListener, Handled
from gpuwatch.schemas.codecs import (
    decode_command,
    decode_command_ack,
    encode_command_ack,
    encode_remediation,
    remediation_id,
)
from gpuwatch.schemas.fields import COMMAND_ACK_SCHEMA
from gpuwatch.schemas.records import Command, CommandAck, Remediation
from gpuwatch.schemas.records import Outcome as OutcomeRecord
from gpuwatch.signing import MemoryNonceStore, sign

HOST = "node-0003"
KEY = "controller-key-7f3a9c1e5b"
OLD_KEY = "retired-key-0b9d4e2a6c"
UUID = "GPU-5f0c1d7e"


class FakeNvml:
    """pynvml stand-in: GPU index -> (uuid, pids of its compute processes)."""

    def __init__(self, gpus: dict[int, tuple[str, list[int]]]) -> None:
        self.gpus = gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index not in self.gpus:
            raise RuntimeError(f"NVML: invalid argument (no GPU {index})")
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return self.gpus[handle][0].encode()  # older pynvml returns bytes

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=1 << 30) for p in self.gpus[handle][1]]


JOB = """
import signal, sys, time
out = sys.argv[1]
def on_usr1(signum, frame):
    with open(out, "a") as f:
        f.write("checkpoint\\n")
signal.signal(signal.SIGUSR1, on_usr1)
open(out + ".ready", "w").close()
time.sleep(60)
"""


@pytest.fixture()
def job(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A child process that appends a line to a file on each SIGUSR1."""
    out = tmp_path / "signals.txt"
    proc = subprocess.Popen([sys.executable, "-c", JOB, str(out)])
    wait_for(lambda: Path(str(out) + ".ready").exists(), 20, "the job to install its handler")
    yield proc, out
    proc.kill()
    proc.wait(10)


def signals(out: Path) -> int:
    return len(out.read_text().splitlines()) if out.exists() else 0


class Acks:
    """Reads gpuwatch.command_ack/1 records from the outcomes topic as they arrive."""

    def __init__(self, settings: Settings) -> None:
        self.consumer = Consumer({**settings.kafka_client_config(), "group.id": "test-acks"})
        self.consumer.assign(
            [TopicPartition(settings.topic_outcomes, p, OFFSET_BEGINNING) for p in range(settings.partitions)]
        )
        self.seen: list[CommandAck] = []
        self.raw: list[bytes] = []

    def wait(self, n: int) -> list[CommandAck]:
        def more() -> bool:
            for msg in self.consumer.consume(100, 0.2):
                if msg.error() is None and orjson.loads(msg.value())["schema"] == COMMAND_ACK_SCHEMA:
                    self.seen.append(decode_command_ack(msg.value()))  # the outcomes topic holds outcomes too
                    self.raw.append(msg.value())
            return len(self.seen) >= n

        wait_for(more, 30, f"{n} command acks")
        return self.seen

    def close(self) -> None:
        self.consumer.close()


def read_commands(settings: Settings) -> list[tuple[bytes, bytes]]:
    consumer = Consumer({**settings.kafka_client_config(), "group.id": "test-commands"})
    consumer.assign(
        [TopicPartition(settings.topic_commands, p, OFFSET_BEGINNING) for p in range(settings.partitions)]
    )
    out: list[tuple[bytes, bytes]] = []
    wait_for(
        lambda: (
            out.extend((m.key(), m.value()) for m in consumer.consume(100, 0.2) if m.error() is None) or out
        )
    )
    consumer.close()
    return out


class Counting:
    """Wraps a handler and counts how often it runs."""

    def __init__(self, inner: Callable[[Command], Handled]) -> None:
        self.inner = inner
        self.commands: list[Command] = []

    def __call__(self, command: Command) -> Handled:
        self.commands.append(command)
        return self.inner(command)


def test_a_signed_checkpoint_reaches_the_job_once_and_forgeries_and_replays_are_refused(
    settings: Settings,
    job: tuple[subprocess.Popen, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    proc, out = job
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\nexit 0\n")
    scontrol.chmod(0o755)
    settings = settings.replace(
        controller_executor="slurm",
        controller_scontrol=str(scontrol),
        command_signing_key=f"{KEY},{OLD_KEY}",
    )
    ensure_topics(settings, [settings.topic_remediation, settings.topic_outcomes, settings.topic_commands])
    handler = Counting(CheckpointHandler(FakeNvml({5: (UUID, [proc.pid]), 6: (UUID, [])}), host=HOST))
    listener = CommandListener(
        settings,
        HOST,
        keys=[KEY.encode(), OLD_KEY.encode()],
        seen_nonce_store=MemoryNonceStore(),
        handler=handler,
    )
    outcomes: list[OutcomeRecord] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=listener.run, args=(stop,), kwargs={"poll_timeout_s": 0.1}, daemon=True),
        threading.Thread(
            target=run_controller,
            args=(settings,),
            kwargs={"stop": stop, "on_outcome": outcomes.append, "poll_timeout_s": 0.05},
            daemon=True,
        ),
    ]
    for t in threads:
        t.start()
    acks = Acks(settings)
    producer = make_producer(settings)
    try:
        # the controller turns a checkpoint remediation into a signed command for the agent on HOST
        event = Remediation(
            id=remediation_id(HOST, 5, UUID, "checkpoint", 1_750_000_000.0),
            host=HOST,
            gpu_index=5,
            uuid=UUID,
            action="checkpoint",
            reason="risk 0.91 >= 0.85 for 300 s",
            risk=0.91,
            ts=1_750_000_300.0,
        )
        producer.produce(settings.topic_remediation, encode_remediation(event), key=HOST)
        producer.flush(10)
        [accepted] = acks.wait(1)
        assert (accepted.accepted, accepted.ok, accepted.id) == (True, True, event.id)
        assert accepted.pids == [proc.pid] and accepted.gpu_index == 5
        wait_for(lambda: signals(out) == 1, 10, "the job to get SIGUSR1")
        [outcome] = wait_for(lambda: outcomes)
        assert outcome.executor == "slurm+agent-command" and outcome.ok and not outcome.dry_run

        [(key, original)] = read_commands(settings)
        assert key == HOST.encode()
        signed = orjson.loads(original)
        assert (
            decode_command(original).nonce == signed["nonce"] == accepted.nonce
            and KEY not in original.decode()
        )

        now = time.time()
        base = {k: v for k, v in signed.items() if k not in ("sig", "nonce", "issued_at", "expires_at")}
        unsigned = {k: v for k, v in signed.items() if k != "sig"}
        bad = [
            ("forged", sign(base, "attacker-key-0123456789", now=now)),
            ("forged", {**signed, "gpu_index": 6}),  # tampered after signing
            ("unsigned", unsigned),
            ("expired", sign(base, KEY, now=now - 1000, ttl_s=300)),
            ("replayed", signed),  # the accepted command, delivered again
            ("wrong_host", sign({**base, "host": "node-0007"}, KEY, now=now)),
        ]
        producer.produce(settings.topic_commands, original, key=b"node-0007")  # another host's: ignored
        for _, command in bad:
            producer.produce(settings.topic_commands, orjson.dumps(command), key=HOST)
        producer.produce(settings.topic_commands, b"\x00garbage", key=HOST)
        # signed with the previous key (rotation) for GPU 6, which has no processes: accepted, nothing signalled
        rotated = sign({**base, "gpu_index": 6, "id": "rotated-1"}, OLD_KEY, now=now)
        producer.produce(settings.topic_commands, orjson.dumps(rotated), key=HOST)
        producer.flush(10)

        seen = acks.wait(1 + len(bad) + 2)
        refused = seen[1 : 1 + len(bad) + 1]
        assert [(a.accepted, a.reason) for a in refused] == [(False, r) for r, _ in bad] + [
            (False, "malformed")
        ]
        assert all(a.host == HOST and not a.ok and a.pids == [] for a in refused)
        last = seen[-1]
        assert (last.id, last.accepted, last.ok, last.pids) == ("rotated-1", True, True, [])
        assert "no compute processes on GPU 6" in last.detail
        assert len(handler.commands) == 2 and signals(out) == 1  # the job was signalled exactly once
        assert proc.poll() is None
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        acks.close()
    assert not any(t.is_alive() for t in threads)
    for reason, _ in bad:
        assert f"refused: {reason}" in caplog.text
    assert KEY not in caplog.text and OLD_KEY not in caplog.text
    assert all(KEY.encode() not in raw for raw in acks.raw)


def command(rid: str, gpu: int, uuid: str) -> Command:
    """A command as the listener hands it to its handler (verified already)."""
    return Command(
        id=rid,
        host=HOST,
        gpu_index=gpu,
        uuid=uuid,
        action="checkpoint",
        reason="test",
        risk=0.9,
        nonce="0" * 32,
        issued_at=1.0,
        expires_at=2.0,
        sig="0" * 64,
    )


def test_checkpoint_handler_checks_the_gpu_uuid_and_can_run_a_hook(tmp_path: Path) -> None:
    nvml = FakeNvml({0: ("GPU-new", [4242, 17])})
    refused = CheckpointHandler(nvml, host=HOST)(command("x", 0, "GPU-old"))
    assert not refused.ok and "GPU 0 is GPU-new, the command names GPU-old" in refused.detail
    missing = CheckpointHandler(nvml, host=HOST)(command("x", 3, ""))
    assert not missing.ok and "no GPU 3" in missing.detail

    log = tmp_path / "hook.txt"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    hook.chmod(0o755)
    handler = CheckpointHandler(nvml, host=HOST, hook=f"{hook} --gpu {{gpu_index}} --pids {{pids}} {{id}}")
    done = handler(command("abc123", 0, "GPU-new"))
    assert done.ok and done.pids == (17, 4242)
    assert log.read_text().split() == ["--gpu", "0", "--pids", "17,4242", "abc123"]


def test_signal_to_a_process_that_is_gone_is_a_failed_ack() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    done = CheckpointHandler(FakeNvml({0: ("GPU-a", [dead.pid])}), host=HOST, signal_name="SIGUSR2")(
        command("x", 0, "GPU-a")
    )
    assert not done.ok and f"{dead.pid} gone" in done.detail and "SIGUSR2" in done.detail


def test_listener_from_settings_needs_a_key_and_uses_the_nonce_file(
    settings: Settings, tmp_path: Path
) -> None:
    from gpuwatch.config import ConfigError
    from gpuwatch.signing import FileNonceStore

    with pytest.raises(ConfigError, match="command_signing_key"):
        CommandListener.from_settings(settings, HOST, FakeNvml({}))
    listener = CommandListener.from_settings(
        settings.replace(command_signing_key=KEY, agent_nonce_file=str(tmp_path / "n.json")),
        HOST,
        FakeNvml({}),
    )
    assert isinstance(listener.nonces, FileNonceStore) and listener.group_id().endswith("-agent-node-0003")
    assert os.fspath(listener.nonces.path) == str(tmp_path / "n.json")
    # a message for another host is not even parsed
    assert listener.process(b"node-0007", b"garbage") is None


def test_a_signed_command_that_breaks_its_contract_is_refused_as_malformed_with_the_reason() -> None:
    """Authentic but not a `gpuwatch.command/1` (a newer controller, a bug): refused, and the ack says which field;
    the ack itself honours its contract, echoing only what it could read."""
    listener = CommandListener(Settings(), HOST, keys=[KEY.encode()], seen_nonce_store=MemoryNonceStore(),
                               handler=lambda c: Handled(True, "ran"), clock=lambda: 1_750_000_000.0)  # fmt: skip
    base = msgspec.to_builtins(command("x", 5, UUID))
    base = {k: v for k, v in base.items() if k not in ("nonce", "issued_at", "expires_at", "sig")}
    for field, value, reason in [
        ("gpu_index", "5", 'gpu_index: expected integer, got string "5"'),
        ("schema", "gpuwatch.command/2", "schema: unsupported version"),
        ("action", "format", "action: expected one of checkpoint, migrate"),
    ]:
        signed = sign({**base, field: value}, KEY, now=1_750_000_000.0)
        ack = listener.process(HOST, orjson.dumps(signed))
        assert ack is not None and (ack.accepted, ack.reason) == (False, "malformed") and reason in ack.detail
        assert decode_command_ack(encode_command_ack(ack)) == ack
        assert ack.gpu_index == (None if field == "gpu_index" else 5) and ack.nonce == signed["nonce"]
