"""Operating points and base rates: when a score means "act", and what a score means on another fleet.

Torch-free, so the sinks, the report and the demo can use it without loading the model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# The fewest scorings in a row an operating point chosen on validation data holds for (`training.operating_points`).
# Its hold is in seconds; at sampling intervals under 90 s a 90 s hold spans 3 or more scorings anyway, but an agent
# sampling every 90 s or slower would reach it on 2 scorings, two points of signals that its window smooths over
# far fewer samples than in training. On a fleet sampled at 120 s (docs/model.md, "Sampling intervals") a 2-scoring
# hold made 3 times the false alarms of a 3-scoring one.
MIN_RECORDS = 3

_NAME = re.compile(
    r"(?P<source>[a-z]+):(?P<threshold>[0-9.e+-]+)x(?P<records>[0-9]+)(?:/(?P<for_s>[0-9.]+)s)?(?:~(?P<bridge_s>[0-9.]+)s)?"
)


@dataclass(frozen=True)
class OperatingPoint:
    """When a GPU counts as in alarm for one action: its calibrated score at or above `threshold` at every
    scoring for at least `for_s` seconds of sample time and at least `records` scorings in a row. `source` says
    who set it (model or override).

    Persistence is held in seconds so that it means the same at any sampling interval (6 scorings are 25 s at
    1 s sampling and 5 min at 60 s). A run of scorings is broken by a gap longer than `max_gap_s` or twice the
    GPU's usual sample interval, whichever is longer, so a slow agent (sampling every 2 min) can still alarm.

    With `bridge_s`, a dip below the threshold does not break the run as long as the GPU scored at or above it
    in the last `bridge_s` seconds: a score that flickers about the threshold holds. It must be shorter than
    `for_s`, so that one high scoring alone never makes an alarm.
    """

    threshold: float
    records: int = 1
    source: str = "model"
    max_gap_s: float = 180.0
    for_s: float = 0.0
    bridge_s: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"an operating point's threshold must be in (0, 1], got {self.threshold}")
        if self.records < 1:
            raise ValueError(f"an operating point needs at least 1 record in a row, got {self.records}")
        if not 0.0 <= self.for_s <= 86400.0:
            raise ValueError(f"an operating point's persistence must be 0 to 86400 s, got {self.for_s}")
        if self.bridge_s < 0.0 or (self.bridge_s > 0.0 and self.bridge_s >= self.for_s):
            raise ValueError(f"an operating point's bridged dips must be 0 s or shorter than its persistence "
                             f"({self.for_s:g} s), got {self.bridge_s:g} s")  # fmt: skip

    @property
    def name(self) -> str:
        """What risk records carry as `op`: who set it, the score threshold, the scorings in a row and, when
        set, the seconds it must hold and the dips it bridges (``model:0.91x1/90s``, ``model:0.91x1/90s~30s``)."""
        held = f"/{self.for_s:g}s" if self.for_s else ""
        bridged = f"~{self.bridge_s:g}s" if self.bridge_s else ""
        return f"{self.source}:{self.threshold:.4g}x{self.records}{held}{bridged}"

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "records": self.records, "for_s": self.for_s, "bridge_s": self.bridge_s}

    @classmethod
    def parse(cls, name: str) -> OperatingPoint:
        """The operating point a risk record's `op` names (``model:0.658x2``, ``model:0.91x1/90s~30s``); ValueError
        if it names none."""
        m = _NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"{name!r} does not name an operating point (like model:0.658x2 or model:0.91x1/90s)")
        return cls(float(m["threshold"]), int(m["records"]), m["source"], for_s=float(m["for_s"] or 0.0),
                   bridge_s=float(m["bridge_s"] or 0.0))  # fmt: skip

    def gap_limit(self, interval_s: np.ndarray) -> np.ndarray:
        """Longest gap between two scorings that keeps a run going, per GPU with usual interval `interval_s`."""
        return np.maximum(self.max_gap_s, 2.0 * interval_s)


def bridge_for(bridge_s: float, for_s: float) -> float:
    """A bridge kept with a hold: dropped where it is no shorter than the hold (an artifact or override whose hold
    was shortened), which `OperatingPoint` would refuse."""
    return bridge_s if bridge_s < for_s else 0.0


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
