"""`gpuwatch train`: recorded samples + labels in, a versioned model artifact (and a GBDT baseline) out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gpuwatch.streams.model import ModelArtifact, Scorer, fingerprint_files, load_artifact
from gpuwatch.streams.window import WindowConfig
from gpuwatch.training.baselines import GbdtBaseline
from gpuwatch.training.dataset import Failures, SequenceSet, build_sequences
from gpuwatch.training.evaluate import best_operating_point, concat_labelled, join_labels
from gpuwatch.training.train import TrainConfig, split_by_gpu, train


def _inputs(data_dir: Path) -> tuple[Path, Path]:
    samples, labels = data_dir / "samples.jsonl", data_dir / "labels.jsonl"
    for p in (samples, labels):
        if not p.exists():
            raise SystemExit(
                f"gpuwatch train: {p} is missing; make one with `gpuwatch simulate --out {data_dir}`"
            )
    return samples, labels


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
) -> tuple[SequenceSet, list[Path]]:
    """Build training sequences from every data dir, with a progress line per dir."""
    sets = []
    files: list[Path] = []
    for d in dirs:
        samples, labels = _inputs(Path(d))
        files += [samples, labels]
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
                samples, labels, window=window, sample_every_s=args.sample_every, horizon_s=args.horizon,
                negative_keep=args.negative_keep, seed=_data_seed(args), progress=progress,
            )
        )  # fmt: skip
        sys.stderr.write("\n")
    return concat(sets), files


def _data_seed(args: argparse.Namespace) -> int:
    return args.seed if args.data_seed is None else args.data_seed


def choose_thresholds(
    val_dirs: list[Path], scorer: Scorer, gbdt: GbdtBaseline | None, args: argparse.Namespace
) -> dict[str, dict]:
    """Operating points with the best event-level F1 on the validation fleets pooled (threshold, and how many
    scorings in a row an alarm needs), for the model and the GBDT baseline."""
    from gpuwatch.training.eval_cli import collect

    others = {"gbdt": gbdt} if gbdt is not None else {}
    labs = []
    for val_dir in val_dirs:
        table, _ = collect(val_dir, scorer, others, args.rescore_interval)
        labs.append(join_labels(table, Failures.load(val_dir / "labels.jsonl"), scorer.artifact.horizon_s))
    lab = concat_labelled(labs)
    out: dict[str, dict] = {}
    for name in ["lstm", *others]:
        thr, records, metrics = best_operating_point(lab, lab.risk[name], args.merge_gap)
        out[name] = {"threshold": thr, "alarm_records": records, "validation": metrics}
    return out


def train_command(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.operating_point_of:
        return operating_point_command(args, t0)
    if not args.data:
        raise SystemExit("gpuwatch train: give --data (a `gpuwatch simulate` output dir) at least once")
    window = WindowConfig()
    data, files = load_sequences(args.data, args, window)
    print(f"built {len(data.y):,} sequences ({int(data.y.sum()):,} positive) in {time.time() - t0:.0f} s",
          file=sys.stderr)  # fmt: skip
    config = TrainConfig(
        epochs=args.epochs, hidden=args.hidden, mlp=args.mlp, batch_size=args.batch_size, lr=args.lr,
        device=str(_device(args.device)), seed=args.seed,
    )  # fmt: skip
    split = split_by_gpu(data, config.val_fraction, _data_seed(args))
    t1 = time.time()
    artifact = train(data, config, window=window, horizon_s=args.horizon, data_fingerprint=fingerprint_files(files),
                     split=split)  # fmt: skip
    artifact.metrics["train_seconds"] = round(time.time() - t1, 1)
    artifact.metrics["data_seed"] = _data_seed(args)
    gbdt = None
    if not args.no_gbdt:
        t2 = time.time()
        gbdt = GbdtBaseline.fit(data, split[0], split[1], artifact)
        print(f"gbdt baseline trained in {time.time() - t2:.0f} s", file=sys.stderr)
    del data
    return _choose_and_save(artifact, gbdt, args, t0)


def operating_point_command(args: argparse.Namespace, t0: float) -> int:
    """`gpuwatch train --operating-point-of MODEL.pt --val-data DIR --out OUT.pt`: new operating points for
    trained weights, e.g. on a validation fleet with real labels, without retraining."""
    if not args.val_data:
        raise SystemExit("gpuwatch train --operating-point-of needs --val-data (where to choose it)")
    artifact = load_artifact(args.operating_point_of)
    sibling = Path(args.operating_point_of).with_suffix(".gbdt.txt")
    gbdt = GbdtBaseline.load(sibling, artifact) if sibling.exists() and not args.no_gbdt else None
    artifact.metrics["operating_point_of"] = str(args.operating_point_of)
    return _choose_and_save(artifact, gbdt, args, t0)


def _choose_and_save(artifact: ModelArtifact, gbdt: GbdtBaseline | None, args: argparse.Namespace, t0: float) -> int:
    """Pick the operating points (on --val-data when given) and write the artifact and the GBDT baseline."""
    if args.val_data:
        val_dirs = [Path(d) for d in args.val_data]
        chosen = choose_thresholds(val_dirs, Scorer(artifact, device="cpu"), gbdt, args)
        artifact.threshold = chosen["lstm"]["threshold"]
        artifact.alarm_records = chosen["lstm"]["alarm_records"]
        artifact.metrics["validation_events"] = chosen["lstm"]["validation"]
        artifact.metrics["threshold_from"] = (
            f"best event-level F1 on validation fleet{'s' if len(val_dirs) > 1 else ''} "
            + " + ".join(d.name for d in val_dirs)
        )
        if gbdt is not None:
            gbdt.threshold = chosen["gbdt"]["threshold"]
            gbdt.alarm_records = chosen["gbdt"]["alarm_records"]
        for name, c in chosen.items():
            v = c["validation"]
            print(f"{name}: threshold {c['threshold']:.3f} for {c['alarm_records']} scorings; validation precision {v['precision']:.3f} recall "
                  f"{v['recall']:.3f} F1 {v['f1']:.3f}", file=sys.stderr)  # fmt: skip
    else:
        artifact.metrics["threshold_from"] = "best sequence-level F1 on the held-back GPU split"
    artifact.save(args.out)
    if gbdt is not None:
        gbdt.save(Path(args.out).with_suffix(".gbdt.txt"))
    print(f"wrote {args.out} (model {artifact.version}, threshold {artifact.threshold:.3f} for "
          f"{artifact.alarm_records} scorings, "
          f"temperature {artifact.temperature:.3f}) in {time.time() - t0:.0f} s")  # fmt: skip
    return 0


def _device(name: str) -> object:
    from gpuwatch.streams.model import resolve_device

    return resolve_device(name)
