"""Fault model of the fleet simulator: modes, rates, mode mix, precursors and repair times.

The defaults are derived from the StepFun InfiniteHBD fault trace (ACM SIGCOMM 2025, arXiv 2502.03885,
data Apache-2.0): 400 servers x 348.98 days, 584 faults. `derive_defaults(trace_path)` recomputes every
number below from `fault_trace.json`; the constants are kept here because the trace is not shipped with
the package. docs/simulator.md explains the mapping of trace descriptions to our modes.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

# Failure modes the simulator draws (schemas.fields.FAILURE_MODES without "none").
MODES: tuple[str, ...] = ("memory", "thermal", "power", "interconnect", "sudden")

# Trace fault description (Desc) -> our mode; whole trace classes handled in `trace_mode`.
DESC_TO_MODE: dict[str, str] = {
    "GPU DBE(Double Bit ECC) > Threshold": "memory",
    "GPU SBE(Single Bit ECC) > Threshold": "memory",
    "GPU PCI link width low": "interconnect",
    "GPU Lost": "interconnect",
    "GPU device not found": "interconnect",
    "GPU P2P Bandwidth Low": "interconnect",
    "GPU Temperature High": "thermal",
    "GPU device unknow error": "sudden",  # sic: the trace spells it "unknow"
    "nvidia-smi Timeout": "sudden",
    "GPU xid Error": "sudden",  # XID code not recorded, so no precursor can be attributed
    "Silent Data Corruption": "sudden",  # found by checksums, invisible to NVML beforehand
}
CLASS_TO_MODE: dict[str, str] = {"Fan": "thermal", "Power Supply": "power"}

# GPUs per server in the trace cluster (HGX 8-GPU nodes); turns server-days into GPU-days.
TRACE_GPUS_PER_NODE = 8
TRACE_NODES = 400

# --- Derived from the trace by derive_defaults() (rerun it to check; tests/test_simulator.py does, on tests/data/) ---
# 217 GPU-attributable fault starts / (400 nodes x 8 GPUs x 348.98 days) = 1.943e-4 per GPU-day.
RATE_PER_GPU_DAY = 1.943e-4
# Fault-start counts per mode: memory 61, thermal 35, power 26, interconnect 34, sudden 61 (of 217).
MODE_COUNTS: dict[str, int] = {"memory": 61, "thermal": 35, "power": 26, "interconnect": 34, "sudden": 61}
MODE_MIX: dict[str, float] = {m: round(c / 217, 4) for m, c in MODE_COUNTS.items()}
# Repair time (fault_end - fault_start of the same node and fault type), hours, percentiles 0,10,...,100.
REPAIR_PCTS: tuple[float, ...] = tuple(float(p) for p in range(0, 101, 10))
REPAIR_QUANTILES_H: dict[str, tuple[float, ...]] = {
    "memory": (0.07, 0.21, 0.21, 0.22, 0.23, 3.87, 18.98, 36.93, 71.62, 531.49, 2124.07),
    "thermal": (0.27, 14.56, 20.0, 32.03, 39.95, 82.15, 164.76, 234.05, 234.06, 1337.11, 2199.69),
    "power": (8.72, 19.28, 38.81, 62.83, 77.54, 351.1, 366.86, 440.52, 833.44, 1315.42, 1367.01),
    "interconnect": (0.2, 0.81, 19.72, 37.36, 58.75, 74.12, 138.94, 246.76, 374.56, 875.74, 2206.82),
    "sudden": (0.18, 0.21, 0.23, 0.28, 1.24, 3.38, 16.46, 32.57, 49.75, 90.09, 410.0),
}
# Gamma shape of the per-node fault-rate multiplier: method of moments on the 400 nodes' fault counts
# (mean 0.5425, sample variance 1.116): a few nodes fail repeatedly, most never.
FRAILTY_SHAPE = 0.513

# --- Not in the trace (it holds no telemetry): engineering assumptions, configurable in FleetConfig ---
# Precursor length range per mode, seconds (log-uniform draw); sudden failures have none.
PRECURSOR_RANGE_S: dict[str, tuple[float, float]] = {
    "memory": (600.0, 7200.0),
    "thermal": (300.0, 3600.0),
    "power": (120.0, 1800.0),
    "interconnect": (300.0, 7200.0),
    "sudden": (0.0, 0.0),
}
MIN_REPAIR_S = 60.0  # the trace rounds some repairs to 0 days; a GPU is down at least one minute


def trace_mode(level: str, cls: str, desc: str) -> str | None:
    """Our failure mode for one trace fault type, or None when NVML cannot see it (NIC, CPU, unknown)."""
    if level != "Hardware Failure":
        return None  # software faults and "Unknown/Stress Test" carry no GPU attribution
    if cls in CLASS_TO_MODE:
        return CLASS_TO_MODE[cls]
    return DESC_TO_MODE.get(desc) if cls == "GPU" else None


def derive_defaults(
    trace_path: str | Path, nodes: int = TRACE_NODES, gpus_per_node: int = TRACE_GPUS_PER_NODE
) -> dict:
    """Recompute the fault defaults from the trace; `trace_path` is fault_trace.json or its folder.

    Returns {"days", "gpu_days", "counts", "excluded", "rate_per_gpu_day", "mode_mix",
    "repair_quantiles_h" (percentiles 0..100 step 10), "repair_median_h", "frailty_shape"}.
    """
    path = Path(trace_path)
    if path.is_dir():
        path = path / "fault_trace.json"
    events = json.loads(path.read_text())
    days = max(e["event_time"] for e in events)
    counts: Counter[str] = Counter()
    excluded: Counter[str] = Counter()
    per_node: Counter[str] = Counter()
    open_at: dict[tuple[str, str, str, str], float] = {}
    repairs: dict[str, list[float]] = defaultdict(list)
    for e in events:
        ft = e["fault_type"]
        key = (e["node_id"], ft["Level"], ft["Class"], ft["Desc"])
        mode = trace_mode(ft["Level"], ft["Class"], ft["Desc"])
        if e["event_type"] == "fault_start":
            open_at[key] = e["event_time"]
            if mode is None:
                excluded[f"{ft['Class']}: {ft['Desc']}"] += 1
            else:
                counts[mode] += 1
                per_node[e["node_id"]] += 1
        elif key in open_at:
            start = open_at.pop(key)
            if mode is not None:
                repairs[mode].append(24.0 * (e["event_time"] - start))
    total = sum(counts.values())
    gpu_days = nodes * gpus_per_node * days
    node_counts = np.array(list(per_node.values()) + [0] * (nodes - len(per_node)), dtype=float)
    mean, var = node_counts.mean(), node_counts.var(ddof=1)
    shape = float(mean * mean / (var - mean)) if var > mean else float("inf")
    quant = {m: tuple(round(float(q), 2) for q in np.percentile(repairs[m], REPAIR_PCTS)) for m in MODES}
    return {
        "days": days,
        "gpu_days": gpu_days,
        "counts": {m: counts[m] for m in MODES},
        "excluded": dict(excluded.most_common()),
        "rate_per_gpu_day": total / gpu_days,
        "mode_mix": {m: round(counts[m] / total, 4) for m in MODES},
        "repair_quantiles_h": quant,
        "repair_median_h": {m: round(float(np.median(repairs[m])), 2) for m in MODES},
        "frailty_shape": round(shape, 3),
    }


def sample_repair_s(
    rng: np.random.Generator, modes: np.ndarray, scale: float = 1.0, quantiles_h: dict | None = None
) -> np.ndarray:
    """Repair durations in seconds for an array of mode indices (into MODES), times `scale`.

    Inverse-CDF draw from the trace percentiles, interpolated in log space (the tail spans 4 decades).
    """
    quantiles_h = quantiles_h or REPAIR_QUANTILES_H
    u = rng.random(len(modes)) * 100.0
    out = np.empty(len(modes))
    for i, mode in enumerate(MODES):
        sel = modes == i
        if sel.any():
            logq = np.log(np.maximum(np.asarray(quantiles_h[mode]) * 3600.0, MIN_REPAIR_S))
            out[sel] = np.exp(np.interp(u[sel], REPAIR_PCTS, logq))
    return np.maximum(out * scale, min(MIN_REPAIR_S, MIN_REPAIR_S * scale))
