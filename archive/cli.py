"""`gpuwatch archive`, `gpuwatch label` and `gpuwatch labels`: the commands of the archive stage."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gpuwatch.config import ConfigError, Settings
from gpuwatch.schemas.fields import FAILURE_MODES

from .labels import LabelStore, LabelStoreError, label_archive
from .reader import ArchiveReader
from .storage import Storage, StorageError

OPERATOR_MODES = tuple(m for m in FAILURE_MODES if m != "none")


def _storage(args: argparse.Namespace, settings: Settings, command: str) -> Storage | None:
    try:
        return Storage(args.archive or settings.archive_url)
    except StorageError as exc:
        print(f"gpuwatch {command}: {exc}", file=sys.stderr)
        return None


def archive_command(args: argparse.Namespace, settings: Settings) -> int:
    """Consume Kafka into the archive until SIGTERM, or with --import archive a simulate folder and exit."""
    storage = _storage(args, settings, "archive")
    if storage is None:
        return 2
    if args.import_dir:
        return _import(Path(args.import_dir), storage)
    if not settings.kafka_bootstrap:
        raise ConfigError("gpuwatch archive needs GPUWATCH_KAFKA_BOOTSTRAP (or --import DIR)")
    from .service import run_archive

    return run_archive(settings, url=storage.url)


def _import(folder: Path, storage: Storage) -> int:
    from .writer import import_recording

    samples, labels = folder / "samples.jsonl", folder / "labels.jsonl"
    if not samples.is_file():
        print(f"gpuwatch archive: --import {folder} has no samples.jsonl; pass a `gpuwatch simulate` output folder",
              file=sys.stderr)  # fmt: skip
        return 2
    records = []
    if labels.is_file():
        try:
            records = read_label_lines(labels.read_bytes(), str(labels))
        except ValueError as exc:
            print(f"gpuwatch archive: {exc}", file=sys.stderr)
            return 2
    t0 = time.time()
    n = import_recording(str(samples), storage)
    print(f"archived {n:,} snapshots of {samples} into {storage.url} in {time.time() - t0:.1f} s")
    if records:
        version = LabelStore(storage).append("import", records, note=f"imported from {labels}")
        print(f"label store version {version}: {len(records)} labels imported from {labels}")
    return 0


def read_label_lines(data: bytes, name: str) -> list[dict[str, Any]]:
    """The records of a labels.jsonl; ValueError names the first bad line and what it lacks."""
    out = []
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = orjson.loads(line)
            float(rec["fail_ts"])
            str(rec["uuid"])
            if rec["mode"] not in FAILURE_MODES:
                raise ValueError(f"mode {rec['mode']!r} is not one of {', '.join(FAILURE_MODES)}")
        except (ValueError, KeyError, TypeError) as exc:
            what = f"no field {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0]
            raise ValueError(f"{name}:{lineno}: not a failure label ({what}); each line needs uuid, fail_ts and "
                             "mode, as `gpuwatch simulate` writes them") from None  # fmt: skip
        out.append(rec)
    return out


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO 8601 time (UTC unless it names a zone); ValueError says what is accepted."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give unix seconds or ISO 8601, e.g. 2025-05-01T12:30:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _target(text: str) -> tuple[str, int]:
    host, colon, gpu = text.rpartition(":")
    if not colon or not host or not gpu.isdigit():
        raise ValueError(f"{text!r} is not HOST:GPU; give e.g. node-0003:5 (GPU: an index 0, 1, ...)")
    return host, int(gpu)


def label_command(args: argparse.Namespace, settings: Settings) -> int:
    """`gpuwatch label HOST:GPU --failed-at TS --mode MODE` or `--false-alarm --at TS`: an operator's label."""
    try:
        host, gpu = _target(args.target)
        if bool(args.failed_at) == bool(args.false_alarm):
            raise ValueError("give either --failed-at TS --mode MODE (a failure) or --false-alarm --at TS")
        if args.failed_at and args.mode not in OPERATOR_MODES:
            raise ValueError(f"--mode must be one of {', '.join(OPERATOR_MODES)}, got {args.mode!r}")
        if args.false_alarm and not args.at:
            raise ValueError("--false-alarm needs --at TS: when the alarm was")
        when = parse_time(args.failed_at or args.at)
    except ValueError as exc:
        print(f"gpuwatch label: {exc}", file=sys.stderr)
        return 2
    storage = _storage(args, settings, "label")
    if storage is None:
        return 2
    uuid = args.uuid or ArchiveReader(storage).uuid_at(host, gpu, when)
    if not uuid:
        print(f"gpuwatch label: no samples of {host}:{gpu} in {storage.url} to tell its uuid; pass --uuid",
              file=sys.stderr)  # fmt: skip
        return 2
    rec: dict[str, Any] = {"host": host, "gpu_index": gpu, "uuid": uuid, "by": args.by, "note": args.note,
                           "at": time.time()}  # fmt: skip
    if args.false_alarm:
        rec.update({"kind": "false_alarm", "ts": when})
    else:
        rec.update({"kind": "failure", "fail_ts": when, "mode": args.mode})
    version = LabelStore(storage).append("operator", [rec], note=f"{rec['kind']} {host}:{gpu}")
    what = "false alarm" if args.false_alarm else f"{args.mode} failure"
    print(f"label store version {version}: {what} of {host}:{gpu} ({uuid}) at {when:.3f}")
    return 0


def labels_command(args: argparse.Namespace, settings: Settings) -> int:
    """`gpuwatch labels derive`: failures from the archive's telemetry; `labels show`: the versions."""
    storage = _storage(args, settings, "labels")
    if storage is None:
        return 2
    store = LabelStore(storage)
    if args.action == "show":
        versions = store.manifest()["versions"]
        if not versions:
            print(f"no labels in {storage.url} yet: run `gpuwatch labels derive`")
            return 0
        print(
            f"{'version':>7} {'source':<10} {'failures':>9} {'alarmed':>8} {'missed':>7} {'false alarms':>13}  created"
        )
        for v in versions:
            source = v["source"]
            created = datetime.fromtimestamp(v["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S")
            print(f"{v['version']:>7} {source:<10} {v['failures']:>9} {v['alarmed']:>8} {v['missed']:>7} "
                  f"{v['false_alarms']:>13}  {created}Z {v['note']}")  # fmt: skip
        return 0
    t0 = time.time()
    labels = label_archive(ArchiveReader(storage), horizon_s=args.horizon)
    try:
        version = store.append("telemetry", labels, note=f"derived from {storage.url}")
    except LabelStoreError as exc:
        print(f"gpuwatch labels: {exc}", file=sys.stderr)
        return 1
    modes: dict[str, int] = {}
    for lab in labels:
        modes[lab["mode"]] = modes.get(lab["mode"], 0) + 1
    alarmed = sum(1 for lab in labels if lab.get("alarmed"))
    print(f"{len(labels)} failures derived in {time.time() - t0:.1f} s ({alarmed} alarmed before, "
          f"{len(labels) - alarmed} missed); by mode: {modes}; label store version {version}")  # fmt: skip
    return 0
