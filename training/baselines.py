"""Baselines scored on the same windows as the LSTM: static threshold rules and gradient-boosted trees.

Both are drop-in scorers for `RiskProcessor` (they expose `artifact`, `version` and `score(seqs)`), so
they see exactly the sequences the LSTM sees, at the same scoring times.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.streams.model import ModelArtifact
from gpuwatch.streams.window import FEATURE_NAMES
from gpuwatch.training.dataset import SequenceSet

_I = {name: i for i, name in enumerate(FEATURE_NAMES)}
_MODE = {m: i for i, m in enumerate(FAILURE_MODES)}


@dataclass(frozen=True)
class Rule:
    """One alert rule: its name, the Prometheus/DCGM expression it mirrors, and the mode it points to."""

    name: str
    promql: str
    mode: str


# Written the way a DCGM-exporter alert would be, with common community thresholds, not tuned on data.
RULES: tuple[Rule, ...] = (
    Rule("gpu_hot", "min_over_time(DCGM_FI_DEV_GPU_TEMP[5m]) >= 85", "thermal"),
    Rule("hw_thermal_slowdown", "DCGM_FI_DEV_CLOCK_THROTTLE_REASONS & HW_THERMAL != 0", "thermal"),
    Rule("sbe_rate", "increase(DCGM_FI_DEV_ECC_SBE_VOL_TOTAL[1h]) > 10", "memory"),
    Rule("dbe", "increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL[10m]) > 0", "memory"),
    Rule("row_remap", "DCGM_FI_DEV_ROW_REMAP_PENDING == 1 or DCGM_FI_DEV_ROW_REMAP_FAILURE == 1", "memory"),
    Rule("xid", "changes(DCGM_FI_DEV_XID_ERRORS[5m]) > 0", "sudden"),
    Rule("pcie_replay", "increase(DCGM_FI_DEV_PCIE_REPLAY_COUNTER[10m]) > 10", "interconnect"),
    Rule("nvlink_crc", "increase(DCGM_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL[10m]) > 10", "interconnect"),
    Rule("pcie_width_low", "DCGM_FI_DEV_PCIE_LINK_WIDTH < DCGM_FI_DEV_PCIE_MAX_LINK_WIDTH", "interconnect"),
    Rule("power_brake", "count_over_time((THROTTLE_REASONS & HW_POWER_BRAKE != 0)[1m]) >= 2", "power"),
)


def _per_min(seqs: np.ndarray, name: str) -> np.ndarray:
    """Undo the window's log1p on a rate EWMA (events per minute) of the current row."""
    return np.expm1(np.maximum(seqs[:, -1, _I[name]].astype(np.float64), 0.0))


def rule_hits(seqs: np.ndarray) -> np.ndarray:
    """(B, len(RULES)) bool: which rule fires on each sequence (rows 30 s apart, the last one current)."""
    cur = seqs[:, -1]
    hot_rows = seqs[:, -11:, _I["temp"]] >= 85.0 / 100.0  # 85 °C (the feature is temp / 100); 11 rows span 5 min
    last_min = seqs[:, -3:, :]  # the current row and the two before it (1 minute)
    xid_5m = cur[:, _I["log_min_since_xid"]] <= np.log1p(5.0) / 7.0
    hits = [
        hot_rows.all(axis=1),
        cur[:, _I["thr_hw_thermal"]] > 0.5,
        _per_min(seqs, "sbe_ewma_3600s") * 60.0 > 10.0,
        _per_min(seqs, "dbe_ewma_600s") * 10.0 > 0.05,
        (cur[:, _I["remap_pending"]] > 0.5) | (cur[:, _I["remap_failure"]] > 0.5),
        xid_5m,
        _per_min(seqs, "pcie_ewma_600s") * 10.0 > 10.0,
        _per_min(seqs, "nvlink_ewma_600s") * 10.0 > 10.0,
        cur[:, _I["pcie_width_ratio"]] < 0.99,
        (last_min[:, :, _I["thr_hw_power_brake"]] > 0.5).sum(axis=1) >= 2,
    ]
    return np.stack(hits, axis=1)


class ThresholdRules:
    """Static alert rules as a scorer: risk 1.0 when any rule fires, else 0.0; mode of the first rule firing."""

    version = "threshold-rules"

    def __init__(self, artifact: ModelArtifact) -> None:
        self.artifact = artifact  # window and horizon of the model they are compared with
        self._modes = np.array([_MODE[r.mode] for r in RULES])

    def score(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        hits = rule_hits(seqs)
        any_hit = hits.any(axis=1)
        mode = np.where(any_hit, self._modes[np.argmax(hits, axis=1)], 0)
        return any_hit.astype(np.float64), mode.astype(np.int64)


# ------------------------------------------------------------------ gradient-boosted trees


def tabular(seqs: np.ndarray) -> np.ndarray:
    """Window -> one row: current features, change over 5 min and over the window, max over the window."""
    x = seqs.astype(np.float32, copy=False)
    cur = x[:, -1]
    return np.concatenate([cur, cur - x[:, -11], cur - x[:, 0], x.max(axis=1)], axis=1)


def tabular_names() -> list[str]:
    return [f"{p}{n}" for p in ("", "d5m_", "dwin_", "max_") for n in FEATURE_NAMES]


@dataclass
class GbdtConfig:
    rounds: int = 400
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 40
    feature_fraction: float = 0.7
    bagging_fraction: float = 0.8
    threads: int = 2
    seed: int = 0


class GbdtBaseline:
    """LightGBM on `tabular` window features, Platt-calibrated; a scorer like the LSTM's (risk only, no mode)."""

    predicts_mode = False

    def __init__(self, booster: object, artifact: ModelArtifact, platt: tuple[float, float] = (1.0, 0.0),
                 threshold: float = 0.5, alarm_records: int = 1) -> None:  # fmt: skip
        self.booster = booster
        self.alarm_records = alarm_records  # as ModelArtifact.alarm_records, chosen the same way
        self.artifact = artifact
        self.platt = platt  # calibrated risk = sigmoid(a * raw + b)
        self.threshold = threshold
        self.version = "gbdt-baseline"

    def logits(self, seqs: np.ndarray) -> np.ndarray:
        return np.asarray(self.booster.predict(tabular(seqs), raw_score=True), dtype=np.float64)

    def score(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(seqs) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        a, b = self.platt
        risk = 1.0 / (1.0 + np.exp(-(a * self.logits(seqs) + b)))
        return risk, np.zeros(len(seqs), dtype=np.int64)

    @classmethod
    def fit(
        cls, data: SequenceSet, train_idx: np.ndarray, val_idx: np.ndarray, artifact: ModelArtifact,
        config: GbdtConfig | None = None,
    ) -> GbdtBaseline:  # fmt: skip
        """Train on `train_idx` with early stopping on `val_idx` (same split, rows and weights as the LSTM).

        Like the LSTM, it learns from positives with a visible precursor only and is calibrated on all rows.
        """
        import lightgbm as lgb

        from gpuwatch.training.train import fit_platt

        c = config or GbdtConfig()
        invisible = (data.y == 1) & ~data.precursor
        train_idx = train_idx[~invisible[train_idx]]
        stop_idx = val_idx[~invisible[val_idx]]
        xt = tabular(data.x[train_idx])
        xs = tabular(data.x[stop_idx])
        params = {
            "objective": "binary", "learning_rate": c.learning_rate, "num_leaves": c.num_leaves,
            "min_data_in_leaf": c.min_data_in_leaf, "feature_fraction": c.feature_fraction,
            "bagging_fraction": c.bagging_fraction, "bagging_freq": 1, "num_threads": c.threads,
            "seed": c.seed, "verbose": -1, "deterministic": True,
        }  # fmt: skip
        dtrain = lgb.Dataset(xt, data.y[train_idx], weight=data.weight[train_idx], free_raw_data=True)
        dval = lgb.Dataset(xs, data.y[stop_idx], weight=data.weight[stop_idx], reference=dtrain)
        booster = lgb.train(
            params, dtrain, num_boost_round=c.rounds, valid_sets=[dval],
            callbacks=[lgb.early_stopping(40, verbose=False), lgb.log_evaluation(0)],
        )  # fmt: skip
        print(f"gbdt baseline: {booster.best_iteration} trees", file=sys.stderr)
        raw = np.asarray(booster.predict(tabular(data.x[val_idx]), raw_score=True), dtype=np.float64)
        return cls(booster, artifact, fit_platt(raw, data.y[val_idx], data.weight[val_idx]))

    def save(self, path: str | Path) -> None:
        """Writes the booster (LightGBM text) to `path` and its calibration to `path` + '.json'."""
        path = Path(path)
        self.booster.save_model(str(path), num_iteration=self.booster.best_iteration or None)
        meta = {"platt": list(self.platt), "threshold": self.threshold, "alarm_records": self.alarm_records,
                "features": "tabular/1",
                "window_features": len(FEATURE_NAMES)}  # fmt: skip
        Path(f"{path}.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, path: str | Path, artifact: ModelArtifact) -> GbdtBaseline:
        import lightgbm as lgb

        path = Path(path)
        meta_path = Path(f"{path}.json")
        if not path.exists() or not meta_path.exists():
            raise FileNotFoundError(
                f"GBDT baseline {path} (and {meta_path}) not found; `gpuwatch train` writes them"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("window_features") != len(FEATURE_NAMES):
            raise ValueError(
                f"GBDT baseline {path} was trained on another feature set; retrain with `gpuwatch train`"
            )
        booster = lgb.Booster(model_file=str(path))
        a, b = meta["platt"]
        return cls(booster, artifact, (float(a), float(b)), float(meta["threshold"]),
                   int(meta.get("alarm_records", 1)))  # fmt: skip
