"""`gpuwatch archive` against the real embedded broker: killed (SIGKILL) in the middle of writing a batch and
restarted, it neither loses nor duplicates a row of any of the four topics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pyarrow as pa
import pytest
from helpers import wait_for

from gpuwatch.archive.reader import ArchiveReader
from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.schemas.codecs import encode_remediation, remediation_id
from gpuwatch.schemas.records import Remediation
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator

GPUS = 8


def _env(settings: Settings, archive: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_")}
    env.update({
        "GPUWATCH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap, "GPUWATCH_TOPIC_SAMPLES": settings.topic_samples,
        "GPUWATCH_TOPIC_RISK": settings.topic_risk, "GPUWATCH_TOPIC_REMEDIATION": settings.topic_remediation,
        "GPUWATCH_TOPIC_OUTCOMES": settings.topic_outcomes, "GPUWATCH_STREAM_APP_ID": settings.stream_app_id,
        "GPUWATCH_PARTITIONS": str(settings.partitions), "GPUWATCH_ARCHIVE_URL": str(archive),
        # Small, frequent batches: many flushes, so a kill can land inside one.
        "GPUWATCH_ARCHIVE_FLUSH_INTERVAL_S": "0.2", "GPUWATCH_ARCHIVE_FLUSH_ROWS": "3000",
    })  # fmt: skip
    return env


def _start(settings: Settings, archive: Path, log: Path) -> subprocess.Popen:
    # -P: import the installed package, not the source folder of the same name in the working directory.
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "archive"],
        env=_env(settings, archive),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )  # noqa: SIM115 - the child holds it


class _Published:
    """Produces messages and remembers where Kafka put each: {topic: {(partition, offset)}}."""

    def __init__(self, settings: Settings) -> None:
        self.producer = make_producer(settings)
        self.at: dict[str, set[tuple[int, int]]] = {}

    def send(self, topic: str, key: bytes, value: bytes) -> None:
        def done(err: object, msg: object) -> None:
            assert err is None, err
            self.at.setdefault(topic, set()).add((msg.partition(), msg.offset()))  # type: ignore[attr-defined]

        self.producer.produce(topic, value=value, key=key, on_delivery=done)

    def flush(self) -> None:
        assert self.producer.flush(30) == 0


def _publish_batch(pub: _Published, settings: Settings, sim: FleetSimulator, steps: int) -> None:
    for k in range(steps):
        for host, raw in sim.step_json():
            pub.send(settings.topic_samples, host.encode(), raw)
        if k % 50 == 0:
            now = sim.now
            risk = {
                "host": "node-0000",
                "gpu_index": 1,
                "uuid": "GPU-x",
                "ts": now,
                "risk": 0.3,
                "horizon_s": 3600.0,
                "mode": "memory",
                "model": "m",
                "scored_at": now,
                "alarm": True,
                "extra_field": {"a": 1},
            }
            event = {
                "id": remediation_id("node-0000", 1, "GPU-x", "checkpoint", now),
                "host": "node-0000",
                "gpu_index": 1,
                "uuid": "GPU-x",
                "action": "checkpoint",
                "reason": "alarm",
                "risk": 0.3,
                "ts": now,
            }
            outcome = {
                "schema": "gpuwatch.outcome/1",
                **event,
                "event_ts": now,
                "executor": "dry-run",
                "ok": True,
                "dry_run": True,
                "detail": "dry run",
                "started_at": now,
                "duration_s": 0.01,
            }
            del outcome["reason"], outcome["ts"]
            # a newer stream worker's record, with a field this version does not know: the archive keeps it
            pub.send(settings.topic_risk, b"node-0000", orjson.dumps({"schema": "gpuwatch.risk/1", **risk}))
            pub.send(settings.topic_remediation, b"node-0000", encode_remediation(Remediation(**event)))
            pub.send(settings.topic_outcomes, b"node-0000", orjson.dumps(outcome))
    pub.send(
        settings.topic_samples, b"node-0000", b'{"schema": "gpuwatch.samples/1", "host": 3}'
    )  # dead letter
    pub.flush()


def _pending(archive: Path) -> list[Path]:
    return [p for p in (archive / "_pending").rglob("*.json")] if (archive / "_pending").exists() else []


def _written_uncommitted(archive: Path) -> bool:
    """A batch's files are (partly) in place and its offsets not yet committed: the moment to kill it."""
    for marker in _pending(archive):
        try:
            files = orjson.loads(marker.read_bytes())["files"]
        except (OSError, ValueError):
            continue  # being replaced or removed right now
        if any((archive / f).exists() for f in files):
            return True
    return False


def _rows(archive: Path, table: str) -> Counter:
    reader = ArchiveReader(str(archive))
    files = reader.files(table)
    if not files:
        return Counter()
    t = pa.concat_tables([reader.read(f, ["kafka_partition", "kafka_offset"]) for f in files])
    return Counter(zip(t["kafka_partition"].to_pylist(), t["kafka_offset"].to_pylist()))


@pytest.mark.slow
def test_archive_killed_mid_batch_restarts_without_losing_or_duplicating_rows(settings: Settings,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    ensure_topics(settings, [settings.topic_samples, settings.topic_risk, settings.topic_remediation,
                             settings.topic_outcomes])  # fmt: skip
    archive, log = tmp_path / "archive", tmp_path / "archive.log"
    sim = FleetSimulator(FleetConfig(hosts=8, gpus_per_host=GPUS, seed=4, interval_s=10.0))
    pub = _Published(settings)
    _publish_batch(pub, settings, sim, 150)

    killed_mid_batch = False
    for _ in range(3):  # a kill that lands between two batches proves less; try again (rarely needed)
        proc = _start(settings, archive, log)
        try:
            deadline = time.monotonic() + 60
            while not _written_uncommitted(archive) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)  # the window is a few fsyncs and a commit long
            assert proc.poll() is None, log.read_text()
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
        if _written_uncommitted(archive):  # files of a batch in place, its offsets not committed
            killed_mid_batch = True
            break
    assert killed_mid_batch, "no SIGKILL landed between a batch's files and its commit in 3 tries"

    _publish_batch(pub, settings, sim, 100)  # more arrives while it is down
    proc = _start(settings, archive, log)
    try:
        want = {
            t: len(pub.at[t])
            for t in (settings.topic_risk, settings.topic_remediation, settings.topic_outcomes)
        }

        def caught_up() -> bool:
            time.sleep(0.3)  # each look reads every file
            samples = _rows(archive, "samples")
            return (sum(samples.values()) >= (len(pub.at[settings.topic_samples]) - 2) * GPUS and not _pending(archive)
                    and sum(_rows(archive, "outcomes").values()) >= want[settings.topic_outcomes])  # fmt: skip

        wait_for(caught_up, 90, "the restarted archive to catch up")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    samples = _rows(archive, "samples")
    dead = _rows(archive, "deadletter")
    assert set(samples.values()) == {GPUS}, "a snapshot's rows were archived twice (or cut)"
    assert set(samples) | set(dead) == pub.at[settings.topic_samples] and not set(samples) & set(dead)
    assert len(dead) == 2 and set(dead.values()) == {1}
    for topic, table in ((settings.topic_risk, "risk"), (settings.topic_remediation, "remediation"),
                         (settings.topic_outcomes, "outcomes")):  # fmt: skip
        rows = _rows(archive, table)
        assert set(rows) == pub.at[topic] and set(rows.values()) == {1}, table
    risk = list(ArchiveReader(str(archive)).records("risk"))
    assert risk[0]["extra_field"] == {"a": 1} and risk[0]["alarm"] is True
    # The restart found the killed batch's marker and settled it (deleting its files when they were uncommitted).
    assert "were written but not committed" in log.read_text()
