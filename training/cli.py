"""`gpuwatch train`: recorded samples + labels in, a versioned model artifact (and a GBDT baseline) out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gpuwatch.streams.model import Scorer, fingerprint_files
from gpuwatch.streams.window import WindowConfig
from gpuwatch.training.baselines import GbdtBaseline
from gpuwatch.training.dataset import Failures, SequenceSet, build_sequences
from gpuwatch.training.evaluate import best_threshold, join_labels
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
                negative_keep=args.negative_keep, seed=args.seed, progress=progress,
            )
        )  # fmt: skip
        sys.stderr.write("\n")
    return concat(sets), files


def choose_thresholds(
    val_dir: Path, scorer: Scorer, gbdt: GbdtBaseline | None, args: argparse.Namespace
) -> dict[str, dict]:
    """Best event-level F1 thresholds on a validation fleet, for the model and the GBDT baseline."""
    from gpuwatch.training.eval_cli import collect

    others = {"gbdt": gbdt} if gbdt is not None else {}
    table, _ = collect(val_dir, scorer, others, args.rescore_interval)
    lab = join_labels(table, Failures.load(val_dir / "labels.jsonl"), scorer.artifact.horizon_s)
    out: dict[str, dict] = {}
    for name in ["lstm", *others]:
        thr, metrics = best_threshold(lab, lab.risk[name], args.merge_gap)
        out[name] = {"threshold": thr, "validation": metrics}
    return out


def train_command(args: argparse.Namespace) -> int:
    window = WindowConfig()
    t0 = time.time()
    data, files = load_sequences(args.data, args, window)
    print(f"built {len(data.y):,} sequences ({int(data.y.sum()):,} positive) in {time.time() - t0:.0f} s",
          file=sys.stderr)  # fmt: skip
    config = TrainConfig(
        epochs=args.epochs, hidden=args.hidden, mlp=args.mlp, batch_size=args.batch_size, lr=args.lr,
        device=str(_device(args.device)), seed=args.seed,
    )  # fmt: skip
    split = split_by_gpu(data, config.val_fraction, config.seed)
    t1 = time.time()
    artifact = train(data, config, window=window, horizon_s=args.horizon, data_fingerprint=fingerprint_files(files),
                     split=split)  # fmt: skip
    artifact.metrics["train_seconds"] = round(time.time() - t1, 1)
    gbdt = None
    if not args.no_gbdt:
        t2 = time.time()
        gbdt = GbdtBaseline.fit(data, split[0], split[1], artifact)
        print(f"gbdt baseline trained in {time.time() - t2:.0f} s", file=sys.stderr)
    del data
    if args.val_data:
        chosen = choose_thresholds(Path(args.val_data), Scorer(artifact, device="cpu"), gbdt, args)
        artifact.threshold = chosen["lstm"]["threshold"]
        artifact.metrics["validation_events"] = chosen["lstm"]["validation"]
        artifact.metrics["threshold_from"] = (
            f"best event-level F1 on validation fleet {Path(args.val_data).name}"
        )
        if gbdt is not None:
            gbdt.threshold = chosen["gbdt"]["threshold"]
        for name, c in chosen.items():
            v = c["validation"]
            print(f"{name}: threshold {c['threshold']:.3f}; validation precision {v['precision']:.3f} recall "
                  f"{v['recall']:.3f} F1 {v['f1']:.3f}", file=sys.stderr)  # fmt: skip
    else:
        artifact.metrics["threshold_from"] = "best sequence-level F1 on the held-back GPU split"
    artifact.save(args.out)
    if gbdt is not None:
        gbdt.save(Path(args.out).with_suffix(".gbdt.txt"))
    print(f"wrote {args.out} (model {artifact.version}, threshold {artifact.threshold:.3f}, "
          f"temperature {artifact.temperature:.3f}) in {time.time() - t0:.0f} s")  # fmt: skip
    return 0


def _device(name: str) -> object:
    from gpuwatch.streams.model import resolve_device

    return resolve_device(name)
