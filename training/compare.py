"""Champion versus challenger on live risk records: the figures `gpuwatch eval` reports, per model, over the
records both scored since the challenger started and the failure labels known now (`gpuwatch model compare`).

Records are grouped by the model they name (a promote swaps which topic each model writes to; the records keep
naming their model). Each model's alarms are replayed at the operating point its records name (`op`), on the
calibrated `score` those operating points compare, exactly as `gpuwatch eval` does with `training.evaluate`;
Brier, ECE and the reliability bins use `risk`, the probability at the fleet's failure rate the records state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.schemas.records import Risk
from gpuwatch.streams.operating_point import OperatingPoint
from gpuwatch.training.dataset import Failures
from gpuwatch.training.evaluate import AT_RISK, RiskTable, join_labels, scorer_report

_MODE_INDEX = {m: i for i, m in enumerate(FAILURE_MODES)}


@dataclass
class _Columns:
    uuid: list[str] = field(default_factory=list)
    ts: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    risk: list[float] = field(default_factory=list)
    mode: list[int] = field(default_factory=list)
    ops: Counter = field(default_factory=Counter)
    horizon: Counter = field(default_factory=Counter)
    failed: int = 0


def by_model(records: Iterable[Risk], since: float) -> dict[str, _Columns]:
    """Each model's records scored at or after `since` (`scored_at`, wall time), as columns; records of failed
    GPUs are counted, not kept (they are not predictions), as in eval."""
    out: dict[str, _Columns] = {}
    for r in records:
        if r.scored_at < since:
            continue
        col = out.setdefault(r.model, _Columns())
        if r.failed or not isinstance(r.score, float):
            col.failed += 1
            continue
        col.uuid.append(r.uuid)
        col.ts.append(r.ts)
        col.score.append(r.score)
        col.risk.append(r.risk)
        col.mode.append(_MODE_INDEX[r.mode])
        col.ops[r.op] += 1
        col.horizon[r.horizon_s] += 1
    return out


def model_report(name: str, col: _Columns, failures: Failures, merge_gap_s: float) -> dict[str, Any]:
    """One model's figures: `training.evaluate.scorer_report` at the operating point its records name."""
    op_name = col.ops.most_common(1)[0][0] if col.ops else ""
    try:
        op = OperatingPoint.parse(op_name)
    except ValueError:
        op = OperatingPoint(0.5)  # records of old workers name none: a plain 0.5 threshold, said in the report
    horizon = col.horizon.most_common(1)[0][0] if col.horizon else 3600.0
    table = RiskTable.from_columns(col.uuid, np.asarray(col.ts), {name: np.asarray(col.score),
                                   name + AT_RISK: np.asarray(col.risk)}, {name: np.asarray(col.mode)})  # fmt: skip
    lab = join_labels(table, failures, horizon)
    rep = scorer_report(lab, name, op.threshold, merge_gap_s, op.records, op.for_s, op.bridge_s)
    rep["operating_point"] = op.name if op_name else f"{op.name} (the records name none)"
    rep["records"] = int(len(lab.ts))
    rep["failed_records"] = col.failed
    rep["gpu_days"] = round(lab.gpu_days, 3)
    rep["horizon_s"] = horizon
    return rep


def compare(records: Iterable[Risk], failures: Failures, since: float, merge_gap_s: float,
            roles: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """The compare report: per model (champion first, then challenger, then any other model seen) its eval
    figures, under `scorers`, as `gpuwatch eval --json` has them."""
    cols = by_model(records, since)
    order = sorted(cols, key=lambda m: (["champion", "challenger"].index(roles[m]) if m in roles else 2, m))
    scorers = {m: model_report(m, cols[m], failures, merge_gap_s) for m in order}
    first = scorers[order[0]] if order else {}
    labelled = sum(int((fail >= since).sum()) for fail, *_ in failures.by_uuid.values())
    return {
        "since": since,
        "roles": {m: roles.get(m, "other") for m in order},
        "scorers": scorers,
        "data": {"name": "live records", "records": sum(s["records"] for s in scorers.values()),
                 "gpu_days": round(sum(s["gpu_days"] for s in scorers.values()), 2),
                 "failures": labelled, "horizon_s": first.get("horizon_s", 3600.0),
                 "merge_gap_s": merge_gap_s},
    }  # fmt: skip
