"""Operating points and base rates: when a score means "act", and what a score means on another fleet.

Torch-free, so the sinks, the report and the demo can use it without loading the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

_NAME = re.compile(r"(?P<source>[a-z]+):(?P<threshold>[0-9.e+-]+)x(?P<records>[0-9]+)")


@dataclass(frozen=True)
class OperatingPoint:
    """When a GPU counts as in alarm for one action: `records` scorings in a row (at most `max_gap_s` apart)
    with the model's calibrated score at or above `threshold`. `source` says who set it (model or override)."""

    threshold: float
    records: int = 1
    source: str = "model"
    max_gap_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"an operating point's threshold must be in (0, 1], got {self.threshold}")
        if self.records < 1:
            raise ValueError(f"an operating point needs at least 1 record in a row, got {self.records}")

    @property
    def name(self) -> str:
        """What risk records carry as `op`: who set it, the score threshold and the scorings in a row."""
        return f"{self.source}:{self.threshold:.4g}x{self.records}"

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "records": self.records}

    @classmethod
    def parse(cls, name: str) -> OperatingPoint:
        """The operating point a risk record's `op` names (``model:0.658x2``); ValueError if it names none."""
        m = _NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"{name!r} does not name an operating point (like model:0.658x2)")
        return cls(float(m["threshold"]), int(m["records"]), m["source"])


def prevalence(failures_per_gpu_day: float, horizon_s: float) -> float:
    """Share of a fleet's records that precede a failure within `horizon_s` at this failure rate."""
    return 1.0 - math.exp(-max(failures_per_gpu_day, 0.0) * horizon_s / 86400.0)


def at_prevalence(p: np.ndarray, calibrated_at: float, deployed_at: float) -> np.ndarray:
    """Probabilities calibrated at one base rate restated at another (Bayes: the odds scale by the prior odds)."""
    if calibrated_at <= 0.0 or deployed_at <= 0.0 or calibrated_at == deployed_at:
        return p
    ratio = (deployed_at / (1.0 - deployed_at)) / (calibrated_at / (1.0 - calibrated_at))
    odds = p / np.maximum(1.0 - p, 1e-300) * ratio
    return np.where(p >= 1.0, 1.0, odds / (1.0 + odds))
