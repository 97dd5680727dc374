"""The federated figure: several models on several sites' held-out recordings, per site and pooled.

`python -m gpuwatch.training.federated_compare --model NAME=MODEL.pt ... --site NAME=DIR ... --json OUT.json`

Each model scores each held-out recording as `gpuwatch eval` does (`eval_cli.collect`: the stream's processor, the
model's own operating points, risk stated at the recording's failure rate), and `evaluate.scorer_report` gives the
event-level F1 at the model's alarm operating point and the event-level PR-AUC; "pooled" joins the sites' labelled
records (`concat_labelled`) and reports the same figures over all of them. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from gpuwatch.config import Settings
from gpuwatch.sinks.policy import PolicyRules
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import operating_points
from gpuwatch.training.eval_cli import collect, fleet_failure_rate
from gpuwatch.training.evaluate import Labelled, concat_labelled, join_labels, scorer_report
from gpuwatch.training.recording import open_recording

FIGURES = ("f1", "pr_auc", "precision", "recall", "record_pr_auc", "false_alarms_per_1000_gpu_days")


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} {v!r}: give NAME=PATH")
        out[name] = path
    return out


def compare(models: dict[str, str], sites: dict[str, str], rescore_interval_s: float, merge_gap_s: float) -> dict[str, Any]:
    """{model: {site or "pooled": figures}} and the held-out data's sizes."""
    settings = Settings()
    recordings = {name: open_recording(path) for name, path in sites.items()}
    out: dict[str, Any] = {"models": {}, "sites": {}}
    for name, rec in recordings.items():
        meta = rec.meta()
        out["sites"][name] = {"path": sites[name], "failures_per_gpu_day": fleet_failure_rate(rec),
                              "hosts": len(meta.get("hosts", [])), "hardware": meta.get("config", {}).get("hardware")}  # fmt: skip
    for model_name, path in models.items():
        artifact = load_artifact(path)
        alarm, drain = operating_points(artifact, settings)
        labs: dict[str, Labelled] = {}
        for site, rec in recordings.items():
            t0 = time.time()
            got = collect(rec, Scorer(artifact, device="cpu"), {}, rescore_interval_s,
                          failures_per_gpu_day=fleet_failure_rate(rec),
                          rules=PolicyRules.from_settings(settings, fleet_guards=False), alarm_op=alarm, drain_op=drain)  # fmt: skip
            labs[site] = join_labels(got.table, rec.failures(), artifact.horizon_s)
            print(f"{model_name} on {site}: scored in {time.time() - t0:.0f} s", file=sys.stderr)
        labs["pooled"] = concat_labelled(list(labs.values()))
        figures = {}
        for site, lab in labs.items():
            r = scorer_report(lab, "lstm", alarm.threshold, merge_gap_s, alarm.records, alarm.for_s, alarm.bridge_s)
            figures[site] = {k: r[k] for k in FIGURES} | {
                "failures_with_precursor": r["failures_with_precursor"], "caught_with_precursor": r["caught_with_precursor"],
                "records": int(len(lab.ts)), "gpu_days": round(lab.gpu_days, 2),
            }  # fmt: skip
        out["models"][model_name] = {"path": path, "version": artifact.version, "threshold": alarm.threshold,
                                     "alarm_for_s": alarm.for_s, "alarm_bridge_s": alarm.bridge_s,
                                     "figures": figures}  # fmt: skip
    return out


def table(result: dict[str, Any]) -> str:
    cols = [*result["sites"], "pooled"]
    lines = [f"{'model':<14}" + "".join(f"{c + ' F1':>14}{c + ' PR-AUC':>16}" for c in cols)]
    for name, m in result["models"].items():
        lines.append(f"{name:<14}" + "".join(f"{m['figures'][c]['f1']:>14.3f}{m['figures'][c]['pr_auc']:>16.3f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gpuwatch.training.federated_compare")
    p.add_argument("--model", action="append", required=True, help="NAME=MODEL.pt (repeatable)")
    p.add_argument("--site", action="append", required=True, help="NAME=held-out recording (repeatable)")
    p.add_argument("--rescore-interval", type=float, default=30.0)
    p.add_argument("--merge-gap", type=float, default=600.0)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    result = compare(_pairs(args.model, "--model"), _pairs(args.site, "--site"), args.rescore_interval, args.merge_gap)
    print(table(result))
    Path(args.json).write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
