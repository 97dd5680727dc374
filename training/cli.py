"""`gpuwatch train`: recorded samples + labels in, a versioned model artifact (and a GBDT baseline) out."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import orjson

from gpuwatch.config import Settings
from gpuwatch.costs import CostModel
from gpuwatch.streams.model import ModelArtifact, ModelError, Scorer, fingerprint_files, load_artifact
from gpuwatch.streams.operating_point import MIN_RECORDS
from gpuwatch.streams.window import WindowConfig
from gpuwatch.training.baselines import GbdtBaseline
from gpuwatch.training.dataset import DeadLetterCount, RecordingError, SequenceSet, build_sequences
from gpuwatch.training.evaluate import best_operating_point, concat_labelled, join_labels
from gpuwatch.training.recording import Recording, open_recording
from gpuwatch.training.train import TrainConfig, split_by_gpu, train


def _inputs(data_dir: str) -> Recording:
    try:
        return open_recording(data_dir)
    except RecordingError as exc:
        raise SystemExit(f"gpuwatch train: {exc}; make one with `gpuwatch simulate --out {data_dir}`") from None


def concat(sets: list[SequenceSet]) -> SequenceSet:
    return SequenceSet(
        x=np.concatenate([s.x for s in sets]),
        y=np.concatenate([s.y for s in sets]),
        mode=np.concatenate([s.mode for s in sets]),
        weight=np.concatenate([s.weight for s in sets]),
        ts=np.concatenate([s.ts for s in sets]),
        uuid=[u for s in sets for u in s.uuid],
        lead_s=np.concatenate([s.lead_s for s in sets]),
        precursor=np.concatenate([s.precursor for s in sets]),
    )


def load_sequences(
    dirs: list[str], args: argparse.Namespace, window: WindowConfig
) -> tuple[SequenceSet, list[Recording], DeadLetterCount]:
    """Build training sequences from every data dir, with a progress line per dir and a line for each dir's
    dead-lettered lines; also returns the lines dead-lettered in all."""
    sets = []
    recordings: list[Recording] = []
    total = DeadLetterCount()
    for d in dirs:
        recording = _inputs(d)
        recordings.append(recording)
        dead = DeadLetterCount()
        seen = [0]
        t0 = time.time()

        def progress(n: int, seen: list[int] = seen, name: str = d, t0: float = t0) -> None:
            seen[0] += n
            if seen[0] % 100_000 < n:
                rate = seen[0] / max(time.time() - t0, 1e-9)
                sys.stderr.write(f"\rreading {name}: {seen[0]:,} GPU-samples ({rate:,.0f}/s)")
                sys.stderr.flush()

        sets.append(
            build_sequences(
                recording, window=window, sample_every_s=args.sample_every, horizon_s=args.horizon,
                negative_keep=args.negative_keep, seed=_data_seed(args), progress=progress, deadletters=dead,
            )
        )  # fmt: skip
        sys.stderr.write("\n")
        if dead.lines:
            sys.stderr.write(f"{recording.source}: {dead.describe()}\n")
        total.lines += dead.lines
        total.first = total.first or dead.first
    return concat(sets), recordings, total


def data_fingerprint(recordings: list[Recording]) -> str:
    """What the artifact says it was trained on: sha256 of the simulate folders' files, and for an archive its
    location, data files and label version."""
    files = [p for r in recordings if r.samples_path and r.labels_path for p in (r.samples_path, r.labels_path)]
    digest = fingerprint_files(files)
    archives = [[r.location, r.fingerprint(), r.label_version()] for r in recordings if r.samples_path is None]
    if archives:
        digest = hashlib.sha256(digest.encode() + orjson.dumps(archives)).hexdigest()[:16]
    return digest


def _data_seed(args: argparse.Namespace) -> int:
    return args.seed if args.data_seed is None else args.data_seed


def choose_thresholds(
    val_dirs: list[Recording], scorer: Scorer, gbdt: GbdtBaseline | None, args: argparse.Namespace,
    settings: Settings | None = None, own_fleet: bool = False,
) -> dict[str, dict]:  # fmt: skip
    """Operating points on the validation fleets pooled. The model's alarm and drain operating points: the most
    net GPU-hours at the real failure rate under the settings' cost model (`training/operating_points.py`).
    The GBDT baseline's: the best event-level F1 (threshold, and how many scorings in a row an alarm needs).
    `own_fleet`: the validation data is the deployment's own fleet (`gpuwatch train --archive`), so the
    calibration map is fitted on all of it, whatever its failure rate: its base rate is the one that matters."""
    from gpuwatch.training.calibration import fit_map
    from gpuwatch.training.eval_cli import as_recording, collect_cached, fleet_failure_rate
    from gpuwatch.training.operating_points import choose, describe

    settings = settings or Settings()
    others = {"gbdt": gbdt} if gbdt is not None else {}
    # Scores before any calibration map: the map is fitted here (anew, replacing one the artifact may hold).
    raw_scorer = Scorer(dataclasses.replace(scorer.artifact, calibration_map=None), device="cpu")
    labs, uuids, rich = [], [], []
    for val_dir in val_dirs:
        table = collect_cached(val_dir, raw_scorer, others, args.rescore_interval)
        labs.append(join_labels(table, as_recording(val_dir).failures(), scorer.artifact.horizon_s))
        uuids += table.uuids
        rich.append(own_fleet or (fleet_failure_rate(val_dir) or 0.0) >= 0.01)
    # Recalibrate on the failure-rich validation fleets' records (the healthy one fails too rarely to say
    # anything about calibration): a monotone map on top of the model's score, and the base rate it holds at.
    calibration = None
    if any(rich):
        pooled = concat_labelled([lab for lab, r in zip(labs, rich) if r])
        xs, ys = fit_map(pooled.risk["lstm"], pooled.y)
        calibration = {"map": (xs, ys),
                       "prevalence": float(pooled.y.mean()),
                       "fleets": [d.name for d, r in zip(val_dirs, rich) if r]}  # fmt: skip
        for lab in labs:
            lab.risk["lstm"] = np.interp(lab.risk["lstm"], xs, ys)
    lab = concat_labelled(labs)
    costs = CostModel.from_settings(settings)
    rate = settings.fleet_failure_rate_per_gpu_day
    curve: list[dict] = []
    alarm, drain = choose(lab, uuids, lab.risk["lstm"], costs, rate, args.merge_gap, curve=curve)
    out: dict[str, dict] = {
        "lstm": {"threshold": alarm.threshold, "alarm_records": MIN_RECORDS, "alarm_for_s": alarm.for_s,
                 "alarm_bridge_s": alarm.bridge_s, "validation": describe(lab, lab.risk["lstm"], alarm, args.merge_gap)},
        "lstm-drain": None if drain is None else {
            "threshold": drain.threshold, "alarm_records": MIN_RECORDS, "alarm_for_s": drain.for_s,
            "alarm_bridge_s": drain.bridge_s, "validation": describe(lab, lab.risk["lstm"], drain, args.merge_gap)},
        "chosen_for": {"failures_per_gpu_day": rate, "costs": costs.__dict__, "validation_gpu_days": lab.gpu_days},
        "calibration": calibration,
        "curve": curve,
    }  # fmt: skip
    for name in others:
        thr, records, metrics = best_operating_point(lab, lab.risk[name], args.merge_gap)
        out[name] = {"threshold": thr, "alarm_records": records, "validation": metrics}
    return out


def train_command(args: argparse.Namespace, settings: Settings | None = None) -> int:
    """`gpuwatch train`; a bad recording or model artifact ends it with one line (exit 1)."""
    try:
        return _train(args, settings)
    except (RecordingError, ModelError) as exc:
        raise SystemExit(f"gpuwatch train: {exc}") from None


def _train(args: argparse.Namespace, settings: Settings | None = None) -> int:
    t0 = time.time()
    settings = settings or Settings()
    if args.archive:
        from gpuwatch.training.retrain import retrain_command

        return retrain_command(args, settings)
    if args.operating_point_of:
        return operating_point_command(args, t0, settings)
    if not args.data:
        raise SystemExit("gpuwatch train: give --data (a `gpuwatch simulate` output dir) at least once")
    window = WindowConfig()
    data, recordings, dead = load_sequences(args.data, args, window)
    print(f"built {len(data.y):,} sequences ({int(data.y.sum()):,} positive) in {time.time() - t0:.0f} s",
          file=sys.stderr)  # fmt: skip
    config = TrainConfig(
        epochs=args.epochs or TrainConfig.epochs, hidden=args.hidden, mlp=args.mlp, batch_size=args.batch_size,
        lr=args.lr or TrainConfig.lr,
        device=str(_device(args.device)), seed=args.seed,
    )  # fmt: skip
    split = split_by_gpu(data, config.val_fraction, _data_seed(args))
    t1 = time.time()
    artifact = train(data, config, window=window, horizon_s=args.horizon, data_fingerprint=data_fingerprint(recordings),
                     split=split)  # fmt: skip
    artifact.metrics["train_seconds"] = round(time.time() - t1, 1)
    artifact.metrics["data_seed"] = _data_seed(args)
    artifact.metrics["deadletters"] = dead.as_dict()  # recording lines the training data left out
    gbdt = None
    if not args.no_gbdt:
        t2 = time.time()
        gbdt = GbdtBaseline.fit(data, split[0], split[1], artifact)
        print(f"gbdt baseline trained in {time.time() - t2:.0f} s", file=sys.stderr)
    del data
    return choose_and_save(artifact, gbdt, args, t0, settings)


def operating_point_command(args: argparse.Namespace, t0: float, settings: Settings) -> int:
    """`gpuwatch train --operating-point-of MODEL.pt --val-data DIR --out OUT.pt`: new operating points for
    trained weights, e.g. on a validation fleet with real labels, without retraining."""
    if not args.val_data:
        raise SystemExit("gpuwatch train --operating-point-of needs --val-data (where to choose it)")
    if not Path(args.operating_point_of).is_file():
        raise SystemExit(f"gpuwatch train: --operating-point-of {args.operating_point_of} is not a file; give a model "
                         "artifact that `gpuwatch train` wrote")  # fmt: skip
    artifact = load_artifact(args.operating_point_of)
    sibling = Path(args.operating_point_of).with_suffix(".gbdt.txt")
    gbdt = GbdtBaseline.load(sibling, artifact) if sibling.exists() and not args.no_gbdt else None
    artifact.metrics["operating_point_of"] = str(args.operating_point_of)
    return choose_and_save(artifact, gbdt, args, t0, settings)


def validated_intervals(recordings: list[Recording]) -> list[float]:
    """The distinct sampling intervals (s, rounded to 0.1) of the recordings the operating points are chosen on."""
    return sorted({round(i, 1) for i in (r.typical_interval_s() for r in recordings) if i is not None})


def choose_and_save(
    artifact: ModelArtifact, gbdt: GbdtBaseline | None, args: argparse.Namespace, t0: float, settings: Settings,
    val_recordings: list[Recording] | None = None, own_fleet: bool = False,
) -> int:  # fmt: skip
    """Pick the operating points (on `val_recordings`, else on --val-data when given) and write the artifact and the
    GBDT baseline. `own_fleet`: see `choose_thresholds`."""
    if val_recordings or args.val_data:
        try:
            val_dirs = val_recordings or [open_recording(d) for d in args.val_data]
        except RecordingError as exc:
            raise SystemExit(f"gpuwatch train: --val-data: {exc}") from None
        chosen = choose_thresholds(val_dirs, Scorer(artifact, device="cpu"), gbdt, args, settings, own_fleet)
        if chosen["calibration"] is not None:
            artifact.calibration_map = chosen["calibration"]["map"]
            artifact.calibration_prevalence = chosen["calibration"]["prevalence"]
            artifact.metrics["calibration_from"] = (
                "Platt scaling in training, then a monotone map fitted on the records of validation fleets "
                + " + ".join(chosen["calibration"]["fleets"])
            )
        artifact.threshold = chosen["lstm"]["threshold"]
        artifact.alarm_records = chosen["lstm"]["alarm_records"]
        artifact.alarm_for_s = chosen["lstm"]["alarm_for_s"]
        artifact.alarm_bridge_s = chosen["lstm"]["alarm_bridge_s"]
        drain = chosen["lstm-drain"]
        artifact.migrate_threshold = None if drain is None else drain["threshold"]
        artifact.migrate_records = 1 if drain is None else drain["alarm_records"]
        artifact.migrate_for_s = 0.0 if drain is None else drain["alarm_for_s"]
        artifact.migrate_bridge_s = 0.0 if drain is None else drain["alarm_bridge_s"]
        artifact.metrics["validation_events"] = chosen["lstm"]["validation"]
        artifact.metrics["validation_drain"] = None if drain is None else drain["validation"]
        artifact.metrics["operating_points_chosen_for"] = chosen["chosen_for"]
        artifact.metrics["operating_point_curve"] = chosen["curve"]
        # What the figures were measured at: the stream, score and eval say when telemetry is slower.
        artifact.metrics["validated_intervals_s"] = validated_intervals(val_dirs)
        artifact.metrics["threshold_from"] = (
            "alarm: the highest recall with alarm precision and false checkpoints per 1,000 healthy GPU-days within "
            "the service levels; drain: the most net GPU-hours at the real failure rate with false drains within "
            f"them; on validation fleet{'s' if len(val_dirs) > 1 else ''} " + " + ".join(d.name for d in val_dirs)
        )
        if gbdt is not None:
            gbdt.threshold = chosen["gbdt"]["threshold"]
            gbdt.alarm_records = chosen["gbdt"]["alarm_records"]
        for name, c in chosen.items():
            if not isinstance(c, dict) or "validation" not in c:
                continue
            v = c["validation"]
            worth = v.get("value", {}).get("net_gpu_h_per_1000_gpu_days_real")
            held = f"held {c['alarm_for_s']:g} s" if c.get("alarm_for_s") else f"for {c['alarm_records']} scorings"
            held += f" through dips of up to {c['alarm_bridge_s']:g} s" if c.get("alarm_bridge_s") else ""
            print(f"{name}: threshold {c['threshold']:.3f} {held}; validation precision "
                  f"{v['precision']:.3f} recall {v['recall']:.3f} F1 {v['f1']:.3f}"
                  + (f"; net {worth:.1f} GPU-h per 1,000 GPU-days at the real failure rate" if worth is not None else ""),
                  file=sys.stderr)  # fmt: skip
    else:
        artifact.metrics["threshold_from"] = "best sequence-level F1 on the held-back GPU split"
    artifact.save(args.out)
    if gbdt is not None:
        gbdt.save(Path(args.out).with_suffix(".gbdt.txt"))
    print(f"wrote {args.out} (model {artifact.version}, alarm {artifact.alarm_op.name}, "
          f"temperature {artifact.temperature:.3f}) in {time.time() - t0:.0f} s")  # fmt: skip
    return 0


def _device(name: str) -> object:
    from gpuwatch.streams.model import resolve_device

    return resolve_device(name)
