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
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from helpers import wait_for

from gpuwatch.config import Settings
from gpuwatch.controller.worker import run_controller
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.producers.commands import CheckpointHandler, CommandListener, Handled
from gpuwatch.schemas.codecs import encode_remediation, remediation_id
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
        self.seen: list[dict[str, Any]] = []

    def wait(self, n: int) -> list[dict[str, Any]]:
        def more() -> bool:
            for msg in self.consumer.consume(100, 0.2):
                if msg.error() is None:
                    rec = orjson.loads(msg.value())
                    if rec.get("schema") == "gpuwatch.command_ack/1":
                        self.seen.append(rec)
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

    def __init__(self, inner: Callable[[dict[str, Any]], Handled]) -> None:
        self.inner = inner
        self.commands: list[dict[str, Any]] = []

    def __call__(self, command: dict[str, Any]) -> Handled:
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
    outcomes: list[dict[str, Any]] = []
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
        event = {
            "id": remediation_id(HOST, 5, UUID, "checkpoint", 1_750_000_000.0),
            "host": HOST,
            "gpu_index": 5,
            "uuid": UUID,
            "action": "checkpoint",
            "reason": "risk 0.91 >= 0.85 for 300 s",
            "risk": 0.91,
            "ts": 1_750_000_300.0,
        }
        producer.produce(settings.topic_remediation, encode_remediation(event), key=HOST)
        producer.flush(10)
        [accepted] = acks.wait(1)
        assert (accepted["accepted"], accepted["ok"], accepted["id"]) == (True, True, event["id"])
        assert accepted["pids"] == [proc.pid] and accepted["gpu_index"] == 5
        wait_for(lambda: signals(out) == 1, 10, "the job to get SIGUSR1")
        [outcome] = wait_for(lambda: outcomes)
        assert outcome["executor"] == "slurm+agent-command" and outcome["ok"] and not outcome["dry_run"]

        [(key, original)] = read_commands(settings)
        assert key == HOST.encode()
        signed = orjson.loads(original)
        assert signed["nonce"] == accepted["nonce"] and KEY not in original.decode()

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
        assert [(a["accepted"], a["reason"]) for a in refused] == [(False, r) for r, _ in bad] + [
            (False, "malformed")
        ]
        assert all(a["host"] == HOST and not a["ok"] and a["pids"] == [] for a in refused)
        last = seen[-1]
        assert (last["id"], last["accepted"], last["ok"], last["pids"]) == ("rotated-1", True, True, [])
        assert "no compute processes on GPU 6" in last["detail"]
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
    assert all(KEY not in orjson.dumps(a).decode() for a in acks.seen)


def test_checkpoint_handler_checks_the_gpu_uuid_and_can_run_a_hook(tmp_path: Path) -> None:
    nvml = FakeNvml({0: ("GPU-new", [4242, 17])})
    refused = CheckpointHandler(nvml, host=HOST)({"id": "x", "gpu_index": 0, "uuid": "GPU-old"})
    assert not refused.ok and "GPU 0 is GPU-new, the command names GPU-old" in refused.detail
    missing = CheckpointHandler(nvml, host=HOST)({"id": "x", "gpu_index": 3, "uuid": ""})
    assert not missing.ok and "no GPU 3" in missing.detail

    log = tmp_path / "hook.txt"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$@" > {log}\n')
    hook.chmod(0o755)
    handler = CheckpointHandler(nvml, host=HOST, hook=f"{hook} --gpu {{gpu_index}} --pids {{pids}} {{id}}")
    done = handler({"id": "abc123", "gpu_index": 0, "uuid": "GPU-new"})
    assert done.ok and done.pids == (17, 4242)
    assert log.read_text().split() == ["--gpu", "0", "--pids", "17,4242", "abc123"]


def test_signal_to_a_process_that_is_gone_is_a_failed_ack() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    done = CheckpointHandler(FakeNvml({0: ("GPU-a", [dead.pid])}), host=HOST, signal_name="SIGUSR2")(
        {"id": "x", "gpu_index": 0, "uuid": "GPU-a"}
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
