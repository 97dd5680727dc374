"""A stand-in for the `pynvml` module (nvidia-ml-py) for machines without a GPU: tests and `gpuwatch bench agent`.

`FakeNvml(n_gpus)` exposes the pynvml functions the agent calls, with the same names, call signatures,
return shapes (ints, objects with the struct's attribute names, field-value records) and error classes
(`NVMLError` whose `.value` is the NVML return code, and one subclass per code named as pynvml names them:
`NVMLError_NotSupported`, `NVMLError_GpuIsLost`, `NVMLError_Unknown`, `NVMLError_LibraryNotFound`,
`NVMLError_Timeout`, ...). Tests change a board through `fake.gpus[i]` and inject XID events with
`fake.inject_xid(i, code)`. Constants are pynvml's values (nvidia-ml-py 13.x). Power limits follow NVML's
rules: nvmlDeviceSetPowerManagementLimit raises NVMLError_NoPermission unless the caller is privileged
(`FakeNvml(privileged=False)` stands for an agent not running as root) and NVMLError_InvalidArgument for a limit
outside the board's constraints (`power_limit_min_mw`..`power_limit_max_mw`); the enforced limit the sampler
reads is the one set. Clock locks likewise: nvmlDeviceSetGpuLockedClocks and nvmlDeviceResetGpuLockedClocks
raise NVMLError_NoPermission unless privileged, NVMLError_NotSupported on a board without clock locking
(`fake.gpus[i].unsupported = {"clock_lock"}`, as pre-Volta boards answer) and NVMLError_InvalidArgument for a
range outside the supported graphics clocks (`sm_clock_min_mhz`..`sm_clock_max_mhz` in 15 MHz steps); the SM
clock the sampler reads is held inside the locked range.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

# ---------------------------------------------------------------- return codes and error classes

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_NO_DATA = 21
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_UNKNOWN = 999

_ERROR_NAMES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized", NVML_ERROR_INVALID_ARGUMENT: "InvalidArgument",
    NVML_ERROR_NOT_SUPPORTED: "NotSupported", NVML_ERROR_NO_PERMISSION: "NoPermission",
    NVML_ERROR_ALREADY_INITIALIZED: "AlreadyInitialized", NVML_ERROR_NOT_FOUND: "NotFound",
    NVML_ERROR_INSUFFICIENT_SIZE: "InsufficientSize", NVML_ERROR_DRIVER_NOT_LOADED: "DriverNotLoaded",
    NVML_ERROR_TIMEOUT: "Timeout", NVML_ERROR_LIBRARY_NOT_FOUND: "LibraryNotFound",
    NVML_ERROR_FUNCTION_NOT_FOUND: "FunctionNotFound", NVML_ERROR_GPU_IS_LOST: "GpuIsLost",
    NVML_ERROR_NO_DATA: "NoData", NVML_ERROR_GPU_NOT_FOUND: "GpuNotFound", NVML_ERROR_UNKNOWN: "Unknown",
}  # fmt: skip


class NVMLError(Exception):
    """pynvml's base error: `NVMLError(code)` returns an instance of the subclass for that code."""

    _valClassMapping: dict[int, type[NVMLError]] = {}
    value: int

    def __new__(cls, value: int | None = None) -> NVMLError:  # noqa: D102 - mirrors pynvml
        if cls is NVMLError and value is not None:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value if value is not None else getattr(cls, "_code", NVML_ERROR_UNKNOWN)
        return obj

    def __init__(self, value: int | None = None) -> None:
        super().__init__(self.value)

    def __str__(self) -> str:
        return _ERROR_NAMES.get(self.value, f"NVML Error with code {self.value}")


def _error_class(code: int, name: str) -> type[NVMLError]:
    cls = type(f"NVMLError_{name}", (NVMLError,), {"_code": code, "__module__": __name__})
    NVMLError._valClassMapping[code] = cls
    return cls


NVMLError_Uninitialized = _error_class(NVML_ERROR_UNINITIALIZED, "Uninitialized")
NVMLError_InvalidArgument = _error_class(NVML_ERROR_INVALID_ARGUMENT, "InvalidArgument")
NVMLError_NotSupported = _error_class(NVML_ERROR_NOT_SUPPORTED, "NotSupported")
NVMLError_NoPermission = _error_class(NVML_ERROR_NO_PERMISSION, "NoPermission")
NVMLError_AlreadyInitialized = _error_class(NVML_ERROR_ALREADY_INITIALIZED, "AlreadyInitialized")
NVMLError_NotFound = _error_class(NVML_ERROR_NOT_FOUND, "NotFound")
NVMLError_InsufficientSize = _error_class(NVML_ERROR_INSUFFICIENT_SIZE, "InsufficientSize")
NVMLError_DriverNotLoaded = _error_class(NVML_ERROR_DRIVER_NOT_LOADED, "DriverNotLoaded")
NVMLError_Timeout = _error_class(NVML_ERROR_TIMEOUT, "Timeout")
NVMLError_LibraryNotFound = _error_class(NVML_ERROR_LIBRARY_NOT_FOUND, "LibraryNotFound")
NVMLError_FunctionNotFound = _error_class(NVML_ERROR_FUNCTION_NOT_FOUND, "FunctionNotFound")
NVMLError_GpuIsLost = _error_class(NVML_ERROR_GPU_IS_LOST, "GpuIsLost")
NVMLError_NoData = _error_class(NVML_ERROR_NO_DATA, "NoData")
NVMLError_GpuNotFound = _error_class(NVML_ERROR_GPU_NOT_FOUND, "GpuNotFound")
NVMLError_Unknown = _error_class(NVML_ERROR_UNKNOWN, "Unknown")

# ---------------------------------------------------------------- constants (pynvml values)

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM, NVML_CLOCK_MEM = 0, 1, 2
NVML_VOLATILE_ECC, NVML_AGGREGATE_ECC = 0, 1
NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS = 0
NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL = 0, 1
NVML_NVLINK_MAX_LINKS = 36  # nvidia-ml-py 13.x; older releases say 18
NVML_NVLINK_ERROR_DL_REPLAY = 0
NVML_NVLINK_ERROR_DL_RECOVERY = 1
NVML_NVLINK_ERROR_DL_CRC_FLIT = 2
NVML_NVLINK_ERROR_DL_CRC_DATA = 3
NVML_FEATURE_DISABLED, NVML_FEATURE_ENABLED = 0, 1

NVML_VALUE_TYPE_DOUBLE = 0
NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG = 2
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_VALUE_TYPE_SIGNED_LONG_LONG = 4

NVML_FI_DEV_ECC_SBE_VOL_TOTAL = 3
NVML_FI_DEV_ECC_DBE_VOL_TOTAL = 4
NVML_FI_DEV_ECC_SBE_AGG_TOTAL = 5
NVML_FI_DEV_ECC_DBE_AGG_TOTAL = 6
NVML_FI_DEV_RETIRED_SBE = 29
NVML_FI_DEV_RETIRED_DBE = 30
NVML_FI_DEV_RETIRED_PENDING = 31
NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL = 38
NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL = 45
NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL = 52
NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL = 59
NVML_FI_DEV_PERF_POLICY_POWER = 74
NVML_FI_DEV_PERF_POLICY_THERMAL = 75
NVML_FI_DEV_PCIE_REPLAY_COUNTER = 94
NVML_FI_DEV_REMAPPED_COR = 142
NVML_FI_DEV_REMAPPED_UNC = 143
NVML_FI_DEV_REMAPPED_PENDING = 144
NVML_FI_DEV_REMAPPED_FAILURE = 145

nvmlEventTypeSingleBitEccError = 0x1
nvmlEventTypeDoubleBitEccError = 0x2
nvmlEventTypeXidCriticalError = 0x8
nvmlEventTypeNone = 0x0

nvmlClocksEventReasonGpuIdle = 0x1
nvmlClocksEventReasonSwPowerCap = 0x4
nvmlClocksEventReasonHwSlowdown = 0x8
nvmlClocksEventReasonSwThermalSlowdown = 0x20
nvmlClocksEventReasonHwThermalSlowdown = 0x40

_EXPORTED = {k: v for k, v in globals().items() if k.startswith(("NVML", "nvml"))}

# ---------------------------------------------------------------- boards


@dataclass
class FakeGpu:
    """One simulated board; tests edit these attributes between samples. Units are NVML's (mW, bytes, ns)."""

    index: int
    uuid: str
    temp_c: int = 45
    power_mw: int = 310_000
    power_limit_mw: int = 700_000  # the limit in force (nvmlDeviceGetPowerManagementLimit, ...EnforcedPowerLimit)
    power_limit_default_mw: int = 700_000
    power_limit_min_mw: int = 200_000
    power_limit_max_mw: int = 700_000
    mem_total: int = 81559 << 20
    mem_used: int = 61234 << 20
    util_gpu: int = 97
    util_mem: int = 41
    sm_clock: int = 1980  # what the board would run at; nvmlDeviceGetClockInfo holds it inside a clock lock
    mem_clock: int = 2619
    sm_clock_max_mhz: int = 1980  # nvmlDeviceGetMaxClockInfo; supported: this down to the min, 15 MHz apart
    sm_clock_min_mhz: int = 345
    locked_clocks: tuple[int, int] | None = None  # (min, max) MHz set by nvmlDeviceSetGpuLockedClocks
    fan_pct: int | None = None  # None: passively cooled, NVML says NotSupported
    ecc_sbe_vol: int = 0
    ecc_dbe_vol: int = 0
    ecc_sbe_agg: int = 0
    ecc_dbe_agg: int = 0
    retired_sbe: list[int] = field(default_factory=list)  # page addresses
    retired_dbe: list[int] = field(default_factory=list)
    retired_pending: int = 0
    remapped_cor: int = 0
    remapped_unc: int = 0
    remap_pending: int = 0
    remap_failure: int = 0
    pcie_replay: int = 0
    link_width: int = 16
    link_width_max: int = 16
    link_gen: int = 5
    link_gen_max: int = 5
    # Per NVLink: [replay, recovery, crc_flit, crc_data]; no links (an empty dict) -> NotSupported.
    nvlink: dict[int, list[int]] = field(default_factory=lambda: {link: [0, 0, 0, 0] for link in range(18)})
    throttle_reasons: int = 0
    power_violation_ns: int = 0
    thermal_violation_ns: int = 0
    lost: bool = False  # every call raises NVMLError_GpuIsLost
    unknown_error: bool = False  # every call raises NVMLError_Unknown
    unsupported: set[str] = field(default_factory=set)  # features that raise NotSupported (see _FEATURES)


# feature name -> what it covers, for FakeGpu.unsupported
_FEATURES = ("temp", "power", "memory", "util", "clocks", "fan", "ecc", "retired", "remap", "pcie_replay",
             "pcie_link", "nvlink", "throttle", "violation", "clock_lock")  # fmt: skip


class FakeHandle:
    """An opaque device handle, as nvmlDeviceGetHandleByIndex returns."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<FakeHandle {self.index}>"


class _Struct:
    """Attribute bag standing in for a ctypes struct (c_nvmlMemory_t, c_nvmlUtilization_t, ...)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


class FakeEventSet:
    """What nvmlEventSetCreate returns: registered devices and a queue the waiting thread blocks on."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # gpu index -> event type mask
        self.queue: deque[_Struct] = deque()
        self.cond = threading.Condition()
        self.freed = False


class FakeNvml:
    """pynvml-compatible stand-in for `n_gpus` H100-like boards. Pass it where the agent takes `nvml`.

    `library_missing=True` makes nvmlInit raise NVMLError_LibraryNotFound; `field_values=False` makes
    nvmlDeviceGetFieldValues raise NotSupported (old driver), exercising the one-call-per-counter path;
    `unknown_field_ids` come back per field with NVML_ERROR_INVALID_ARGUMENT; `events=False` makes
    nvmlEventSetCreate raise NotSupported; `live=True` makes gauges drift with time (for the benchmark);
    `privileged=False` makes setting a power limit or locking clocks raise NoPermission, as for a process that is
    not root.
    `calls` counts calls by function name.
    """

    def __init__(self, n_gpus: int = 8, *, library_missing: bool = False, field_values: bool = True,
                 unknown_field_ids: set[int] | None = None, events: bool = True, live: bool = False,
                 seed: int = 0, privileged: bool = True) -> None:  # fmt: skip
        self.__dict__.update(_EXPORTED)
        self.gpus = [FakeGpu(i, f"GPU-{seed:08x}-{i:04x}-4000-8000-{i:012x}") for i in range(n_gpus)]
        self._handles = [FakeHandle(i) for i in range(n_gpus)]
        self.library_missing = library_missing
        self.field_values = field_values
        self.unknown_field_ids = set(unknown_field_ids or ())
        self.events = events
        self.live = live
        self.privileged = privileged
        self.initialized = 0
        self.calls: Counter[str] = Counter()
        self._sets: list[FakeEventSet] = []
        self._t0 = time.monotonic()
        self._last_live = 0.0

    # ----- test controls

    def inject_xid(self, index: int, code: int) -> None:
        """Raise an XID on GPU `index`: every event set registered for XIDs on it receives one event."""
        self._emit(index, nvmlEventTypeXidCriticalError, code)

    def inject_ecc_event(self, index: int, double_bit: bool = True) -> None:
        """Raise a single- or double-bit ECC event on GPU `index` (eventData 0, as NVML does)."""
        self._emit(index, nvmlEventTypeDoubleBitEccError if double_bit else nvmlEventTypeSingleBitEccError, 0)

    def driver_reload(self, index: int) -> None:
        """Reset the volatile counters of GPU `index`, as a driver reload or GPU reset does."""
        g = self.gpus[index]
        g.ecc_sbe_vol = g.ecc_dbe_vol = g.pcie_replay = 0
        g.power_violation_ns = g.thermal_violation_ns = 0
        g.remap_pending = 0
        for counters in g.nvlink.values():
            counters[:] = [0, 0, 0, 0]

    def _emit(self, index: int, event_type: int, data: int) -> None:
        ev = _Struct(device=self._handles[index], eventType=event_type, eventData=data,
                     gpuInstanceId=0xFFFFFFFF, computeInstanceId=0xFFFFFFFF)  # fmt: skip
        for es in self._sets:
            if es.registered.get(index, 0) & event_type:
                with es.cond:
                    es.queue.append(ev)
                    es.cond.notify()

    # ----- helpers

    def _gpu(self, handle: FakeHandle, feature: str) -> FakeGpu:
        if not self.initialized:
            raise NVMLError_Uninitialized()
        g = self.gpus[handle.index]
        if g.lost:
            raise NVMLError_GpuIsLost()
        if g.unknown_error:
            raise NVMLError_Unknown()
        if feature in g.unsupported:
            raise NVMLError_NotSupported()
        if self.live:
            self._drift()
        return g

    def _drift(self) -> None:
        # Cheap, deterministic motion so the benchmark serialises changing numbers.
        now = time.monotonic()
        if now - self._last_live < 0.5:
            return
        self._last_live = now
        t = now - self._t0
        for g in self.gpus:
            phase = t / 30.0 + g.index
            g.temp_c = int(60 + 12 * math.sin(phase))
            g.power_mw = int(450_000 + 200_000 * math.sin(phase * 1.3))
            g.util_gpu = int(80 + 20 * abs(math.sin(phase * 0.7)))
            g.sm_clock = 1980 - 15 * int(4 * abs(math.sin(phase)))
            g.mem_used = (61234 + int(2000 * math.sin(phase))) << 20
            if int(t) % 97 == g.index:
                g.ecc_sbe_vol += 1
                g.ecc_sbe_agg += 1

    # ----- library

    def nvmlInit(self) -> None:
        self.calls["nvmlInit"] += 1
        if self.library_missing:
            raise NVMLError_LibraryNotFound()
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.calls["nvmlShutdown"] += 1
        if not self.initialized:
            raise NVMLError_Uninitialized()
        self.initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        self.calls["nvmlDeviceGetCount"] += 1
        if not self.initialized:
            raise NVMLError_Uninitialized()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self.calls["nvmlDeviceGetHandleByIndex"] += 1
        if not self.initialized:
            raise NVMLError_Uninitialized()
        if not 0 <= index < len(self.gpus):
            raise NVMLError_InvalidArgument()
        if self.gpus[index].lost:
            raise NVMLError_GpuIsLost()
        return self._handles[index]

    def nvmlDeviceGetIndex(self, handle: FakeHandle) -> int:
        return handle.index

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        self.calls["nvmlDeviceGetUUID"] += 1
        return self._gpu(handle, "uuid").uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        return "NVIDIA H100 80GB HBM3"

    # ----- gauges

    def nvmlDeviceGetTemperature(self, handle: FakeHandle, sensor: int) -> int:
        self.calls["nvmlDeviceGetTemperature"] += 1
        if sensor != NVML_TEMPERATURE_GPU:
            raise NVMLError_InvalidArgument()
        return self._gpu(handle, "temp").temp_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetPowerUsage"] += 1
        return self._gpu(handle, "power").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetEnforcedPowerLimit"] += 1
        return self._gpu(handle, "power").power_limit_mw

    def nvmlDeviceGetPowerManagementLimit(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetPowerManagementLimit"] += 1
        return self._gpu(handle, "power").power_limit_mw

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetPowerManagementDefaultLimit"] += 1
        return self._gpu(handle, "power").power_limit_default_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: FakeHandle) -> list[int]:
        """[min, max] milliwatts, as pynvml returns them."""
        self.calls["nvmlDeviceGetPowerManagementLimitConstraints"] += 1
        g = self._gpu(handle, "power")
        return [g.power_limit_min_mw, g.power_limit_max_mw]

    def nvmlDeviceSetPowerManagementLimit(self, handle: FakeHandle, limit: int) -> None:
        """Sets the limit (milliwatts): NoPermission unless privileged, InvalidArgument outside the constraints."""
        self.calls["nvmlDeviceSetPowerManagementLimit"] += 1
        g = self._gpu(handle, "power")
        if not self.privileged:
            raise NVMLError_NoPermission()
        if not g.power_limit_min_mw <= int(limit) <= g.power_limit_max_mw:
            raise NVMLError_InvalidArgument()
        g.power_limit_mw = int(limit)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle, version: int | None = None) -> _Struct:
        self.calls["nvmlDeviceGetMemoryInfo"] += 1
        g = self._gpu(handle, "memory")
        return _Struct(total=g.mem_total, used=g.mem_used, free=g.mem_total - g.mem_used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> _Struct:
        self.calls["nvmlDeviceGetUtilizationRates"] += 1
        g = self._gpu(handle, "util")
        return _Struct(gpu=g.util_gpu, memory=g.util_mem)

    def nvmlDeviceGetClockInfo(self, handle: FakeHandle, type: int) -> int:  # noqa: A002 - pynvml's name
        self.calls["nvmlDeviceGetClockInfo"] += 1
        g = self._gpu(handle, "clocks")
        lo, hi = g.locked_clocks or (0, g.sm_clock)
        sm = min(max(g.sm_clock, lo), hi)
        return {NVML_CLOCK_SM: sm, NVML_CLOCK_GRAPHICS: sm, NVML_CLOCK_MEM: g.mem_clock}[type]

    def nvmlDeviceGetMaxClockInfo(self, handle: FakeHandle, type: int) -> int:  # noqa: A002 - pynvml's name
        self.calls["nvmlDeviceGetMaxClockInfo"] += 1
        g = self._gpu(handle, "clocks")
        return {NVML_CLOCK_SM: g.sm_clock_max_mhz, NVML_CLOCK_GRAPHICS: g.sm_clock_max_mhz,
                NVML_CLOCK_MEM: g.mem_clock}[type]  # fmt: skip

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: FakeHandle) -> list[int]:
        self.calls["nvmlDeviceGetSupportedMemoryClocks"] += 1
        return [self._gpu(handle, "clocks").mem_clock]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: FakeHandle, memoryClockMHz: int) -> list[int]:  # noqa: N803
        """Highest first, as NVML lists them; NotFound for a memory clock the board does not support."""
        self.calls["nvmlDeviceGetSupportedGraphicsClocks"] += 1
        g = self._gpu(handle, "clocks")
        if memoryClockMHz != g.mem_clock:
            raise NVMLError_NotFound()
        return list(range(g.sm_clock_max_mhz, g.sm_clock_min_mhz - 1, -15))

    def nvmlDeviceSetGpuLockedClocks(self, handle: FakeHandle, minGpuClockMHz: int, maxGpuClockMHz: int) -> None:  # noqa: N803 # fmt: skip
        """Locks the graphics clock to [min, max] MHz: NotSupported without clock locking, NoPermission unless
        privileged, InvalidArgument for a range that is empty or outside the supported clocks."""
        self.calls["nvmlDeviceSetGpuLockedClocks"] += 1
        g = self._gpu(handle, "clock_lock")
        if not self.privileged:
            raise NVMLError_NoPermission()
        lo, hi = int(minGpuClockMHz), int(maxGpuClockMHz)
        if not g.sm_clock_min_mhz <= lo <= hi <= g.sm_clock_max_mhz:
            raise NVMLError_InvalidArgument()
        g.locked_clocks = (lo, hi)

    def nvmlDeviceResetGpuLockedClocks(self, handle: FakeHandle) -> None:
        """Undoes a clock lock (harmless when none is set): NotSupported without clock locking, NoPermission
        unless privileged."""
        self.calls["nvmlDeviceResetGpuLockedClocks"] += 1
        g = self._gpu(handle, "clock_lock")
        if not self.privileged:
            raise NVMLError_NoPermission()
        g.locked_clocks = None

    def nvmlDeviceGetFanSpeed(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetFanSpeed"] += 1
        g = self._gpu(handle, "fan")
        if g.fan_pct is None:
            raise NVMLError_NotSupported()
        return g.fan_pct

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetCurrentClocksEventReasons"] += 1
        return self._gpu(handle, "throttle").throttle_reasons

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] += 1
        return self._gpu(handle, "throttle").throttle_reasons

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetCurrPcieLinkWidth"] += 1
        return self._gpu(handle, "pcie_link").link_width

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetMaxPcieLinkWidth"] += 1
        return self._gpu(handle, "pcie_link").link_width_max

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetCurrPcieLinkGeneration"] += 1
        return self._gpu(handle, "pcie_link").link_gen

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetMaxPcieLinkGeneration"] += 1
        return self._gpu(handle, "pcie_link").link_gen_max

    # ----- counters, one call each

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, errorType: int, counterType: int) -> int:  # noqa: N803
        self.calls["nvmlDeviceGetTotalEccErrors"] += 1
        g = self._gpu(handle, "ecc")
        uncorrected = errorType == NVML_MEMORY_ERROR_TYPE_UNCORRECTED
        if counterType == NVML_VOLATILE_ECC:
            return g.ecc_dbe_vol if uncorrected else g.ecc_sbe_vol
        return g.ecc_dbe_agg if uncorrected else g.ecc_sbe_agg

    def nvmlDeviceGetRetiredPages(self, device: FakeHandle, sourceFilter: int) -> list[int]:  # noqa: N803
        self.calls["nvmlDeviceGetRetiredPages"] += 1
        g = self._gpu(device, "retired")
        pages = (
            g.retired_dbe
            if sourceFilter == NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
            else g.retired_sbe
        )
        return list(pages)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, device: FakeHandle) -> int:
        self.calls["nvmlDeviceGetRetiredPagesPendingStatus"] += 1
        return self._gpu(device, "retired").retired_pending

    def nvmlDeviceGetRemappedRows(self, device: FakeHandle) -> tuple[int, int, int, int]:
        self.calls["nvmlDeviceGetRemappedRows"] += 1
        g = self._gpu(device, "remap")
        return (g.remapped_cor, g.remapped_unc, g.remap_pending, g.remap_failure)

    def nvmlDeviceGetPcieReplayCounter(self, handle: FakeHandle) -> int:
        self.calls["nvmlDeviceGetPcieReplayCounter"] += 1
        return self._gpu(handle, "pcie_replay").pcie_replay

    def nvmlDeviceGetNvLinkState(self, device: FakeHandle, link: int) -> int:
        self.calls["nvmlDeviceGetNvLinkState"] += 1
        g = self._gpu(device, "nvlink")
        if not g.nvlink:
            raise NVMLError_NotSupported()
        if link not in g.nvlink:
            raise NVMLError_InvalidArgument()
        return NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkErrorCounter(self, device: FakeHandle, link: int, counter: int) -> int:
        self.calls["nvmlDeviceGetNvLinkErrorCounter"] += 1
        g = self._gpu(device, "nvlink")
        if link not in g.nvlink:
            raise NVMLError_NotSupported() if not g.nvlink else NVMLError_InvalidArgument()
        return g.nvlink[link][counter]

    def nvmlDeviceGetViolationStatus(self, device: FakeHandle, perfPolicyType: int) -> _Struct:  # noqa: N803
        self.calls["nvmlDeviceGetViolationStatus"] += 1
        g = self._gpu(device, "violation")
        ns = g.power_violation_ns if perfPolicyType == NVML_PERF_POLICY_POWER else g.thermal_violation_ns
        return _Struct(referenceTime=int(time.time() * 1e6), violationTime=ns)

    # ----- batched field values

    def _field(self, g: FakeGpu, fid: int) -> tuple[int, int]:
        """(feature, value) of one field id, or raises KeyError for an id this fake does not know."""
        nvl = g.nvlink
        table: dict[int, tuple[str, Any]] = {
            NVML_FI_DEV_ECC_SBE_VOL_TOTAL: ("ecc", g.ecc_sbe_vol),
            NVML_FI_DEV_ECC_DBE_VOL_TOTAL: ("ecc", g.ecc_dbe_vol),
            NVML_FI_DEV_ECC_SBE_AGG_TOTAL: ("ecc", g.ecc_sbe_agg),
            NVML_FI_DEV_ECC_DBE_AGG_TOTAL: ("ecc", g.ecc_dbe_agg),
            NVML_FI_DEV_RETIRED_SBE: ("retired", len(g.retired_sbe)),
            NVML_FI_DEV_RETIRED_DBE: ("retired", len(g.retired_dbe)),
            NVML_FI_DEV_RETIRED_PENDING: ("retired", g.retired_pending),
            NVML_FI_DEV_REMAPPED_COR: ("remap", g.remapped_cor),
            NVML_FI_DEV_REMAPPED_UNC: ("remap", g.remapped_unc),
            NVML_FI_DEV_REMAPPED_PENDING: ("remap", g.remap_pending),
            NVML_FI_DEV_REMAPPED_FAILURE: ("remap", g.remap_failure),
            NVML_FI_DEV_PCIE_REPLAY_COUNTER: ("pcie_replay", g.pcie_replay),
            NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL: ("nvlink", sum(c[2] for c in nvl.values()) if nvl else None),
            NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL: ("nvlink", sum(c[3] for c in nvl.values()) if nvl else None),
            NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL: ("nvlink", sum(c[0] for c in nvl.values()) if nvl else None),
            NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL: ("nvlink", sum(c[1] for c in nvl.values()) if nvl else None),
            NVML_FI_DEV_PERF_POLICY_POWER: ("violation", g.power_violation_ns),
            NVML_FI_DEV_PERF_POLICY_THERMAL: ("violation", g.thermal_violation_ns),
        }  # fmt: skip
        return table[fid]

    def nvmlDeviceGetFieldValues(self, handle: FakeHandle, fieldIds: list[int]) -> list[_Struct]:  # noqa: N803
        self.calls["nvmlDeviceGetFieldValues"] += 1
        if not self.field_values:
            raise NVMLError_NotSupported()
        g = self._gpu(handle, "field_values")
        out = []
        for fid in fieldIds:
            ret, value = NVML_SUCCESS, 0
            try:
                feature, value = self._field(g, fid)
            except KeyError:
                ret = NVML_ERROR_INVALID_ARGUMENT
            else:
                if fid in self.unknown_field_ids:
                    ret = NVML_ERROR_INVALID_ARGUMENT
                elif feature in g.unsupported or value is None:
                    ret, value = NVML_ERROR_NOT_SUPPORTED, 0
            out.append(_Struct(fieldId=fid, scopeId=0, timestamp=int(time.time() * 1e6), latencyUsec=0,
                               valueType=NVML_VALUE_TYPE_UNSIGNED_LONG_LONG, nvmlReturn=ret,
                               value=_Struct(ullVal=value, dVal=float(value), uiVal=value, ulVal=value,
                                             sllVal=value)))  # fmt: skip
        return out

    # ----- events

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self.calls["nvmlEventSetCreate"] += 1
        if not self.initialized:
            raise NVMLError_Uninitialized()
        if not self.events:
            raise NVMLError_NotSupported()
        es = FakeEventSet()
        self._sets.append(es)
        return es

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        self._gpu(handle, "events")
        return nvmlEventTypeXidCriticalError | nvmlEventTypeSingleBitEccError | nvmlEventTypeDoubleBitEccError

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, eventTypes: int, eventSet: FakeEventSet) -> None:  # noqa: N803
        self.calls["nvmlDeviceRegisterEvents"] += 1
        supported = self.nvmlDeviceGetSupportedEventTypes(handle)
        if eventTypes & ~supported:
            raise NVMLError_NotSupported()
        eventSet.registered[handle.index] = eventSet.registered.get(handle.index, 0) | eventTypes

    def nvmlEventSetWait(self, eventSet: FakeEventSet, timeoutms: int) -> _Struct:  # noqa: N803
        """Blocks up to `timeoutms` for the next event; raises NVMLError_Timeout when none came."""
        with eventSet.cond:
            if not eventSet.queue:
                eventSet.cond.wait(timeoutms / 1000.0)
            if eventSet.freed:
                raise NVMLError_Uninitialized()
            if not eventSet.queue:
                raise NVMLError_Timeout()
            return eventSet.queue.popleft()

    def nvmlEventSetFree(self, eventSet: FakeEventSet) -> None:
        self.calls["nvmlEventSetFree"] += 1
        with eventSet.cond:
            eventSet.freed = True
            eventSet.cond.notify_all()
        if eventSet in self._sets:
            self._sets.remove(eventSet)
