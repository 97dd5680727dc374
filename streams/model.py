"""The failure model (an LSTM with risk and mode heads), its artifact format and batched scoring.

Training (`gpuwatch.training`) and serving (the stream worker, `gpuwatch score`) both load
models through `load_artifact` and score through `Scorer`: one implementation.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpuwatch.schemas.fields import FAILURE_MODES
from gpuwatch.streams.operating_point import OperatingPoint, at_prevalence, bridge_for, prevalence
from gpuwatch.streams.window import FEATURE_NAMES, WindowConfig

__all__ = ["ModelArtifact", "ModelError", "OperatingPoint", "Scorer", "at_prevalence", "load_artifact", "prevalence"]

log = logging.getLogger(__name__)

ARTIFACT_FORMAT = "gpuwatch.model/1"
# Modes the mode head chooses between; "none" is reported when risk is below `mode_min_risk`.
FAILURE_CLASSES: tuple[str, ...] = tuple(m for m in FAILURE_MODES if m != "none")
# Calibration prevalence assumed for artifacts written before it was recorded: the training fleets' failure
# rate (x5000 the trace's 1.943e-4 per GPU-day, no host frailty) over a 60-minute horizon.
_LEGACY_CALIBRATION_PREVALENCE = 1.0 - math.exp(-5000 * 1.943e-4 / 24)
# A GPU or a recording counts as sampled more slowly than the model was validated at when its interval exceeds the
# slowest validated one by this factor: a quarter more, for timers that jitter. Its alarms there are measured only on
# diagnostic fleets, and were worse (docs/model.md, "Sampling intervals").
SLOWER_THAN_VALIDATED = 1.25


class FailureLSTM(nn.Module):
    """LSTM over the feature sequence, then a small MLP with a risk logit and mode logits."""

    def __init__(self, n_features: int, hidden: int = 64, mlp: int = 32, n_modes: int = len(FAILURE_CLASSES)):
        super().__init__()
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
        self.body = nn.Sequential(nn.Linear(hidden + n_features, mlp), nn.ReLU())
        self.risk_head = nn.Linear(mlp, 1)
        self.mode_head = nn.Linear(mlp, n_modes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.lstm(x)
        return self.head(out[:, -1], x[:, -1])

    def head(self, last_out: torch.Tensor, current: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Risk logit and mode logits from the LSTM's last output and the current (normalised) row."""
        # The current row goes straight to the MLP as well: sharp present-state signals need no recurrence.
        h = self.body(torch.cat([last_out, current], dim=1))
        return self.risk_head(h).squeeze(1), self.mode_head(h)

    def step(
        self, current: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same outputs as `forward` on [past..., current], given the LSTM state after the past rows."""
        out, _ = self.lstm(current[:, None, :], (state[0][None], state[1][None]))
        return self.head(out[:, -1], current)


@dataclass
class ModelArtifact:
    """Everything needed to score: weights, feature/window config, normalisation, calibration."""

    version: str
    state_dict: dict[str, torch.Tensor]
    features: tuple[str, ...]
    window: WindowConfig
    norm_mean: np.ndarray
    norm_std: np.ndarray
    hidden: int = 64
    mlp: int = 32
    temperature: float = 1.0  # calibration: sigmoid(logit / temperature)
    threshold: float = 0.5  # alarm operating threshold on the calibrated score, chosen on validation data
    # An alarm needs this many consecutive scorings at or above the threshold (a Prometheus `for:`), chosen
    # with the threshold on validation data; 1 alarms on a single record.
    alarm_records: int = 1
    # ... and the score must hold for this many seconds of sample time (chosen the same way; 0: no minimum).
    alarm_for_s: float = 0.0
    # ... through dips below it of at most this many seconds (chosen the same way; 0: none). The bridge goes with
    # its hold: one no shorter than the hold (an artifact whose alarm_for_s was changed) is dropped (`bridge_for`).
    alarm_bridge_s: float = 0.0
    # Share of the calibration records that preceded a failure within the horizon: the base rate the
    # calibrated score is a probability at (training fleets fail thousands of times more often than real ones).
    calibration_prevalence: float = _LEGACY_CALIBRATION_PREVALENCE
    # Monotone map (xs, ys) applied to sigmoid(logit / temperature), fitted on validation records (isotonic,
    # interpolated); None: Platt scaling alone. It keeps the upper range calibrated, where a sigmoid cannot.
    calibration_map: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # The drain operating point (migrate, then reboot), stricter than the alarm's; None: no drains.
    migrate_threshold: float | None = None
    migrate_records: int = 1
    migrate_for_s: float = 0.0
    migrate_bridge_s: float = 0.0
    horizon_s: float = 3600.0
    mode_min_risk: float = 0.5
    metrics: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    created_at: float = 0.0

    @property
    def validated_interval_s(self) -> float | None:
        """The slowest sampling interval of the fleets its operating points were chosen on (None: not recorded)."""
        intervals = self.metrics.get("validated_intervals_s") or []
        return max(intervals) if intervals else None

    @property
    def slow_interval_s(self) -> float | None:
        """Sampling intervals above this are slower than anything this model was validated at, by more than a
        timer's jitter (SLOWER_THAN_VALIDATED; None: not recorded)."""
        limit = self.validated_interval_s
        return None if limit is None else SLOWER_THAN_VALIDATED * limit

    def sampled_slower_than_validated(self, interval_s: float | None) -> bool:
        """Whether telemetry sampled every `interval_s` is slower than validated (`slow_interval_s`)."""
        slow = self.slow_interval_s
        return slow is not None and interval_s is not None and interval_s > slow

    def slow_sampling_note(self, what: str, interval_s: float | None) -> str:
        """One line for an operator when `what` is sampled more slowly than validated ("" when it is not)."""
        if not self.sampled_slower_than_validated(interval_s):
            return ""
        return (f"{what} is sampled every {interval_s:g} s, slower than the {self.validated_interval_s:g} s model "
                f"{self.version} was validated at: its alarms there were measured only on diagnostic fleets, with "
                "more false alarms and lower recall (docs/model.md, 'Sampling intervals')")

    @property
    def alarm_op(self) -> OperatingPoint:
        return OperatingPoint(self.threshold, self.alarm_records, for_s=self.alarm_for_s,
                              bridge_s=bridge_for(self.alarm_bridge_s, self.alarm_for_s))  # fmt: skip

    @property
    def migrate_op(self) -> OperatingPoint | None:
        if self.migrate_threshold is None:
            return None
        return OperatingPoint(self.migrate_threshold, self.migrate_records, for_s=self.migrate_for_s,
                              bridge_s=bridge_for(self.migrate_bridge_s, self.migrate_for_s))  # fmt: skip

    def build(self) -> FailureLSTM:
        model = FailureLSTM(len(self.features), self.hidden, self.mlp)
        model.load_state_dict(self.state_dict)
        model.eval()
        return model

    def save(self, path: str | Path) -> None:
        payload = {
            "format": ARTIFACT_FORMAT,
            "version": self.version,
            "state_dict": self.state_dict,
            "features": list(self.features),
            "window": {"seq_len": self.window.seq_len, "stride_s": self.window.stride_s},
            "norm_mean": torch.from_numpy(self.norm_mean.astype(np.float32)),
            "norm_std": torch.from_numpy(self.norm_std.astype(np.float32)),
            "hidden": self.hidden,
            "mlp": self.mlp,
            "temperature": float(self.temperature),
            "threshold": float(self.threshold),
            "alarm_records": int(self.alarm_records),
            "alarm_for_s": float(self.alarm_for_s),
            "alarm_bridge_s": float(self.alarm_bridge_s),
            "calibration_prevalence": float(self.calibration_prevalence),
            "calibration_map": None if self.calibration_map is None else [list(v) for v in self.calibration_map],
            "migrate_threshold": None if self.migrate_threshold is None else float(self.migrate_threshold),
            "migrate_records": int(self.migrate_records),
            "migrate_for_s": float(self.migrate_for_s),
            "migrate_bridge_s": float(self.migrate_bridge_s),
            "horizon_s": float(self.horizon_s),
            "mode_min_risk": float(self.mode_min_risk),
            "metrics": self.metrics,
            "data_fingerprint": self.data_fingerprint,
            "created_at": float(self.created_at or time.time()),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(payload, path)


class ModelError(RuntimeError):
    """A model artifact is missing, unreadable or does not match this version's features."""


def default_model_path() -> Path:
    return Path(str(resources.files("gpuwatch") / "models" / "default.pt"))


def load_artifact(path: str | Path | None = None) -> ModelArtifact:
    """Load a model artifact (the packaged default when `path` is empty) and check it fits this code."""
    path = Path(path) if path else default_model_path()
    if not path.exists():
        raise ModelError(f"model artifact {path} does not exist; train one with `gpuwatch train` or omit --model")
    if path.is_dir():
        raise ModelError(f"model artifact {path} is a directory; give the .pt file `gpuwatch train --out` wrote")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file, with a page of advice as the message
        raise ModelError(f"cannot read model artifact {path}: not a model file torch loads ({type(exc).__name__}); "
                         "give a file `gpuwatch train` wrote or omit --model") from exc  # fmt: skip
    if not isinstance(raw, dict) or raw.get("format") != ARTIFACT_FORMAT:
        raise ModelError(f"{path} is not a {ARTIFACT_FORMAT} artifact; give a file `gpuwatch train` wrote")
    try:
        return _artifact(path, raw)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path} is an incomplete {ARTIFACT_FORMAT} artifact ({type(exc).__name__}: {exc}); "
                         "retrain it with `gpuwatch train`") from exc  # fmt: skip


def _artifact(path: Path, raw: dict[str, Any]) -> ModelArtifact:
    features = tuple(raw["features"])
    if features != FEATURE_NAMES:
        raise ModelError(
            f"{path} was trained on a different feature set ({len(features)} features, this code has "
            f"{len(FEATURE_NAMES)}); retrain it with `gpuwatch train`"
        )
    return ModelArtifact(
        version=raw["version"],
        state_dict=raw["state_dict"],
        features=features,
        window=WindowConfig(**raw["window"]),
        norm_mean=raw["norm_mean"].numpy(),
        norm_std=raw["norm_std"].numpy(),
        hidden=int(raw["hidden"]),
        mlp=int(raw["mlp"]),
        temperature=float(raw["temperature"]),
        threshold=float(raw["threshold"]),
        alarm_records=int(raw.get("alarm_records", 1)),
        alarm_for_s=float(raw.get("alarm_for_s", 0.0)),
        alarm_bridge_s=float(raw.get("alarm_bridge_s", 0.0)),
        calibration_prevalence=float(raw.get("calibration_prevalence", _LEGACY_CALIBRATION_PREVALENCE)),
        calibration_map=None if raw.get("calibration_map") is None
        else (tuple(raw["calibration_map"][0]), tuple(raw["calibration_map"][1])),
        migrate_threshold=None if raw.get("migrate_threshold") is None else float(raw["migrate_threshold"]),
        migrate_records=int(raw.get("migrate_records", 1)),
        migrate_for_s=float(raw.get("migrate_for_s", 0.0)),
        migrate_bridge_s=float(raw.get("migrate_bridge_s", 0.0)),
        horizon_s=float(raw["horizon_s"]),
        mode_min_risk=float(raw.get("mode_min_risk", 0.5)),
        metrics=raw.get("metrics", {}),
        data_fingerprint=raw.get("data_fingerprint", ""),
        created_at=float(raw.get("created_at", 0.0)),
    )


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(name)


# Sequences per LSTM call when `Scorer.encode_past` runs on the CPU: past a few hundred, each sequence took longer
# (20 us at 512 a call, 32 us at 10,000, one thread: the batch's gates outgrow the caches). The states are those of
# one call (bit for bit on the development machine; calls of a few rows can differ in the last bit).
CPU_ENCODE_ROWS = 512


@contextmanager
def _without_onednn() -> Iterator[None]:
    """Inference on the CPU without oneDNN (mkldnn). oneDNN builds and caches kernels ("primitives") for every
    input shape it meets, up to 1,024 of them (~0.3 MB each here), and a stream worker meets a new batch size
    almost every batch: its memory grew for hours (about 2 MB/min at 2,000 GPUs, 6.5 MB/min at 10,000) before
    the cache would be full. PyTorch's own kernels keep nothing per shape and are as fast for this small LSTM
    (`gpuwatch bench soak`, docs/reliability.md). The setting is process-wide, so it is switched off for the
    call only, and left as it was."""
    was = bool(torch.backends.mkldnn.enabled)
    torch.backends.mkldnn.enabled = False  # type: ignore[assignment]  # a module property, typed as its descriptor
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = was  # type: ignore[assignment]


class Scorer:
    """Scores batches of sequences in one forward pass; CUDA with pinned, non-blocking copies when present.

    On the CPU it scores without oneDNN (see `_without_onednn`), so that its memory does not grow with every
    new batch size."""

    def __init__(self, artifact: ModelArtifact, device: str = "auto") -> None:
        self.artifact = artifact
        self.device = resolve_device(device)
        self.model = artifact.build().to(self.device)
        self._mean = torch.from_numpy(artifact.norm_mean).to(self.device)
        self._std = torch.from_numpy(artifact.norm_std).to(self.device)
        self._pinned: torch.Tensor | None = None
        self.version = artifact.version

    def _to_device(self, seqs: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(seqs)
        if self.device.type != "cuda":
            return host
        if self._pinned is None or self._pinned.numel() < host.numel():
            self._pinned = torch.empty(host.numel() * 2, dtype=torch.float32).pin_memory()
        staged = self._pinned[: host.numel()].view(host.shape)
        staged.copy_(host)
        return staged.to(self.device, non_blocking=True)

    @torch.inference_mode()
    def logits(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Raw (uncalibrated) risk logits (B,) and mode logits (B, n_modes)."""
        x = (self._to_device(np.ascontiguousarray(seqs, dtype=np.float32)) - self._mean) / self._std
        with _without_onednn():
            risk_logit, mode_logit = self.model(x)
        return risk_logit.float().cpu().numpy(), mode_logit.float().cpu().numpy()

    @torch.inference_mode()
    def encode_past(self, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LSTM state (h, c), each (B, hidden) float32, after the past rows (B, T-1, F) of each sequence."""
        past = np.ascontiguousarray(past, dtype=np.float32)
        step = len(past) if self.device.type == "cuda" else CPU_ENCODE_ROWS
        hs, cs = [], []
        with _without_onednn():
            for at in range(0, max(len(past), 1), step):
                x = (self._to_device(past[at : at + step]) - self._mean) / self._std
                _, (h, c) = self.model.lstm(x)
                hs.append(h[0].float().cpu().numpy())
                cs.append(c[0].float().cpu().numpy())
        return (hs[0], cs[0]) if len(hs) == 1 else (np.concatenate(hs), np.concatenate(cs))

    @torch.inference_mode()
    def logits_from_state(self, h: np.ndarray, c: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Like `logits` on [past..., current], from the state `encode_past` returned for the past: one LSTM step."""
        x = (self._to_device(np.ascontiguousarray(current, dtype=np.float32)) - self._mean) / self._std
        state = (torch.from_numpy(h).to(self.device), torch.from_numpy(c).to(self.device))
        with _without_onednn():
            risk_logit, mode_logit = self.model.step(x, state)
        return risk_logit.float().cpu().numpy(), mode_logit.float().cpu().numpy()

    def score_from_state(self, h: np.ndarray, c: np.ndarray, current: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`score` for sequences whose past was already encoded (incremental scoring; exact, not approximate)."""
        if len(current) == 0:
            return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
        return self._calibrated(*self.logits_from_state(h, c, current))

    def score(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated risk in [0, 1] (B,) and mode index into FAILURE_MODES (B,), "none" below mode_min_risk."""
        if len(seqs) == 0:
            return np.zeros(0, dtype=np.float64), np.zeros(0, dtype=np.int64)
        return self._calibrated(*self.logits(seqs))

    def _calibrated(self, risk_logit: np.ndarray, mode_logit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # tanh form of the sigmoid: no overflow warning for large logits
        risk = 0.5 * (1.0 + np.tanh(risk_logit.astype(np.float64) / (2.0 * self.artifact.temperature)))
        if self.artifact.calibration_map is not None:
            risk = np.interp(risk, *self.artifact.calibration_map)
        mode = mode_logit.argmax(axis=1) + 1  # +1: FAILURE_MODES[0] is "none"
        mode = np.where(risk >= self.artifact.mode_min_risk, mode, 0)
        return risk, mode


def fingerprint_files(paths: list[Path]) -> str:
    """sha256 over the bytes of the training inputs, so an artifact names the data it came from."""
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the weights (names and values), so two models trained on the same data differ in name."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:6]


def artifact_bytes(artifact: ModelArtifact) -> int:
    buf = io.BytesIO()
    torch.save(artifact.state_dict, buf)
    return buf.tell()
