"""`gpuwatch eval`: score held-out recordings with the model and both baselines, replay the remediation
policy on them, report and write JSON.

All three scorers see the same windows at the same scoring times: the model runs inside the stream's
`RiskProcessor` (so its records are exactly what `gpuwatch score` writes) and the baselines score the
very windows it scores, right after it. The model's records, with the alarm and drain calls the stream
made at the model's operating points, go through the real `RemediationPolicy` with production defaults
on the recording's clock, as do the threshold rules' alarms (a rule-based product checkpoints and drains
on any rule); `training/actions.py` scores the events the policies emitted.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
import numpy as np
import orjson
import torch

from gpuwatch.config import Settings
from gpuwatch.costs import CostModel
from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.sinks.policy import PolicyRules, RemediationPolicy
from gpuwatch.streams.model import ModelArtifact, ModelError, Scorer, load_artifact
from gpuwatch.streams.operating_point import OperatingPoint
from gpuwatch.streams.processor import BatchResult, RiskProcessor, operating_points
from gpuwatch.training.actions import action_report
from gpuwatch.training.baselines import RULES, GbdtBaseline, ThresholdRules
from gpuwatch.training.dataset import DeadLetterCount, RecordingError
from gpuwatch.training.evaluate import AT_RISK, Labelled, RiskTable, join_labels, scorer_report
from gpuwatch.training.recording import Recording, open_recording
from gpuwatch.training.score import observe_in_time, replay_messages

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


@dataclass
class Collected:
    """What one replay produced: every scorer's risk per record (failed GPUs' records left out: they are not
    predictions), run stats, and the remediation events each replayed policy emitted."""

    table: RiskTable
    stats: dict[str, Any]
    events: dict[str, list[dict[str, Any]]]


def as_recording(data: Path | str | Recording) -> Recording:
    """`data` as a Recording (a simulate folder or an archive location)."""
    return data if isinstance(data, Recording) else open_recording(data)


def collect(
    data_dir: Path | Recording, primary: Scorer, others: dict[str, BatchScorer], rescore_interval_s: float,
    primary_name: str = "lstm", failures_per_gpu_day: float | None = None, rules: PolicyRules | None = None,
    alarm_op: OperatingPoint | None = None, drain_op: OperatingPoint | None = None,
) -> Collected:  # fmt: skip
    """Replay the recording's samples like the stream, and its risk records through the policy like the sinks.

    `failures_per_gpu_day`: the fleet's own failure rate, at which the records' `risk` is stated (None: the
    model's calibration base rate). `rules`: the policy's rules (default: production defaults)."""
    if primary.device.type == "cpu":
        # One thread, as the stream worker and `gpuwatch score`: batches of a few hundred GPUs are too small to
        # share, and a second thread spinning on a busy machine made this replay five times slower.
        torch.set_num_threads(1)
    recording = as_recording(data_dir)
    processor = TeeProcessor(primary, others, rescore_interval_s=rescore_interval_s, stage="eval",
                             failures_per_gpu_day=failures_per_gpu_day, alarm_op=alarm_op, drain_op=drain_op)  # fmt: skip
    policies = {primary_name: RemediationPolicy(rules)}
    if "threshold" in others:
        policies["threshold"] = RemediationPolicy(rules)
    events: dict[str, list[dict[str, Any]]] = {name: [] for name in policies}
    uuid: list[str] = []
    ts: list[float] = []
    score: list[float] = []
    risk: list[float] = []
    mode: list[int] = []
    keep: list[np.ndarray] = []
    samples = 0
    dead = DeadLetterCount()
    t0 = time.time()
    last = 0.0
    done = {name: 0 for name in others}
    for result in replay_messages(recording.messages(), recording.source, processor):
        samples += result.samples
        dead.add(result.deadletters)
        recs = [decode_risk(value) for _, value in result.risk]
        live = np.array([not r.failed for r in recs], dtype=bool)
        keep.append(live)
        for rec in (r for r, ok in zip(recs, live) if ok):
            uuid.append(rec.uuid)
            ts.append(rec.ts)
            score.append(rec.risk if rec.score is msgspec.UNSET else rec.score)  # records of a live GPU carry their score
            risk.append(rec.risk)
            mode.append(_MODE_INDEX[rec.mode])
        if recs:
            # the events as their JSON objects: the evaluation reads them like a recorded remediation topic
            events[primary_name] += map(msgspec.to_builtins, observe_in_time(policies[primary_name], recs))
            if "threshold" in policies:
                rule = np.concatenate(processor.risk["threshold"][done["threshold"]:])
                done["threshold"] = len(processor.risk["threshold"])
                alarms = [msgspec.structs.replace(r, alarm=bool(a) and not r.failed, drain=bool(a) and not r.failed,
                                                  op="rules") for r, a in zip(recs, rule >= 0.5)]  # fmt: skip
                events["threshold"] += map(msgspec.to_builtins, observe_in_time(policies["threshold"], alarms))
        if time.time() - last >= 5.0:
            last = time.time()
            sys.stderr.write(f"\rscoring {recording.name}: {samples:,} GPU-samples, {len(ts):,} risk records "
                             f"({samples / max(last - t0, 1e-9):,.0f}/s)")  # fmt: skip
            sys.stderr.flush()
    sys.stderr.write("\n")
    if dead.lines:
        sys.stderr.write(f"{recording.source}: {dead.describe()}\n")
    live_rows = np.concatenate(keep) if keep else np.zeros(0, dtype=bool)
    # The score is what the operating points compare (as in the stream); where the records state risk at the
    # fleet's own rate, that is a second column for the record-level and calibration figures.
    risks = {primary_name: np.asarray(score)}
    if failures_per_gpu_day is not None:
        risks[primary_name + AT_RISK] = np.asarray(risk)
    modes = {primary_name: np.asarray(mode)}
    for name in others:
        risks[name] = (np.concatenate(processor.risk[name]) if processor.risk[name] else np.zeros(0))[live_rows]
        if getattr(others[name], "predicts_mode", True):
            modes[name] = (
                np.concatenate(processor.mode[name]) if processor.mode[name] else np.zeros(0, dtype=np.int64)
            )[live_rows]
    stats = {"gpu_samples": samples, "risk_records": len(ts), "failed_records": int((~live_rows).sum()),
             "deadletters": dead.as_dict(), "seconds": round(time.time() - t0, 1)}  # fmt: skip
    return Collected(RiskTable.from_columns(uuid, np.asarray(ts), risks, modes), stats, events)


def collect_cached(
    data_dir: Path | Recording, primary: Scorer, others: dict[str, BatchScorer], rescore_interval_s: float
) -> RiskTable:
    """`collect(...).table`, kept in DATA_DIR/.gpuwatch/ under a key of the model's weights and calibration, the
    baselines and the cadence: choosing operating points again for the same weights (other costs, another rule)
    does not score the validation fleets again."""
    import hashlib

    a = primary.artifact
    rec = as_recording(data_dir)
    if rec.cache_dir is None:
        return collect(rec, primary, others, rescore_interval_s).table
    key = hashlib.sha256(orjson.dumps([a.version, a.temperature, a.calibration_map, rescore_interval_s,
                                       sorted(others), rec.fingerprint()],
                                      option=orjson.OPT_SERIALIZE_NUMPY)).hexdigest()[:16]  # fmt: skip
    cache = rec.cache_dir / f"scores-{key}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        uuids = z["uuids"].tolist()
        gpu = z["gpu"]
        risk = {k[5:]: z[k] for k in z.files if k.startswith("risk_")}
        mode = {k[5:]: z[k] for k in z.files if k.startswith("mode_")}
        return RiskTable(uuids=uuids, gpu=gpu, ts=z["ts"], risk=risk, mode=mode)
    table = collect(rec, primary, others, rescore_interval_s).table
    try:
        cache.parent.mkdir(exist_ok=True)
        arrays = {"uuids": np.array(table.uuids), "gpu": table.gpu, "ts": table.ts}
        arrays |= {f"risk_{k}": v for k, v in table.risk.items()} | {f"mode_{k}": v for k, v in table.mode.items()}
        np.savez(cache.with_suffix(".tmp.npz"), **arrays)
        cache.with_suffix(".tmp.npz").replace(cache)
    except OSError as exc:  # a read-only data dir: no cache, nothing lost
        sys.stderr.write(f"not caching the scores of {rec.source} ({exc})\n")
    return table


def build_report(
    lab: Labelled, thresholds: dict[str, float], merge_gap_s: float, meta: dict[str, Any],
    alarm_records: dict[str, int] | None = None, alarm_for_s: dict[str, float] | None = None,
    alarm_bridge_s: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The eval JSON: the model's figures at the top level, every scorer's under `scorers`."""
    records, held, bridged = alarm_records or {}, alarm_for_s or {}, alarm_bridge_s or {}
    scorers = {name: scorer_report(lab, name, thr, merge_gap_s, records.get(name, 1), held.get(name, 0.0),
                                   bridged.get(name, 0.0))
               for name, thr in thresholds.items()}  # fmt: skip
    m = scorers["lstm"]
    report: dict[str, Any] = {
        "pr_auc": m["pr_auc"], "precision": m["precision"], "recall": m["recall"], "f1": m["f1"],
        "median_lead_min": m["median_lead_min"], "p10_lead_min": m["p10_lead_min"], "ece": m["ece"],
        "brier": m["brier"], "false_alarms_per_1000_gpu_days": m["false_alarms_per_1000_gpu_days"],
        "recall_by_mode": m["recall_by_mode"], "threshold": m["threshold"], "alarm_records": m["alarm_records"],
        "alarm_for_s": m["alarm_for_s"], "alarm_bridge_s": m["alarm_bridge_s"],
        "baseline_threshold_f1": scorers["threshold"]["f1"] if "threshold" in scorers else None,
        "baseline_gbdt_f1": scorers["gbdt"]["f1"] if "gbdt" in scorers else None,
    }  # fmt: skip
    report["definitions"] = {
        "pr_auc": "event level: area under precision (alarm episodes followed by a failure within the horizon) "
        "vs recall (failures with precursors caught), over thresholds",
        "record_pr_auc": "record level: average precision of each risk record for 'fails within the horizon', "
        "sudden failures and not-yet-visible precursors included",
        "alarm": "a risk record at or above the operating threshold, as are the alarm_records - 1 records of "
        "its GPU before it and every record of its GPU in the alarm_for_s seconds before it (consecutive "
        "scorings, like a Prometheus `for:`; chosen on validation data), where a record below it counts as at "
        "or above it when its GPU had one at or above it at most alarm_bridge_s seconds before",
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
        ("alarm: held for (s)", "alarm_for_s", False), ("PR-AUC (event)", "pr_auc", False),
        ("precision (episodes)", "precision", False), ("recall (precursor failures)", "recall", False),
        ("F1", "f1", False), ("recall (all failures)", "recall_all", False),
        ("false alarms / 1000 GPU-days", "false_alarms_per_1000_gpu_days", False),
        ("false alarms in a running precursor", "false_alarms_in_precursor", False),
        ("precision, early alarms counted right", "precision_counting_early_alarms", False),
        ("median lead (min)", "median_lead_min", False), ("p10 lead (min)", "p10_lead_min", False),
        ("lead ceiling: median precursor (min)", "ceiling_median_lead_min", False),
        ("PR-AUC (records)", "record_pr_auc", False), ("PR-AUC (records, visible)", "record_pr_auc_visible", False),
        ("Brier", "brier", False), ("ECE", "ece", False),
        ("calibration: worst bin above 0.5", "calibration_max_gap_above_half", False),
        ("mode accuracy (caught)", "mode_accuracy", False),
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
    if d.get("deadletters", {}).get("lines"):
        out.append(f"samples: {DeadLetterCount(**d['deadletters']).describe()}")
    return "\n".join(out)


def fleet_failure_rate(data_dir: Path | Recording) -> float | None:
    """Failures per GPU-day the simulator was set to for this recording (meta.json), or None if unknown."""
    config = as_recording(data_dir).meta().get("config") or {}
    base, scale = config.get("rate_per_gpu_day"), config.get("rate_scale")
    return float(base) * float(scale) if base is not None and scale is not None else None


def lookalike_gpus(data_dir: Path | Recording) -> set[str] | None:
    """uuids of the GPUs the simulator gave a benign look-alike (meta.json `lookalike_gpus`), if it recorded them."""
    found = as_recording(data_dir).meta().get("lookalike_gpus")
    return None if found is None else set(found)


def evaluate_dir(
    data_dir: Path | Recording, artifact: ModelArtifact, gbdt: GbdtBaseline | None, rescore_interval_s: float,
    merge_gap_s: float, device: str = "cpu", settings: Settings | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Score `data_dir` with the model and the baselines, replay the policy, and build the report.

    `settings` supplies what production would run with: operating point overrides, the policy's rules, the
    cost model and the real fleet's failure rate (defaults when None)."""
    settings = settings or Settings()
    data_dir = as_recording(data_dir)
    others: dict[str, BatchScorer] = {"threshold": ThresholdRules(artifact)}
    if gbdt is not None:
        others["gbdt"] = gbdt
    alarm_op, drain_op = operating_points(artifact, settings)
    own_rate = fleet_failure_rate(data_dir)
    got = collect(data_dir, Scorer(artifact, device=device), others, rescore_interval_s,
                  failures_per_gpu_day=own_rate, rules=PolicyRules.from_settings(settings, fleet_guards=False),
                  alarm_op=alarm_op, drain_op=drain_op)  # fmt: skip
    lab = join_labels(got.table, data_dir.failures(), artifact.horizon_s)
    thresholds = {"lstm": alarm_op.threshold, "threshold": 0.5}
    records = {"lstm": alarm_op.records}  # the rules carry their own `for:` durations
    held = {"lstm": alarm_op.for_s}
    bridged = {"lstm": alarm_op.bridge_s}
    if gbdt is not None:
        thresholds["gbdt"] = gbdt.threshold
        records["gbdt"] = gbdt.alarm_records
    meta = {"name": data_dir.name, "path": data_dir.location, "model": artifact.version, "operating_point": alarm_op.name,
            "drain_operating_point": drain_op.name if drain_op else None,
            "risk_stated_at_failures_per_gpu_day": own_rate, "rescore_interval_s": rescore_interval_s,
            **got.stats}  # fmt: skip
    sim = data_dir.meta()
    if sim:
        meta["simulator"] = {
            "seed": sim.get("seed"),
            "config": sim.get("config"),
            "failures": sim.get("failures"),
        }
    report = build_report(lab, thresholds, merge_gap_s, meta, records, held, bridged)
    costs = CostModel.from_settings(settings)
    look = lookalike_gpus(data_dir)
    report["system"] = {
        name: action_report(events, lab, got.table.uuids, costs,
                            real_failures_per_gpu_day=settings.fleet_failure_rate_per_gpu_day, lookalike=look)
        for name, events in got.events.items()
    }  # fmt: skip
    report["system_definitions"] = {
        "policy": "the real RemediationPolicy with the settings' rules (production defaults unless a config "
        "file changes them) but its fleet-level guard rails (breaker, escalation, incident, pools, maintenance) "
        "off, as simulated fleets fail far more often than real ones, fed the records on the recording's clock; "
        "'threshold' is a rule-based product "
        "that checkpoints and drains on any static rule",
        "true": "the GPU failed within the horizon after the action",
        "after_failure": "the GPU was down (failed, not yet repaired): a ladder action there acts on the dead",
        "early": "the precursor of the GPU's next failure was running, more than the horizon before it",
        "look-alike / plain": "a healthy GPU: with a benign look-alike the simulator recorded, or without",
        "net_gpu_h": "GPU-hours the first checkpoint and migration before each failure saved, less every "
        "action's cost (gpuwatch/costs.py, the settings' cost model); 'real' restates the per-failure part at "
        "the real fleet's failure rate and keeps the per-healthy-GPU-day part",
        "oracle": "every failure with a precursor checkpointed 30 min and migrated 29 min before it, no false action",
    }
    return report


def eval_command(
    args: argparse.Namespace,
    settings: Settings | None = None,
    render: Callable[[dict[str, Any]], Path] | None = None,
) -> int:
    """Score and evaluate each `--data` recording; `render`, if given, turns the result into a report file."""
    settings = settings or Settings()
    try:
        artifact = load_artifact(args.model or None)
    except ModelError as exc:
        print(f"gpuwatch eval: {exc}", file=sys.stderr)
        return 2
    recordings = []
    for d in args.data:
        try:
            recordings.append(open_recording(d))
            recordings[-1].failures()  # now, not after an hour of scoring
        except RecordingError as exc:
            print(f"gpuwatch eval: {exc}", file=sys.stderr)
            return 2
    gbdt = None
    gbdt_path = Path(args.gbdt) if args.gbdt else _sibling_gbdt(args.model)
    if gbdt_path is not None and gbdt_path.exists():
        import lightgbm as lgb

        try:
            gbdt = GbdtBaseline.load(gbdt_path, artifact)
        except (OSError, ValueError, KeyError, lgb.basic.LightGBMError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            print(f"gpuwatch eval: cannot read the GBDT baseline {gbdt_path} ({first[:200]}); pass --gbdt with a "
                  "file `gpuwatch train` wrote (and its .json)", file=sys.stderr)  # fmt: skip
            return 2
    else:
        print(f"gpuwatch eval: no GBDT baseline at {gbdt_path} (pass --gbdt; `gpuwatch train` writes one); "
              "reporting the threshold baseline only", file=sys.stderr)  # fmt: skip
    intervals = [d.typical_interval_s() for d in recordings]
    for d, interval in zip(recordings, intervals):
        if note := artifact.slow_sampling_note(d.name, interval):
            print(f"gpuwatch eval: warning: {note}", file=sys.stderr)
    reports = []
    for d, interval in zip(recordings, intervals):
        report = evaluate_dir(d, artifact, gbdt, args.rescore_interval, args.merge_gap, args.device, settings)
        report["sampling"] = {"interval_s": interval, "validated_intervals_s": artifact.metrics.get("validated_intervals_s"),
                              "slower_than_validated": artifact.sampled_slower_than_validated(interval)}  # fmt: skip
        print(format_report(report))
        print(format_system(report))
        reports.append(report)
    out = reports[0] if len(reports) == 1 else {**reports[0], "datasets": reports}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_bytes(
            orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
        )
        print(f"wrote {args.json}")
    if render is not None:
        print(f"wrote {render(out)}")
    return 0


def format_system(report: dict[str, Any]) -> str:
    """A plain-text table of what each replayed policy did: per action, and the net GPU-hours."""
    out = []
    for name, sysrep in report.get("system", {}).items():
        out.append(f"policy replay ({name}): {sysrep['failures_with_precursor']} failures with a precursor, "
                   f"{sysrep['gpu_days']:.1f} GPU-days")  # fmt: skip
        out.append(f"  {'action':<11}{'events':>8}{'recall':>8}{'med lead':>10}{'false/1000d':>13}"
                   f"{'(95% up)':>10}{'early':>7}{'after fail':>11}")  # fmt: skip
        for action, a in sysrep["actions"].items():
            if action == "repair":
                out.append(f"  {action:<11}{a['events']:>8}   repairs of failures {a['repairs_of_failures']}, "
                           f"not after a failure {a['repairs_not_after_a_failure']}")  # fmt: skip
                continue
            out.append(f"  {action:<11}{a['events']:>8}{a['recall']:>8.3f}{_fmt(a['median_lead_min']):>10}"
                       f"{a['false_healthy_per_1000_gpu_days']:>13.2f}{a['false_healthy_per_1000_gpu_days_upper95']:>10.2f}"
                       f"{a['false_by_cause']['early']:>7}{a['after_failure']:>11}")  # fmt: skip
        v = sysrep["value"]
        out.append(f"  net GPU-h per 1000 GPU-days: {v['net_gpu_h_per_1000_gpu_days_fleet']:,.0f} on this fleet "
                   f"(oracle {v['oracle_gpu_h_per_1000_gpu_days_fleet']:,.0f}); at the real failure rate "
                   f"{v['net_gpu_h_per_1000_gpu_days_real']:,.1f} (oracle {v['oracle_gpu_h_per_1000_gpu_days_real']:,.1f})")  # fmt: skip
    return "\n".join(out)


def _sibling_gbdt(model: str | None) -> Path | None:
    """The baseline `gpuwatch train --out X.pt` wrote next to X.pt, if a model path was given."""
    return Path(model).with_suffix(".gbdt.txt") if model else None
