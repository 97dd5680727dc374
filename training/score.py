"""`gpuwatch score`: offline scoring of recorded snapshots with exactly the stream worker's code."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, Inbound, RiskProcessor


def score_file(
    input_path: Path, processor: RiskProcessor, batch: int = 2000
) -> Iterator[tuple[BatchResult, int]]:
    """Feed the file through `processor` in arrival order; yields each batch's result and its line count."""
    with open(input_path, "rb") as fh:
        pending: list[Inbound] = []
        for lineno, line in enumerate(fh):
            if not line.strip():
                continue
            pending.append(Inbound(line.rstrip(b"\n"), str(input_path), 0, lineno))
            if len(pending) >= batch:
                yield processor.process(pending), len(pending)
                pending = []
        if pending:
            yield processor.process(pending), len(pending)


def score_command(args: argparse.Namespace) -> int:
    processor = RiskProcessor(
        Scorer(load_artifact(args.model or None), device="cpu"),
        rescore_interval_s=args.rescore_interval, stage="score",
    )
    t0 = time.time()
    samples = scored = rejected = 0
    with open(args.output, "wb") as out, open(Path(args.output).with_suffix(".deadletter.jsonl"), "wb") as dl:
        for result, _ in score_file(Path(args.input), processor):
            samples += result.samples
            scored += len(result.risk)
            rejected += len(result.deadletters)
            out.writelines(v + b"\n" for _, v in result.risk)
            dl.writelines(v + b"\n" for v in result.deadletters)
            elapsed = time.time() - t0
            sys.stderr.write(f"\rscored {samples:,} GPU-samples ({samples / max(elapsed, 1e-9):,.0f}/s), "
                             f"{scored:,} risk records")
            sys.stderr.flush()
    elapsed = time.time() - t0
    sys.stderr.write("\n")
    print(f"{samples:,} GPU-samples in {elapsed:.1f} s = {samples / max(elapsed, 1e-9):,.0f} GPU-samples/s; "
          f"{scored:,} risk records to {args.output}; {rejected} dead letters")
    return 0
