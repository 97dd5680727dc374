"""`gpuwatch train`: recorded samples + labels in, a versioned model artifact out."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from gpuwatch.streams.model import fingerprint_files
from gpuwatch.streams.window import WindowConfig
from gpuwatch.training.dataset import SequenceSet, build_sequences
from gpuwatch.training.train import TrainConfig, train


def _inputs(data_dir: Path) -> tuple[Path, Path]:
    samples, labels = data_dir / "samples.jsonl", data_dir / "labels.jsonl"
    for p in (samples, labels):
        if not p.exists():
            raise SystemExit(f"gpuwatch train: {p} is missing; make one with `gpuwatch simulate --out {data_dir}`")
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


def train_command(args: argparse.Namespace) -> int:
    window = WindowConfig()
    sets = []
    files: list[Path] = []
    t0 = time.time()
    for d in args.data:
        samples, labels = _inputs(Path(d))
        files += [samples, labels]
        seen = [0]

        def progress(n: int, seen: list[int] = seen, name: str = d) -> None:
            seen[0] += n
            sys.stderr.write(f"\rreading {name}: {seen[0]:,} GPU-samples")
            sys.stderr.flush()

        sets.append(
            build_sequences(
                samples, labels, window=window, sample_every_s=args.sample_every, horizon_s=args.horizon,
                seed=args.seed, progress=progress,
            )
        )
        sys.stderr.write("\n")
    data = concat(sets)
    print(f"built {len(data.y):,} sequences ({int(data.y.sum()):,} positive) in {time.time() - t0:.0f} s",
          file=sys.stderr)
    artifact = train(
        data,
        TrainConfig(epochs=args.epochs, device=args.device, seed=args.seed),
        window=window,
        horizon_s=args.horizon,
        data_fingerprint=fingerprint_files(files),
    )
    artifact.save(args.out)
    print(f"wrote {args.out} (model {artifact.version}, threshold {artifact.threshold:.2f}, "
          f"temperature {artifact.temperature:.2f}) in {time.time() - t0:.0f} s")
    return 0
