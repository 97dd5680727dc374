"""`gpuwatch model`: the model lifecycle (docs/lifecycle.md).

* ``shadow ARTIFACT`` registers the artifact and has every stream worker score it beside the champion, its
  records going to the shadow topic only (nothing acts on them);
* ``compare`` reports `gpuwatch eval`'s figures for both models over the records since the challenger started
  and the failure labels known now (``--labels FILE`` or the archive's label store);
* ``promote`` makes the challenger the champion in every running worker (no restart, windows kept);
  ``rollback`` undoes the last promote; ``stop`` ends the shadow scoring;
* ``status`` prints the state and the models the newest records name.

Every mistake is one line on stderr naming the input and the fix, with a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from gpuwatch.config import Settings
from gpuwatch.kafka import partition_count
from gpuwatch.model_registry import (
    ModelRegistry,
    RegistryError,
    latest_state,
    packaged_model_path,
    packaged_ref,
    publish_state,
    transition,
)
from gpuwatch.schemas.codecs import DecodeError, decode_risk
from gpuwatch.schemas.records import ModelControl, ModelRef, Risk


def model_command(args: argparse.Namespace, settings: Settings) -> int:
    """Runs one `gpuwatch model` subcommand; returns the exit code."""
    say = f"gpuwatch model {args.model_command}"
    if not settings.kafka_bootstrap:
        print(f"{say}: needs Kafka: set GPUWATCH_KAFKA_BOOTSTRAP (or kafka_bootstrap in the config file)",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        return _run(args, settings)
    except RegistryError as exc:
        print(f"{say}: {exc}", file=sys.stderr)
        return 2
    except (KafkaException, RuntimeError) as exc:  # RuntimeError: ensure_topics' "not reachable"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        print(f"{say}: Kafka at {settings.kafka_bootstrap} failed ({first[:300]}); check kafka_bootstrap and that "
              "the broker is up, then run the command again", file=sys.stderr)  # fmt: skip
        return 3


def _run(args: argparse.Namespace, settings: Settings) -> int:
    state, unreadable = latest_state(settings)
    for entry in unreadable:
        print(f"gpuwatch model: {settings.topic_model_control} offset {entry.offset} is not a model control "
              f"message ({entry.error}); ignored", file=sys.stderr)  # fmt: skip
    cmd = args.model_command
    if cmd == "status":
        return _status(settings, state, args.json)
    if cmd == "compare":
        return _compare(args, settings, state)
    note = args.note
    if cmd == "shadow":
        registry = ModelRegistry.from_settings(settings)
        champion = state.champion if state is not None else _first_champion(settings, registry)
        challenger = _register(Path(args.artifact), registry, champion)
        new = transition(state, "shadow", champion=champion, challenger=challenger, note=note)
    elif state is None:
        raise RegistryError(f"no model command was issued yet, so there is nothing to {cmd}: start with "
                            "`gpuwatch model shadow ARTIFACT`")  # fmt: skip
    else:
        new = transition(state, cmd, champion=state.champion, note=note)
    publish_state(settings, new)
    print(_describe(new))
    return 0


def _first_champion(settings: Settings, registry: ModelRegistry) -> ModelRef:
    """The model the workers run before any lifecycle command: `model_path` (registered) or the packaged one."""
    from gpuwatch.streams.model import ModelError, load_artifact

    path = Path(settings.model_path) if settings.model_path else packaged_model_path()
    try:
        version = load_artifact(path).version
    except ModelError as exc:
        raise RegistryError(f"the champion (model_path): {exc}") from None
    if not settings.model_path:
        return packaged_ref(version)
    return registry.add(path, version)


def _register(path: Path, registry: ModelRegistry, champion: ModelRef) -> ModelRef:
    """Check that `path` loads and fits the champion's windows, then copy it into the registry."""
    from gpuwatch.streams.model import ModelError, load_artifact

    try:
        artifact = load_artifact(path)
        current = load_artifact(registry.path_of(champion))
    except ModelError as exc:
        raise RegistryError(str(exc)) from None
    if artifact.window != current.window:
        raise RegistryError(f"{path} uses windows of {artifact.window.seq_len} rows every {artifact.window.stride_s:g} "
                            f"s, the champion {current.version} {current.window.seq_len} every "
                            f"{current.window.stride_s:g} s: a challenger shares the champion's windows, so they must "
                            "match; retrain it with the champion's window")  # fmt: skip
    return registry.add(path, artifact.version)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(state: ModelControl) -> str:
    ch = state.challenger.version if state.challenger else "none"
    back = f"; rollback restores {state.rollback_to.version}" if state.rollback_to else ""
    return (f"{state.action} (seq {state.seq}): champion {state.champion.version}, challenger {ch} "
            f"since {_when(state.challenger_since)}{back}")


def _status(settings: Settings, state: ModelControl | None, as_json: bool) -> int:
    newest = {topic: sorted({r.model for r in _newest_records(settings, topic)})
              for topic in (settings.topic_risk, settings.topic_risk_shadow)}  # fmt: skip
    if as_json:
        out: dict[str, Any] = {"state": None if state is None else orjson.loads(orjson.dumps(state)),
                               "newest_records_name": newest}  # fmt: skip
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(_describe(state) if state is not None else "no model command yet: the workers run their model_path")
    for topic, models in newest.items():
        print(f"newest records on {topic} name: {', '.join(models) or '-'}")
    return 0


def _compare(args: argparse.Namespace, settings: Settings, state: ModelControl | None) -> int:
    from gpuwatch.training.compare import compare
    from gpuwatch.training.dataset import Failures, RecordingError
    from gpuwatch.training.eval_cli import format_report

    since = args.since if args.since is not None else state.challenger_since if state is not None else None
    if since is None:
        raise RegistryError("no challenger is scoring: start one with `gpuwatch model shadow ARTIFACT`, or pass "
                            "--since TS")  # fmt: skip
    try:
        failures = _failures(args, settings, Failures)
    except RecordingError as exc:
        raise RegistryError(str(exc)) from None
    records = _records_since(settings, [settings.topic_risk, settings.topic_risk_shadow], since)
    roles = {}
    if state is not None:
        roles[state.champion.version] = "champion"
        if state.challenger is not None:
            roles[state.challenger.version] = "challenger"
    report = compare(records, failures, since, args.merge_gap, roles)
    if not report["scorers"]:
        raise RegistryError(f"no risk records on {settings.topic_risk} or {settings.topic_risk_shadow} since "
                            f"{_when(since)}; are the stream workers running?")  # fmt: skip
    print(f"records since {_when(since)}; " + ", ".join(f"{r}: {m}" for m, r in report["roles"].items()))
    # The table's columns are 12 wide: headed by role, the versions are named on the line above.
    shown = {f"{r}-{i}" if r == "other" else r: rep
             for i, (m, r), rep in zip(range(99), report["roles"].items(), report["scorers"].values())}  # fmt: skip
    print(format_report({**report, "scorers": shown}))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
        print(f"wrote {args.json}")
    return 0


def _failures(args: argparse.Namespace, settings: Settings, failures_cls: Any) -> Any:
    if args.labels:
        path = Path(args.labels)
        if not path.is_file():
            raise RegistryError(f"--labels {path}: no such file; pass a labels.jsonl (or --archive)")
        return failures_cls.load(path)
    location = args.archive or settings.archive_url
    if not location:
        raise RegistryError("no labels: pass --labels LABELS.jsonl or --archive (or set archive_url)")
    from gpuwatch.training.recording import open_recording

    return open_recording(location).failures()


def _consumer(settings: Settings) -> Consumer:
    conf: dict[str, Any] = dict(settings.kafka_client_config())
    conf.update({"group.id": f"gpuwatch-model-{time.time_ns()}", "enable.auto.commit": False})
    return Consumer(conf)


def _records_since(settings: Settings, topics: list[str], since: float, timeout: float = 120.0) -> list[Risk]:
    """Every readable risk record on `topics` written at or after `since` (by Kafka's timestamps), to the end."""
    consumer = _consumer(settings)
    try:
        parts = [TopicPartition(t, p, int(since * 1000)) for t in topics for p in range(partition_count(settings, t))]
        if not parts:
            return []
        starts = consumer.offsets_for_times(parts, timeout=10)
        ends: dict[tuple[str, int], int] = {}
        assign = []
        for tp in starts:
            _, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=10)
            if 0 <= tp.offset < high:
                ends[(tp.topic, tp.partition)] = high
                assign.append(tp)
        consumer.assign(assign)
        out: list[Risk] = []
        bad = 0
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for msg in consumer.consume(2000, 0.5):
                if msg.error() is not None:
                    continue
                try:
                    out.append(decode_risk(msg.value()))
                except DecodeError:
                    bad += 1
                key = (msg.topic() or "", msg.partition() or 0)
                if (msg.offset() or 0) + 1 >= ends.get(key, 0):
                    ends.pop(key, None)
        if ends:
            raise RegistryError(f"reading {', '.join(topics)} did not reach their end in {timeout:.0f} s; try again")
        if bad:
            print(f"gpuwatch model compare: {bad} messages were not risk records; left out", file=sys.stderr)
        return out
    finally:
        consumer.close()


def _newest_records(settings: Settings, topic: str) -> list[Risk]:
    """The last record of each partition of `topic` (none when it is empty or missing)."""
    consumer = _consumer(settings)
    try:
        assign = []
        for p in range(partition_count(settings, topic)):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                assign.append(TopicPartition(topic, p, high - 1))
        if not assign:
            return []
        consumer.assign(assign)
        out: list[Risk] = []
        pending = {tp.partition for tp in assign}
        deadline = time.monotonic() + 15.0
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(len(assign), 0.5):
                if msg.error() is None:
                    pending.discard(msg.partition())
                    try:
                        out.append(decode_risk(msg.value()))
                    except DecodeError:
                        pass  # status only names models; compare reports unreadable records
        return out
    finally:
        consumer.close()
