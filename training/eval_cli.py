"""`gpuwatch eval`: score held-out recordings with the model and both baselines, report and write JSON.

All three scorers see the same windows at the same scoring times: the model runs inside the stream's
`RiskProcessor` (so its records are exactly what `gpuwatch score` writes) and the baselines score the
very windows it scores, right after it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import orjson

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.streams.model import ModelArtifact, Scorer, load_artifact
from gpuwatch.streams.processor import BatchResult, RiskProcessor
from gpuwatch.training.baselines import RULES, GbdtBaseline, ThresholdRules
from gpuwatch.training.dataset import Failures
from gpuwatch.training.evaluate import Labelled, RiskTable, join_labels, scorer_report
from gpuwatch.training.score import replay

_MODE_INDEX = {m: i for i, m in enumerate(FAILURE_MODES)}
DEFAULT_MERGE_GAP_S = 600.0


class BatchScorer(Protocol):
    artifact: ModelArtifact
    version: str

    def score(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class TeeProcessor(RiskProcessor):
    """The stream's processor, plus other scorers run on the very windows the model scores, in record order."""

    def __init__(self, scorer: Scorer, others: dict[str, BatchScorer], **kwargs: Any) -> None:
        super().__init__(scorer, **kwargs)
        self.others = others
        self.risk: dict[str, list[np.ndarray]] = {k: [] for k in others}
        self.mode: dict[str, list[np.ndarray]] = {k: [] for k in others}

    def score_slots(self, slots: np.ndarray, result: BatchResult) -> None:
        super().score_slots(slots, result)  # appends one record per slot, in slot order
        if self.others:
            seqs = self.store.sequences(slots)
            for name, scorer in self.others.items():
                r, m = scorer.score(seqs)
                self.risk[name].append(r)
                self.mode[name].append(m)


def collect(
    data_dir: Path, primary: Scorer, others: dict[str, BatchScorer], rescore_interval_s: float,
    primary_name: str = "lstm",
) -> tuple[RiskTable, dict[str, Any]]:  # fmt: skip
    """Replay `data_dir/samples.jsonl` like the stream; returns every scorer's risk per record, and run stats."""
    processor = TeeProcessor(primary, others, rescore_interval_s=rescore_interval_s, stage="eval")
    uuid: list[str] = []
    ts: list[float] = []
    risk: list[float] = []
    mode: list[int] = []
    samples = 0
    t0 = time.time()
    last = 0.0
    for result in replay(data_dir / "samples.jsonl", processor):
        samples += result.samples
        for _, value in result.risk:
            rec = orjson.loads(value)
            uuid.append(rec["uuid"])
            ts.append(rec["ts"])
            risk.append(rec["risk"])
            mode.append(_MODE_INDEX[rec["mode"]])
        if time.time() - last >= 5.0:
            last = time.time()
            sys.stderr.write(f"\rscoring {data_dir.name}: {samples:,} GPU-samples, {len(ts):,} risk records "
                             f"({samples / max(last - t0, 1e-9):,.0f}/s)")  # fmt: skip
            sys.stderr.flush()
    sys.stderr.write("\n")
    risks = {primary_name: np.asarray(risk)}
    modes = {primary_name: np.asarray(mode)}
    for name in others:
        risks[name] = np.concatenate(processor.risk[name]) if processor.risk[name] else np.zeros(0)
        if getattr(others[name], "predicts_mode", True):
            modes[name] = (
                np.concatenate(processor.mode[name]) if processor.mode[name] else np.zeros(0, dtype=np.int64)
            )
    stats = {"gpu_samples": samples, "risk_records": len(ts), "seconds": round(time.time() - t0, 1)}
    return RiskTable.from_columns(uuid, np.asarray(ts), risks, modes), stats


def build_report(
    lab: Labelled, thresholds: dict[str, float], merge_gap_s: float, meta: dict[str, Any],
    alarm_records: dict[str, int] | None = None,
) -> dict[str, Any]:
    """The eval JSON: the model's figures at the top level, every scorer's under `scorers`."""
    records = alarm_records or {}
    scorers = {name: scorer_report(lab, name, thr, merge_gap_s, records.get(name, 1))
               for name, thr in thresholds.items()}  # fmt: skip
    m = scorers["lstm"]
    report: dict[str, Any] = {
        "pr_auc": m["pr_auc"], "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
        "median_lead_min": m["median_lead_min"], "p10_lead_min": m["p10_lead_min"], "ece": m["ece"],
        "brier": m["brier"], "false_alarms_per_1000_gpu_days": m["false_alarms_per_1000_gpu_days"],
        "recall_by_mode": m["recall_by_mode"], "threshold": m["threshold"], "alarm_records": m["alarm_records"],
        "baseline_threshold_f1": scorers["threshold"]["f1"] if "threshold" in scorers else None,
        "baseline_gbdt_f1": scorers["gbdt"]["f1"] if "gbdt" in scorers else None,
    }  # fmt: skip
    report["definitions"] = {
        "pr_auc": "event level: area under precision (alarm episodes followed by a failure within the horizon) "
        "vs recall (failures with precursors caught), over thresholds",
        "record_pr_auc": "record level: average precision of each risk record for 'fails within the horizon', "
        "sudden failures and not-yet-visible precursors included",
        "alarm": "a risk record at or above the operating threshold, as are the alarm_records - 1 records of "
        "its GPU before it (consecutive scorings, like a Prometheus `for:`; both chosen on validation data)",
        "episode": f"alarms of one GPU less than {merge_gap_s:.0f} s apart, all followed by "
        "the same failure within the horizon (true) or all not (false)",
        "lead_min": "failure ts minus the first alarm of the earliest true episode before it (at most the "
        "horizon), caught failures with precursors",
        "false_alarms_per_1000_gpu_days": "episodes of alarms with no failure within the horizon after them, "
        "per 1,000 GPU-days outside failed states",
        "false_alarms_in_precursor": "false episodes that start while the precursor of the GPU's next failure "
        "is already running, more than the horizon before it: too early for the risk's claim, but not set off "
        "by a look-alike; precision_counting_early_alarms counts them as right (a secondary figure)",
        "ceiling_median_lead_min": "median of min(precursor length, horizon) over failures with precursors: the "
        "lead a detector that alarms the moment a precursor starts would reach",
        "ece": "15 equal-width bins over all records outside failed states",
    }
    report["scorers"] = scorers
    report["threshold_rules"] = [{"name": r.name, "promql": r.promql, "mode": r.mode} for r in RULES]
    report["data"] = {
        **meta, "records": int(len(lab.ts)), "positive_records": int(lab.y.sum()),
        "gpu_days": round(lab.gpu_days, 2), "failures": int(len(lab.failures.gpu)),
        "merge_gap_s": merge_gap_s, "horizon_s": lab.horizon_s,
    }  # fmt: skip
    return report


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    if isinstance(x, int | np.integer):
        return f"{x:,}"
    return f"{x:.3f}" if not pct else f"{100 * x:.1f}%"


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of the model and the baselines side by side."""
    s = report["scorers"]
    names = list(s)
    rows = [
        ("operating threshold", "threshold", False), ("alarm: scorings in a row", "alarm_records", False),
        ("PR-AUC (event)", "pr_auc", False),
        ("precision (episodes)", "precision", False), ("recall (precursor failures)", "recall", False),
        ("F1", "f1", False), ("recall (all failures)", "recall_all", False),
        ("false alarms / 1000 GPU-days", "false_alarms_per_1000_gpu_days", False),
        ("false alarms in a running precursor", "false_alarms_in_precursor", False),
        ("precision, early alarms counted right", "precision_counting_early_alarms", False),
        ("median lead (min)", "median_lead_min", False), ("p10 lead (min)", "p10_lead_min", False),
        ("lead ceiling: median precursor (min)", "ceiling_median_lead_min", False),
        ("PR-AUC (records)", "record_pr_auc", False), ("PR-AUC (records, visible)", "record_pr_auc_visible", False),
        ("Brier", "brier", False), ("ECE", "ece", False), ("mode accuracy (caught)", "mode_accuracy", False),
    ]  # fmt: skip
    out = [f"{'':38}" + "".join(f"{n:>12}" for n in names)]
    for label, key, pct in rows:
        out.append(f"{label:38}" + "".join(f"{_fmt(s[n].get(key), pct):>12}" for n in names))
    modes = sorted({m for n in names for m in s[n]["recall_by_mode"]}, key=FAILURE_MODES.index)
    for mode in modes:
        cells = []
        for n in names:
            r = s[n]["recall_by_mode"].get(mode)
            cells.append(f"{r['caught']}/{r['failures']}" if r else "-")
        out.append(f"{'recall ' + mode:38}" + "".join(f"{c:>12}" for c in cells))
    d = report["data"]
    out.append(f"data: {d.get('name', '')} {d['records']:,} records, {d['gpu_days']} GPU-days, "
               f"{d['failures']} failures; horizon {d['horizon_s']:.0f} s, episodes merge within {d['merge_gap_s']:.0f} s")  # fmt: skip
    return "\n".join(out)


def evaluate_dir(
    data_dir: Path, artifact: ModelArtifact, gbdt: GbdtBaseline | None, rescore_interval_s: float,
    merge_gap_s: float, device: str = "cpu",
) -> dict[str, Any]:  # fmt: skip
    """Score `data_dir` with the model and the baselines and build the report."""
    others: dict[str, BatchScorer] = {"threshold": ThresholdRules(artifact)}
    if gbdt is not None:
        others["gbdt"] = gbdt
    table, stats = collect(data_dir, Scorer(artifact, device=device), others, rescore_interval_s)
    lab = join_labels(table, Failures.load(data_dir / "labels.jsonl"), artifact.horizon_s)
    thresholds = {"lstm": artifact.threshold, "threshold": 0.5}
    records = {"lstm": artifact.alarm_records}  # the rules carry their own `for:` durations
    if gbdt is not None:
        thresholds["gbdt"] = gbdt.threshold
        records["gbdt"] = gbdt.alarm_records
    meta = {"name": data_dir.name, "path": str(data_dir), "model": artifact.version,
            "rescore_interval_s": rescore_interval_s, **stats}  # fmt: skip
    meta_file = data_dir / "meta.json"
    if meta_file.exists():
        sim = orjson.loads(meta_file.read_bytes())
        meta["simulator"] = {
            "seed": sim.get("seed"),
            "config": sim.get("config"),
            "failures": sim.get("failures"),
        }
    return build_report(lab, thresholds, merge_gap_s, meta, records)


def eval_command(args: argparse.Namespace) -> int:
    artifact = load_artifact(args.model or None)
    gbdt = None
    gbdt_path = Path(args.gbdt) if args.gbdt else _sibling_gbdt(args.model)
    if gbdt_path is not None and gbdt_path.exists():
        gbdt = GbdtBaseline.load(gbdt_path, artifact)
    else:
        print(f"gpuwatch eval: no GBDT baseline at {gbdt_path} (pass --gbdt; `gpuwatch train` writes one); "
              "reporting the threshold baseline only", file=sys.stderr)  # fmt: skip
    reports = []
    for d in args.data:
        report = evaluate_dir(Path(d), artifact, gbdt, args.rescore_interval, args.merge_gap, args.device)
        print(format_report(report))
        reports.append(report)
    out = reports[0] if len(reports) == 1 else {**reports[0], "datasets": reports}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(
            orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
        print(f"wrote {args.json}")
    return 0


def _sibling_gbdt(model: str | None) -> Path | None:
    """The baseline `gpuwatch train --out X.pt` wrote next to X.pt, if a model path was given."""
    return Path(model).with_suffix(".gbdt.txt") if model else None
