"""`gpuwatch train --archive`: retrain on a fleet's own archived telemetry and labels.

The archive is split by time: the model trains on the past and is validated on the most recent
`--validate-days`, never the other way. Training samples stop one horizon before the validation window and
training reads only the failures before it, so no training label depends on what happened inside validation.
By default the shipped weights are fine-tuned (its normalisation kept, a lower learning rate, a few epochs);
`--init scratch` trains anew, `--init PATH` fine-tunes another artifact. The calibration map and both operating
points are then chosen again on the validation window, at the fleet's own failure rate. The artifact names its
parent and the data window, and a JSON report next to it says what it was trained and chosen on.

It refuses (one line, exit 1) when the labels are too few to say anything; `MIN_VALIDATION_FAILURES` and
`MIN_TRAIN_FAILURES` say how few, and why.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from gpuwatch.config import Settings
from gpuwatch.streams.model import ModelArtifact, ModelError, load_artifact
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig
from gpuwatch.training.dataset import Failures, RecordingError, build_sequences
from gpuwatch.training.recording import Recording, open_recording
from gpuwatch.training.train import MIN_PLATT_POSITIVES, TrainConfig, split_by_gpu, train

DAY_S = 86400.0
# A fine-tune starts from weights that already work: a tenth of the learning rate and half the epochs of training
# anew (`TrainConfig`), so it adapts to the fleet without forgetting what the simulated fleets taught it.
FINE_TUNE_LR = 3e-4
FINE_TUNE_EPOCHS = 3


def wilson_half_width(p: float, n: int, z: float = 1.96) -> float:
    """Half the width of the Wilson score interval (95 % by default) of a proportion `p` seen on `n` trials."""
    if n <= 0:
        return 0.5
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


def min_trials(half_width: float, z: float = 1.96) -> int:
    """The fewest trials for which the Wilson interval of any proportion is at most +- `half_width` wide (the
    worst case is p = 0.5)."""
    n = 1
    while wilson_half_width(0.5, n, z) > half_width:
        n += 1
    return n


# Validation: recall is a share of the validation window's failures. Below 12 of them its 95 % interval is wider
# than +-0.25 whatever the recall, so the window cannot tell a model that catches a quarter of the failures from
# one that catches half, and the operating point chosen on it means nothing.
MIN_VALIDATION_FAILURES = min_trials(0.25)
# Training: the epoch and the Platt scaling are chosen on a held-back share of the training window's GPUs
# (TrainConfig.val_fraction, 20 %). Below 25 failures that share expects fewer than the 5 failures Platt scaling
# needs (`train.MIN_PLATT_POSITIVES`, counted there in sequences, here in failures, each giving many sequences).
MIN_TRAIN_FAILURES = math.ceil(MIN_PLATT_POSITIVES / TrainConfig.val_fraction)


class NotEnoughLabels(ValueError):
    """The archive's labels are too few to train or to validate on; the message says how many and how many needed."""


@dataclass(frozen=True)
class TimeSplit:
    """Sample times of the archive, [start, end], cut into training [start, train_until) and validation [split, end].
    `train_until` is one horizon before `split`: a training sample's label (a failure within the horizon) never
    depends on a failure in the validation window."""

    start: float
    end: float
    split: float
    train_until: float

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def time_split(start: float, end: float, validate_days: float, horizon_s: float) -> TimeSplit:
    """The split of [start, end]: the last `validate_days` validate, the time before them (less a horizon) trains.
    NotEnoughLabels when nothing is left to train on."""
    if validate_days <= 0:
        raise NotEnoughLabels(f"--validate-days {validate_days:g}: give a positive number of days to validate on")
    split = end - validate_days * DAY_S
    train_until = split - horizon_s
    if train_until <= start:
        have = (end - start) / DAY_S
        raise NotEnoughLabels(f"the archive spans {have:.2f} days: validating on the last {validate_days:g} leaves "
                              "nothing to train on; archive more days or pass a smaller --validate-days")  # fmt: skip
    out = TimeSplit(start, end, split, train_until)
    assert out.start < out.train_until < out.split < out.end  # training lies strictly before validation
    return out


def failure_times(failures: Failures, *, with_precursor: bool) -> np.ndarray:
    """Every failure time in `failures`, sorted; with `with_precursor`, only failures whose precursor is known."""
    out = [fail[pre] if with_precursor else fail for fail, _, _, pre, _ in failures.by_uuid.values()]
    return np.sort(np.concatenate(out)) if out else np.zeros(0)


@dataclass(frozen=True)
class LabelCounts:
    """Failures in each window: those the metrics count (with a precursor, when the labels know precursors; all,
    when they do not, as for labels derived from telemetry) and all of them."""

    train: int
    validation: int
    train_all: int
    validation_all: int
    precursors_known: bool

    def check(self) -> None:
        """NotEnoughLabels, naming the counts and the minimums, when either window has too few failures."""
        what = "failures with a precursor" if self.precursors_known else "failures"
        short = []
        if self.train < MIN_TRAIN_FAILURES:
            short.append(f"{self.train} {what} to train on (need {MIN_TRAIN_FAILURES})")
        if self.validation < MIN_VALIDATION_FAILURES:
            short.append(f"{self.validation} in the validation window (need {MIN_VALIDATION_FAILURES}: below that "
                         "recall's 95 % interval is wider than +-0.25)")  # fmt: skip
        if short:
            raise NotEnoughLabels(f"too few labels: {' and '.join(short)}; archive more weeks, add operator labels "
                                  "(`gpuwatch label`), or change --validate-days")  # fmt: skip


def count_labels(failures: Failures, split: TimeSplit) -> LabelCounts:
    """Failures before the validation window (they have training samples before them) and inside it."""
    known = any(bool(pre.any()) for _, _, _, pre, _ in failures.by_uuid.values())
    counted = failure_times(failures, with_precursor=known)
    every = failure_times(failures, with_precursor=False)

    def train(t: np.ndarray) -> int:
        return int(((t >= split.start) & (t < split.split)).sum())

    def validation(t: np.ndarray) -> int:
        return int(((t >= split.split) & (t <= split.end)).sum())

    return LabelCounts(train=train(counted), validation=validation(counted), train_all=train(every),
                       validation_all=validation(every), precursors_known=known)  # fmt: skip


def archive_time_range(recording: Recording) -> tuple[float, float]:
    """(first, last) sample time of an archive, from its files' names (no file is opened)."""
    from gpuwatch.archive.reader import ArchiveReader
    from gpuwatch.archive.writer import file_time_range

    ranges = [file_time_range(rel) for rel in ArchiveReader(recording.archive_url).files("samples")]
    if not ranges:
        raise RecordingError(f"{recording.location} holds no samples; archive some with `gpuwatch archive`")
    return min(lo for lo, _ in ranges), max(hi for _, hi in ranges)


def _parent(init: str) -> tuple[ModelArtifact | None, str]:
    """The artifact to fine-tune (None: train anew) and what to call it in the new artifact."""
    if init == "scratch":
        return None, "scratch"
    parent = load_artifact(None if init == "shipped" else init)
    if tuple(parent.features) != FEATURE_NAMES or parent.window != WindowConfig():
        raise ModelError(f"--init {init}: its features or window differ from this version's; fine-tune an artifact "
                         "of this version, or pass --init scratch")  # fmt: skip
    return parent, init


def _open(args: argparse.Namespace) -> Recording:
    recording = open_recording(args.archive, need_labels=False)
    if recording.archive_url == "":
        raise RecordingError(f"--archive {args.archive} is not a gpuwatch archive; archive a `gpuwatch simulate` "
                             f"folder with `gpuwatch archive --import {args.archive}`, or pass it with --data")  # fmt: skip
    if args.labels:
        if not Path(args.labels).is_file():
            raise RecordingError(f"--labels {args.labels} is not a file; pass a labels.jsonl (the label store's "
                                 "format) or leave it out to use the archive's label store")  # fmt: skip
        recording = dataclasses.replace(recording, labels_path=Path(args.labels))
    return recording


def retrain_command(args: argparse.Namespace, settings: Settings) -> int:
    """`gpuwatch train --archive`: see the module docstring. Writes args.out and its JSON report (.json)."""
    from gpuwatch.training.cli import choose_and_save, data_fingerprint

    t0 = time.time()
    if args.data or args.val_data or args.operating_point_of:
        raise SystemExit("gpuwatch train: --archive trains and validates on the archive alone; leave out --data, "
                         "--val-data and --operating-point-of")  # fmt: skip
    try:
        recording = _open(args)
        parent, parent_name = _parent(args.init)
        failures = recording.failures()
        first, last = archive_time_range(recording)
        split = time_split(first, last, args.validate_days, args.horizon)
        counts = count_labels(failures, split)
        counts.check()
    except NotEnoughLabels as exc:
        raise SystemExit(f"gpuwatch train: {args.archive}: {exc}") from None
    sys.stderr.write(
        f"{recording.location}: training on {(split.train_until - split.start) / DAY_S:.2f} days "
        f"({counts.train} failures counted, {counts.train_all} in all), validating on the last "
        f"{(split.end - split.split) / DAY_S:.2f} ({counts.validation} counted, {counts.validation_all} in all)\n"
    )
    training = dataclasses.replace(recording, name=f"{recording.name}[train]", until=split.train_until,
                                   labels_before=split.split)  # fmt: skip
    validation = dataclasses.replace(recording, name=f"{recording.name}[validation]", since=split.split)
    window = WindowConfig()
    data = build_sequences(training, window=window, sample_every_s=args.sample_every, horizon_s=args.horizon,
                           negative_keep=args.negative_keep, seed=args.seed if args.data_seed is None else args.data_seed)  # fmt: skip
    assert data.ts.max() < split.split, "a training sequence lies in the validation window"
    fine_tune = parent is not None
    config = TrainConfig(
        epochs=args.epochs or (FINE_TUNE_EPOCHS if fine_tune else TrainConfig.epochs),
        lr=args.lr or (FINE_TUNE_LR if fine_tune else TrainConfig.lr),
        hidden=parent.hidden if parent is not None else args.hidden, mlp=parent.mlp if parent is not None else args.mlp,
        batch_size=args.batch_size, seed=args.seed, threads=1,
        # Labels derived from telemetry do not say when a precursor began: every positive is a target then.
        train_on="visible" if counts.precursors_known else "all",
    )  # fmt: skip
    # GPU-days observed: each kept sequence stands for `weight` sequences `sample_every` apart (GPUs down under
    # repair are not sampled, board swaps are not counted twice).
    gpu_days = float(data.weight.sum()) * args.sample_every / DAY_S
    own_rate = counts.train_all / max(gpu_days, 1e-9)
    artifact = train(data, config, window=window, horizon_s=args.horizon, data_fingerprint=data_fingerprint([recording]),
                     split=split_by_gpu(data, config.val_fraction, args.seed if args.data_seed is None else args.data_seed),
                     init=parent)  # fmt: skip
    del data
    about: dict[str, Any] = {
        "parent": {"init": parent_name, "version": parent.version if parent is not None else None},
        "data_window": {"archive": recording.location, "label_version": recording.label_version(),
                        **split.as_dict(), "validate_days": args.validate_days},
        "labels": dataclasses.asdict(counts),
        "minimums": {"train_failures": MIN_TRAIN_FAILURES, "validation_failures": MIN_VALIDATION_FAILURES},
        "fleet_failure_rate_per_gpu_day": own_rate,
    }  # fmt: skip
    artifact.metrics["retrained"] = about
    # Calibration and operating points at the fleet's own failure rate, on the validation window only.
    fleet = dataclasses.replace(settings, fleet_failure_rate_per_gpu_day=own_rate)
    choose_and_save(artifact, None, args, t0, fleet, val_recordings=[validation], own_fleet=True)
    report = {**about, "model": artifact.version, "out": str(args.out),
              "calibration_prevalence": artifact.calibration_prevalence,
              "alarm": {"threshold": artifact.threshold, "for_s": artifact.alarm_for_s,
                        "bridge_s": artifact.alarm_bridge_s},
              "drain": None if artifact.migrate_threshold is None else
              {"threshold": artifact.migrate_threshold, "for_s": artifact.migrate_for_s,
               "bridge_s": artifact.migrate_bridge_s},
              "validation": artifact.metrics.get("validation_events"), "train_config": dataclasses.asdict(config)}  # fmt: skip
    Path(args.out).with_suffix(".json").write_bytes(
        orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
    )
    print(f"set fleet_failure_rate_per_gpu_day = {own_rate:.4g} (this fleet's, measured on the training window) "
          f"where the model runs; report in {Path(args.out).with_suffix('.json')}")  # fmt: skip
    return 0
