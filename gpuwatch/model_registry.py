"""The model registry and the model control topic: what `gpuwatch model` writes and every stream worker follows.

- `ModelRegistry`: a folder of model artifacts (the `model_registry` setting), each copied in once under
  ``<version>-<sha256[:12]>.pt`` (with its ``.json``) and found again, checked against its sha256, by its
  `ModelRef`. Every stream worker must see the folder at the same path (a shared volume).
- `transition`: the lifecycle as a pure function: shadow, promote, rollback, stop.
- `ControlLog`: the control topic (`topic_model_control`, one partition). Each message is the whole state
  (`gpuwatch.model_control/1`), so the last one is what the workers run.

docs/lifecycle.md describes the lifecycle; docs/contracts.md the message.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from gpuwatch.config import Settings
from gpuwatch.kafka import make_producer
from gpuwatch.schemas.codecs import DecodeError, decode_model_control, encode_model_control
from gpuwatch.schemas.records import ModelAction, ModelControl, ModelRef

log = logging.getLogger(__name__)

CONTROL_KEY = b"models"
CONTROL_PARTITION = 0


class RegistryError(ValueError):
    """A model registry or lifecycle request cannot be served; the message names the input and the fix."""


def packaged_model_path() -> Path:
    """The model artifact shipped in the package (the champion when `model_path` is empty)."""
    return Path(str(resources.files("gpuwatch") / "models" / "default.pt"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelRegistry:
    """A folder of model artifacts, addressed by `ModelRef` (see the module docstring)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelRegistry:
        if not settings.model_registry:
            raise RegistryError("the model_registry setting is empty: set GPUWATCH_MODEL_REGISTRY (or model_registry "
                                "in the config file) to a folder every stream worker sees")  # fmt: skip
        return cls(settings.model_registry)

    def add(self, path: Path, version: str) -> ModelRef:
        """Copy the artifact at `path` (and its .json beside it, if any) into the registry; its ModelRef.
        Adding the same file again returns the same ref and copies nothing."""
        sha = file_sha256(path)
        name = f"{version}-{sha[:12]}.pt"
        target = self.folder / name
        if not target.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            shutil.copyfile(path, tmp)
            tmp.replace(target)  # whole or absent: a worker never loads a half-copied file
            if path.with_suffix(".json").exists():
                shutil.copyfile(path.with_suffix(".json"), target.with_suffix(".json"))
        return ModelRef(version=version, artifact=name, sha256=sha)

    def path_of(self, ref: ModelRef) -> Path:
        """The checked file of `ref`: RegistryError when it is missing or not the file the ref names."""
        path = packaged_model_path() if not ref.artifact else self.folder / ref.artifact
        if ref.artifact and ("/" in ref.artifact or ref.artifact.startswith(".")):
            raise RegistryError(f"model {ref.version}: artifact {ref.artifact!r} is not a file name in the registry")
        if not path.is_file():
            raise RegistryError(f"model {ref.version}: {path} does not exist; is the model_registry "
                                f"{self.folder} the folder `gpuwatch model shadow` wrote to?")  # fmt: skip
        if file_sha256(path) != ref.sha256:
            raise RegistryError(f"model {ref.version}: {path} is not the registered file (sha256 differs); "
                                "register it again with `gpuwatch model shadow`")  # fmt: skip
        return path


def packaged_ref(version: str) -> ModelRef:
    """The ref of the packaged model, named `version` (its artifact's version)."""
    return ModelRef(version=version, artifact="", sha256=file_sha256(packaged_model_path()))


# ---------------------------------------------------------------- the lifecycle


def transition(
    state: ModelControl | None, action: ModelAction, *, champion: ModelRef, challenger: ModelRef | None = None,
    at: float | None = None, note: str = "",
) -> ModelControl:  # fmt: skip
    """The state after `action`. `state` is the last control message (None: none yet, `champion` runs);
    `challenger` is the model to shadow (action shadow only). RegistryError names what does not fit.

    - shadow: `challenger` scores in the shadow from now (`challenger_since`), replacing any other challenger;
    - promote: challenger and champion swap; the old champion goes on scoring in the shadow, so `rollback`
      takes effect at once, with its runs of scorings current;
    - rollback: the last promote undone (the models swap back);
    - stop: the challenger stops scoring (no rollback after that).
    """
    at = time.time() if at is None else at
    cur = state or ModelControl(seq=1, action="stop", champion=champion, challenger=None, challenger_since=None,
                                rollback_to=None, at=at)  # fmt: skip
    seq = cur.seq + 1 if state is not None else 1

    def make(champion: ModelRef, challenger: ModelRef | None, since: float | None,
             rollback_to: ModelRef | None) -> ModelControl:  # fmt: skip
        return ModelControl(seq=seq, action=action, champion=champion, challenger=challenger, challenger_since=since,
                            rollback_to=rollback_to, at=at, note=note)  # fmt: skip

    if action == "shadow":
        if challenger is None:
            raise RegistryError("shadow needs the challenger's artifact")
        if challenger.version == cur.champion.version:
            raise RegistryError(f"model {challenger.version} is the champion already; shadow another model")
        return make(cur.champion, challenger, at, cur.rollback_to)
    if action == "promote":
        if cur.challenger is None:
            raise RegistryError("no challenger to promote: start one with `gpuwatch model shadow ARTIFACT` first")
        return make(cur.challenger, cur.champion, cur.challenger_since, cur.champion)
    if action == "rollback":
        if cur.rollback_to is None:
            raise RegistryError("nothing to roll back: no promote since the last stop (or none at all)")
        return make(cur.rollback_to, cur.champion, cur.challenger_since or at, None)
    if action == "stop":
        if cur.challenger is None:
            raise RegistryError("no challenger is scoring; nothing to stop")
        return make(cur.champion, None, None, None)
    raise RegistryError(f"unknown model action {action!r}; use shadow, promote, rollback or stop")


# ---------------------------------------------------------------- the control topic


@dataclass
class ControlEntry:
    """One message of the control topic: its offset, its state, or why it could not be read."""

    offset: int
    raw: bytes | None
    state: ModelControl | None
    error: str = ""


def ensure_control_topic(settings: Settings) -> None:
    """Create the control topic (one partition: its messages are ordered) if it does not exist."""
    conf: dict[str, Any] = dict(settings.kafka_client_config())
    admin = AdminClient(conf)
    if settings.topic_model_control in admin.list_topics(timeout=10).topics:
        return
    topic = NewTopic(settings.topic_model_control, num_partitions=1, replication_factor=1,
                     config={"retention.ms": "-1"})  # fmt: skip
    try:
        admin.create_topics([topic])[settings.topic_model_control].result(timeout=15)
    except KafkaException as exc:
        if "TOPIC_ALREADY_EXISTS" not in str(exc):
            raise


class ControlLog:
    """Reads the control topic from its start, then whatever is new (assigned, no consumer group: every reader
    sees every message). Not thread-safe: one reader per instance."""

    def __init__(self, settings: Settings) -> None:
        conf: dict[str, Any] = dict(settings.kafka_client_config())
        conf.update({"group.id": f"gpuwatch-models-{time.time_ns()}", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", "fetch.wait.max.ms": 50})  # fmt: skip
        self.topic = settings.topic_model_control
        self._tp = TopicPartition(self.topic, CONTROL_PARTITION)
        self._consumer = Consumer(conf)
        self._consumer.assign([TopicPartition(self.topic, CONTROL_PARTITION, OFFSET_BEGINNING)])
        self.next_offset = 0

    def read_to_end(self, timeout: float = 30.0) -> list[ControlEntry]:
        """Every message not read yet, up to the topic's end now."""
        deadline = time.monotonic() + timeout
        while True:
            try:  # a topic created a moment ago may not be known to every broker's metadata yet
                _, high = self._consumer.get_watermark_offsets(self._tp, timeout=10)
                break
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        out: list[ControlEntry] = []
        while self.next_offset < high:
            if time.monotonic() > deadline:
                raise RegistryError(f"reading {self.topic} did not reach its end ({high}) in {timeout:.0f} s")
            out += self.poll(0.5)
        return out

    def poll(self, timeout: float = 0.0) -> list[ControlEntry]:
        """Messages that arrived since the last read (none when `timeout` passes first)."""
        out = []
        for msg in self._consumer.consume(100, timeout):
            if msg.error() is not None:
                continue
            offset = msg.offset() or 0
            self.next_offset = offset + 1
            raw = msg.value()
            try:
                out.append(ControlEntry(offset, raw, decode_model_control(raw)))
            except DecodeError as exc:
                out.append(ControlEntry(offset, raw, None, str(exc)))
        return out

    def close(self) -> None:
        self._consumer.close()


def latest_state(settings: Settings) -> tuple[ModelControl | None, list[ControlEntry]]:
    """The last readable state on the control topic (None: no command yet) and every message that was not
    readable (for the caller to report)."""
    ensure_control_topic(settings)
    reader = ControlLog(settings)
    try:
        entries = reader.read_to_end()
    finally:
        reader.close()
    states = [e.state for e in entries if e.state is not None]
    return (states[-1] if states else None), [e for e in entries if e.state is None]


def publish_state(settings: Settings, state: ModelControl) -> None:
    """Write `state` to the control topic and wait for Kafka to acknowledge it."""
    ensure_control_topic(settings)
    producer = make_producer(settings)
    failed: list[str] = []
    producer.produce(settings.topic_model_control, key=CONTROL_KEY, value=encode_model_control(state),
                     partition=CONTROL_PARTITION,
                     on_delivery=lambda err, msg: failed.append(str(err)) if err is not None else None)  # fmt: skip
    if producer.flush(30.0) or failed:
        raise RegistryError(f"Kafka did not take the model command ({', '.join(failed) or 'no acknowledgement in 30 s'}); "
                            f"check {settings.kafka_bootstrap} and run the command again")  # fmt: skip
