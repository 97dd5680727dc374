"""What counts as a failed GPU: the one definition the stream (`streams/window.py`, the `failed` of risk records)
and the labeller (`archive/labels.py`, failure labels from archived telemetry) both apply.

A failure starts at a sample that shows the GPU lost (off the bus), a fatal XID (`fields.XID_FATAL`: 48 double-bit
ECC, 62 internal micro-controller halt, 64 row-remap failure, 74 NVLink error, 79 fallen off the bus, 95
uncontained ECC error) or a row-remap failure flag. It ends, once none of those holds, at the first sample showing
the GPU was reset or repaired: it answers again after being lost, a volatile counter went down (`RESET_COUNTERS`:
they clear on a reset), or it runs work again (utilisation above 0) `WORKS_AGAIN_AFTER_S` or more after the
failure, which a GPU in a fatal state cannot do. XIDs an application causes (`fields.XID_APPLICATION`) never count.
"""

from __future__ import annotations

import numpy as np

from . import fields as F

WORKS_AGAIN_AFTER_S = 60.0
# Counters whose drop means the GPU was reset (volatile ECC counts, remaps, link errors, violation times); the
# aggregate ECC counters survive a reset and are left out.
RESET_COUNTERS: tuple[str, ...] = (
    "ecc_sbe_volatile",
    "ecc_dbe_volatile",
    "remapped_rows_correctable",
    "remapped_rows_uncorrectable",
    "retired_pages",
    "pcie_replay",
    "nvlink_crc_errors",
    "nvlink_replay_errors",
    "nvlink_recovery_errors",
    "power_violation_us",
    "thermal_violation_us",
)


def xid_summary(xids: list[list[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: count of XIDs that are not the application's (F.XID_APPLICATION), whether any was a memory
    XID, whether any was fatal."""
    n = len(xids)
    count = np.zeros(n, dtype=np.float32)
    memory = np.zeros(n, dtype=bool)
    fatal = np.zeros(n, dtype=bool)
    for i, codes in enumerate(xids):
        if codes:  # rare: the common empty list costs one truth test
            board = [c for c in codes if c not in F.XID_APPLICATION]
            count[i] = len(board)
            memory[i] = any(c in F.XID_MEMORY for c in board)
            fatal[i] = any(c in F.XID_FATAL for c in board)
    return count, memory, fatal


def failure_step(
    was_failed: np.ndarray, was_lost: np.ndarray, failed_since: np.ndarray, ts: np.ndarray, lost: np.ndarray,
    xid_fatal: np.ndarray, remap_failure: np.ndarray, util: np.ndarray, reset: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """One sample per GPU folded into its failed state (arrays of equal length, one entry per GPU).

    `was_failed`/`was_lost`/`failed_since`: the state after the GPU's previous sample (False/0 for its first);
    `reset`: a `RESET_COUNTERS` value went down since that sample. Returns (failed, failed_since, starts): starts
    marks the samples where a failure begins (its `failed_since` is that sample's ts; 0 when not failed).
    """
    fatal_now = lost | xid_fatal | remap_failure
    works = (np.nan_to_num(util, nan=0.0) > 0) & (ts - failed_since >= WORKS_AGAIN_AFTER_S)
    recovered = was_failed & ~fatal_now & (was_lost | reset | works)
    ongoing = was_failed & ~recovered
    starts = fatal_now & ~ongoing
    failed = ongoing | fatal_now
    since = np.where(starts, ts, np.where(ongoing, failed_since, 0.0))
    return failed, since, starts
