"""Field lists of `gpuwatch.samples/1`: the one place that names what a GPU sample carries.

The simulator, the NVML sampler, the codecs and the feature pipeline all read these tuples,
so adding a field here is how a new signal reaches the model.
"""

from __future__ import annotations

from typing import Literal, get_args

# Contract tags: the `schema` field of every record (tag and major version); the typed records are in records.py.
SAMPLES_SCHEMA = "gpuwatch.samples/1"
RISK_SCHEMA = "gpuwatch.risk/1"
REMEDIATION_SCHEMA = "gpuwatch.remediation/1"
OUTCOME_SCHEMA = "gpuwatch.outcome/1"
COMMAND_SCHEMA = "gpuwatch.command/1"
COMMAND_ACK_SCHEMA = "gpuwatch.command_ack/1"
DEADLETTER_SCHEMA = "gpuwatch.deadletter/1"
STATS_SCHEMA = "gpuwatch.stats/1"
AUDIT_SCHEMA = "gpuwatch.audit/1"
MODEL_CONTROL_SCHEMA = "gpuwatch.model_control/1"

# Gauges: a number, or null where the GPU does not support it (fan_pct on passively cooled boards).
GAUGES: tuple[str, ...] = (
    "temp_c",
    "power_w",
    "power_limit_w",
    "mem_used_mib",
    "mem_total_mib",
    "util_gpu_pct",
    "sm_clock_mhz",
    "fan_pct",
)

# Cumulative counters: non-negative numbers that only grow until a reset (driver reload, reboot).
COUNTERS: tuple[str, ...] = (
    "ecc_sbe_volatile",
    "ecc_dbe_volatile",
    "ecc_sbe_aggregate",
    "ecc_dbe_aggregate",
    "retired_pages",
    "remapped_rows_correctable",
    "remapped_rows_uncorrectable",
    "pcie_replay",
    "nvlink_crc_errors",
)

# Booleans; `lost` means NVML reports the GPU fell off the bus (other fields may then be null).
FLAGS: tuple[str, ...] = ("remap_pending", "remap_failure", "lost")

# Required fields of every GPU sample, besides gpu_index (int), uuid (str),
# throttle_reasons (int bitmask) and xid (list of ints seen since the previous sample).
REQUIRED_NUMERIC: tuple[str, ...] = GAUGES + COUNTERS

# Optional extras a richer sampler (NVML) sends; absent and null mean the same thing.
OPTIONAL_GAUGES: tuple[str, ...] = (
    "mem_clock_mhz",
    "util_mem_pct",
    "pcie_link_width",
    "pcie_link_width_max",
    "pcie_link_gen",
    "pcie_link_gen_max",
)
OPTIONAL_COUNTERS: tuple[str, ...] = (
    "nvlink_replay_errors",
    "nvlink_recovery_errors",
    "power_violation_us",
    "thermal_violation_us",
)
OPTIONAL_FLAGS: tuple[str, ...] = ("retired_pages_pending",)

ALL_NUMERIC: tuple[str, ...] = REQUIRED_NUMERIC + OPTIONAL_GAUGES + OPTIONAL_COUNTERS
ALL_FLAGS: tuple[str, ...] = FLAGS + OPTIONAL_FLAGS
ALL_COUNTERS: tuple[str, ...] = COUNTERS + OPTIONAL_COUNTERS

# NVML clock-event (throttle) reason bits, nvmlClocksEventReason*.
THROTTLE_GPU_IDLE = 0x1
THROTTLE_APP_CLOCKS = 0x2
THROTTLE_SW_POWER_CAP = 0x4
THROTTLE_HW_SLOWDOWN = 0x8
THROTTLE_SYNC_BOOST = 0x10
THROTTLE_SW_THERMAL = 0x20
THROTTLE_HW_THERMAL = 0x40
THROTTLE_HW_POWER_BRAKE = 0x80

# XID classes used by features, the simulator and the failure label.
XID_MEMORY = frozenset({48, 63, 64, 92, 94, 95})
XID_FATAL = frozenset({48, 62, 64, 74, 79, 95})
XID_INTERCONNECT = frozenset({74, 79})
# XIDs an application causes on a healthy GPU (NVIDIA's XID catalogue: 13 graphics engine exception, 31 MMU fault
# from an illegal address, 43 GPU stopped processing a faulted context, 45 preemptive cleanup after a killed job,
# 68 video decoder exception, 109 context switch timeout). The features leave them out: they say the job broke,
# not the board (a real H200 showed XID 31 for a deliberately faulting kernel, docs/gpu-check.md).
XID_APPLICATION = frozenset({13, 31, 43, 45, 68, 109})

FailureMode = Literal["none", "memory", "thermal", "power", "interconnect", "sudden"]
FAILURE_MODES: tuple[FailureMode, ...] = get_args(FailureMode)
# repair: the GPU has failed; drain its node and ask for a repair (not a prediction, no escalation).
# throttle: lower the GPU's power limit for a while (thermal and power precursors); restore: undo it (risk fell).
Action = Literal["checkpoint", "migrate", "reboot", "repair", "throttle", "restore"]
ACTIONS: tuple[Action, ...] = get_args(Action)
# Drains or reboots a node (what the blast-radius limit and the evaluation's false drains count).
DISRUPTIVE_ACTIONS: tuple[str, ...] = ("migrate", "reboot")
# Actions the node agent carries out itself (signed `gpuwatch.command/1`); the rest go to the scheduler.
AGENT_ACTIONS: tuple[str, ...] = ("checkpoint", "throttle", "restore")

# A failure label, one line of labels.jsonl (`gpuwatch simulate` writes them; training.dataset.Failures reads
# them): uuid, fail_ts and mode are required; precursor_start_ts and repair_end_ts may be null.
LABEL_FIELDS: tuple[str, ...] = (
    "host", "gpu_index", "uuid", "fail_ts", "mode", "precursor_start_ts", "repair_end_ts",
)  # fmt: skip
