"""NVML sampler: one `gpuwatch.samples/1` GPU sample per GPU per call, from the real pynvml or a stand-in.

`NvmlSampler(pynvml)` takes the module as a parameter (`producers.fake_nvml.FakeNvml` in tests and the
benchmark). Counters come from one batched `nvmlDeviceGetFieldValues` call per GPU; a group of counters
the driver cannot batch falls back to its own call (`nvmlDeviceGetTotalEccErrors`, ...). A field the GPU
does not support is null. A GPU that NVML reports lost (NVML_ERROR_GPU_IS_LOST, or NVML_ERROR_UNKNOWN) is
returned with `lost: true` and every value null; the next sample tries it again. Counters are reported as
read: a driver reload shows up as a lower value, which consumers treat as a reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gpuwatch.producers.xid_events import XidCollector
from gpuwatch.schemas import fields as F

log = logging.getLogger(__name__)

# NVML return codes (stable ABI values, the same in every nvidia-ml-py release).
_NOT_SUPPORTED, _FUNCTION_NOT_FOUND = 3, 13
_DRIVER_NOT_LOADED, _LIBRARY_NOT_FOUND, _RM_VERSION_MISMATCH = 9, 12, 18
_GPU_IS_LOST, _GPU_NOT_FOUND, _UNKNOWN = 15, 28, 999
_SKIP = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND})  # the field is null; not an error
_LOST = frozenset({_GPU_IS_LOST, _GPU_NOT_FOUND, _UNKNOWN})
_NO_LIBRARY = {
    _LIBRARY_NOT_FOUND: "libnvidia-ml.so.1 was not found: install the NVIDIA driver, or on Kubernetes run the "
    "agent with the NVIDIA container runtime (runtimeClassName: nvidia) so the library is mounted",
    _DRIVER_NOT_LOADED: "the NVIDIA kernel driver is not loaded (is this a GPU node? try `nvidia-smi`)",
    _RM_VERSION_MISMATCH: "the NVML library and the kernel driver have different versions: reboot the node "
    "or reload the driver",
}

# Batched counters: (field id, pynvml constant name, key). The ids are NVML's stable numbers.
_FIELDS: tuple[tuple[int, str, str], ...] = (
    (3, "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", "ecc_sbe_volatile"),
    (4, "NVML_FI_DEV_ECC_DBE_VOL_TOTAL", "ecc_dbe_volatile"),
    (5, "NVML_FI_DEV_ECC_SBE_AGG_TOTAL", "ecc_sbe_aggregate"),
    (6, "NVML_FI_DEV_ECC_DBE_AGG_TOTAL", "ecc_dbe_aggregate"),
    (29, "NVML_FI_DEV_RETIRED_SBE", "retired_sbe"),
    (30, "NVML_FI_DEV_RETIRED_DBE", "retired_dbe"),
    (31, "NVML_FI_DEV_RETIRED_PENDING", "retired_pages_pending"),
    (142, "NVML_FI_DEV_REMAPPED_COR", "remapped_rows_correctable"),
    (143, "NVML_FI_DEV_REMAPPED_UNC", "remapped_rows_uncorrectable"),
    (144, "NVML_FI_DEV_REMAPPED_PENDING", "remap_pending"),
    (145, "NVML_FI_DEV_REMAPPED_FAILURE", "remap_failure"),
    (94, "NVML_FI_DEV_PCIE_REPLAY_COUNTER", "pcie_replay"),
    (38, "NVML_FI_DEV_NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", "nvlink_crc_flit"),
    (45, "NVML_FI_DEV_NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", "nvlink_crc_data"),
    (52, "NVML_FI_DEV_NVLINK_REPLAY_ERROR_COUNT_TOTAL", "nvlink_replay_errors"),
    (59, "NVML_FI_DEV_NVLINK_RECOVERY_ERROR_COUNT_TOTAL", "nvlink_recovery_errors"),
    (74, "NVML_FI_DEV_PERF_POLICY_POWER", "power_violation_ns"),
    (75, "NVML_FI_DEV_PERF_POLICY_THERMAL", "thermal_violation_ns"),
)
_GROUP = {
    "ecc_sbe_volatile": "ecc", "ecc_dbe_volatile": "ecc", "ecc_sbe_aggregate": "ecc", "ecc_dbe_aggregate": "ecc",
    "retired_sbe": "retired", "retired_dbe": "retired", "retired_pages_pending": "retired",
    "remapped_rows_correctable": "remap", "remapped_rows_uncorrectable": "remap", "remap_pending": "remap",
    "remap_failure": "remap", "pcie_replay": "pcie_replay", "nvlink_crc_flit": "nvlink",
    "nvlink_crc_data": "nvlink", "nvlink_replay_errors": "nvlink", "nvlink_recovery_errors": "nvlink",
    "power_violation_ns": "violation", "thermal_violation_ns": "violation",
}  # fmt: skip
_ALL_GROUPS = frozenset(_GROUP.values())
# nvmlValueType_t -> member of the nvmlValue_t union
_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
_GPU_KEYS = ("gpu_index", "uuid") + F.ALL_NUMERIC + F.ALL_FLAGS + ("throttle_reasons", "xid")


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used on this machine (library missing, driver not loaded, no GPU); the message says why."""


class _Lost(Exception):
    """Internal: an NVML call said the GPU is gone."""


class _Device:
    __slots__ = ("index", "handle", "uuid", "lost", "width_max", "gen_max", "statics_read", "nvlinks")

    def __init__(self, index: int) -> None:
        self.index = index
        self.handle: Any = None
        self.uuid = ""
        self.lost = False
        self.width_max: int | None = None
        self.gen_max: int | None = None
        self.statics_read = False
        self.nvlinks: list[int] | None = None  # discovered on first use of the one-call-per-link path


class NvmlSampler:
    """Reads every GPU on the node through `nvml` (the pynvml module or a stand-in with its signatures).

    Raises NvmlUnavailable from the constructor when NVML cannot start or sees no GPU. `read()` never
    raises for a GPU problem: unsupported fields are null, a lost GPU is `lost: true`. `errors` counts
    unexpected NVML errors (not NotSupported, not a lost GPU). With `xid_events=True` a background
    thread collects XIDs from an NVML event set (see XidCollector) and `read()` reports each one once.
    """

    def __init__(self, nvml: Any, *, xid_events: bool = True, xid_wait_ms: int = 1000) -> None:
        self._nvml = nvml
        self._err = nvml.NVMLError
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            reason = _NO_LIBRARY.get(code, f"nvmlInit failed: {exc} (NVML error {code})")
            raise NvmlUnavailable(f"NVML is not usable here: {reason}") from None
        self._initialized = True
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            self.close()
            raise NvmlUnavailable(f"NVML cannot count the GPUs: {exc}; check `nvidia-smi`") from None
        if not 0 < count <= 64:
            self.close()
            raise NvmlUnavailable(f"NVML sees {count} GPUs; the agent needs 1 to 64 (check `nvidia-smi`)")
        self.errors = 0
        # NVML query (function, or field-value key) -> "read", "unsupported" or "failed: <error>", as last seen;
        # the GPU check (`gpuwatch bench gpu`) lists it, so an operator sees what this driver and board answer.
        self.query_status: dict[str, str] = {}
        self.devices = [_Device(i) for i in range(count)]
        for d in self.devices:
            self._acquire(d)
        self._field_ids = [getattr(nvml, name, fid) for fid, name, _ in _FIELDS]
        self._field_keys = [key for _, _, key in _FIELDS]
        self._batch = hasattr(nvml, "nvmlDeviceGetFieldValues")
        # Newer drivers call throttle reasons "clock events"; older nvidia-ml-py only has the old name.
        self._throttle_fn: Callable[[Any], int] = (
            getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
            or nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        self._c = {name: getattr(nvml, name, default) for name, default in (
            ("NVML_TEMPERATURE_GPU", 0), ("NVML_CLOCK_SM", 1), ("NVML_CLOCK_MEM", 2), ("NVML_VOLATILE_ECC", 0),
            ("NVML_AGGREGATE_ECC", 1), ("NVML_MEMORY_ERROR_TYPE_CORRECTED", 0),
            ("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1), ("NVML_PERF_POLICY_POWER", 0),
            ("NVML_PERF_POLICY_THERMAL", 1), ("NVML_NVLINK_MAX_LINKS", 18), ("NVML_NVLINK_ERROR_DL_REPLAY", 0),
            ("NVML_NVLINK_ERROR_DL_RECOVERY", 1), ("NVML_NVLINK_ERROR_DL_CRC_FLIT", 2),
            ("NVML_NVLINK_ERROR_DL_CRC_DATA", 3),
        )}  # fmt: skip
        self.xids: XidCollector | None = None
        if xid_events:
            self.xids = XidCollector(nvml, [(d.index, d.handle) for d in self.devices if d.handle is not None],
                                     wait_ms=xid_wait_ms)  # fmt: skip
            self.xids.start()

    @property
    def nvml(self) -> Any:
        """The initialised NVML module this sampler reads (shared with the command listener)."""
        return self._nvml

    @property
    def gpu_count(self) -> int:
        return len(self.devices)

    @property
    def lost_count(self) -> int:
        """GPUs reported lost in the last read."""
        return sum(d.lost for d in self.devices)

    def read(self) -> list[dict]:
        """One GPU sample dict per GPU (every field of schemas/fields.py), XIDs since the last read included."""
        xids = self.xids.drain() if self.xids is not None else {}
        return [self._read(d, xids.get(d.index, [])) for d in self.devices]

    def close(self) -> None:
        """Stops the XID thread and shuts NVML down; safe to call twice."""
        if getattr(self, "xids", None) is not None:
            self.xids.stop()  # idempotent; the collector's counts stay readable
        if self._initialized:
            self._initialized = False
            try:
                self._nvml.nvmlShutdown()
            except self._err as exc:
                log.debug("nvmlShutdown: %s", exc)

    # ----- internals

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args); None when unsupported or on an unexpected error (counted); raises _Lost for a lost GPU."""
        name = getattr(fn, "__name__", str(fn))
        try:
            value = fn(*args)
        except self._err as exc:
            code = getattr(exc, "value", None)
            if code in _SKIP:
                self.query_status[name] = "unsupported"
                return None
            if code in _LOST:
                raise _Lost from None
            self.errors += 1
            self.query_status[name] = f"failed: {exc}"
            log.debug("%s: NVML error %s", name, exc)
            return None
        self.query_status[name] = "read"
        return value

    def _acquire(self, d: _Device) -> bool:
        """(Re)gets the handle and UUID of a device; False (and d.lost) when NVML cannot reach it."""
        try:
            d.handle = self._call(self._nvml.nvmlDeviceGetHandleByIndex, d.index)
            uuid = self._call(self._nvml.nvmlDeviceGetUUID, d.handle) if d.handle is not None else None
        except _Lost:
            d.lost = True
            return False
        if d.handle is None:
            d.lost = True
            return False
        if uuid is not None:
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            if d.uuid and uuid != d.uuid:
                log.warning("GPU %d changed UUID from %s to %s (board replaced?)", d.index, d.uuid, uuid)
                d.statics_read, d.nvlinks = False, None
            d.uuid = uuid
        return True

    def _read(self, d: _Device, xid: list[int]) -> dict:
        if d.lost and not self._acquire(d):
            return self._lost_sample(d, xid)
        try:
            g = self._read_live(d)
        except _Lost:
            if not d.lost:
                log.warning("GPU %d (%s) is lost: NVML says it fell off the bus", d.index, d.uuid)
            d.lost = True
            return self._lost_sample(d, xid)
        if d.lost:
            log.warning("GPU %d (%s) answers NVML again", d.index, d.uuid)
        d.lost = False
        g["xid"] = xid
        return g

    def _lost_sample(self, d: _Device, xid: list[int]) -> dict:
        g = dict.fromkeys(_GPU_KEYS)
        g.update(gpu_index=d.index, uuid=d.uuid, lost=True, xid=xid)
        return g

    def _read_live(self, d: _Device) -> dict:
        n, c, h, k = self._nvml, self._call, d.handle, self._c
        temp = c(n.nvmlDeviceGetTemperature, h, k["NVML_TEMPERATURE_GPU"])  # first: a lost GPU fails here
        power = c(n.nvmlDeviceGetPowerUsage, h)
        limit = c(n.nvmlDeviceGetEnforcedPowerLimit, h)
        mem = c(n.nvmlDeviceGetMemoryInfo, h)
        util = c(n.nvmlDeviceGetUtilizationRates, h)
        if not d.statics_read:
            errors = self.errors
            d.width_max = c(n.nvmlDeviceGetMaxPcieLinkWidth, h)
            d.gen_max = c(n.nvmlDeviceGetMaxPcieLinkGeneration, h)
            d.statics_read = self.errors == errors  # retry next time after an unexpected error
        v = self._counters(d)
        sbe, dbe = v.get("retired_sbe"), v.get("retired_dbe")
        flit, data = v.get("nvlink_crc_flit"), v.get("nvlink_crc_data")
        pv, tv = v.get("power_violation_ns"), v.get("thermal_violation_ns")
        return {
            "gpu_index": d.index,
            "uuid": d.uuid,
            "temp_c": temp,
            "power_w": None if power is None else power / 1000.0,
            "power_limit_w": None if limit is None else limit / 1000.0,
            "mem_used_mib": None if mem is None else int(mem.used) >> 20,
            "mem_total_mib": None if mem is None else int(mem.total) >> 20,
            "util_gpu_pct": None if util is None else util.gpu,
            "sm_clock_mhz": c(n.nvmlDeviceGetClockInfo, h, k["NVML_CLOCK_SM"]),
            "fan_pct": c(n.nvmlDeviceGetFanSpeed, h),
            "ecc_sbe_volatile": v.get("ecc_sbe_volatile"),
            "ecc_dbe_volatile": v.get("ecc_dbe_volatile"),
            "ecc_sbe_aggregate": v.get("ecc_sbe_aggregate"),
            "ecc_dbe_aggregate": v.get("ecc_dbe_aggregate"),
            "retired_pages": None if sbe is None and dbe is None else (sbe or 0) + (dbe or 0),
            "remapped_rows_correctable": v.get("remapped_rows_correctable"),
            "remapped_rows_uncorrectable": v.get("remapped_rows_uncorrectable"),
            "pcie_replay": v.get("pcie_replay"),
            "nvlink_crc_errors": None if flit is None and data is None else (flit or 0) + (data or 0),
            "mem_clock_mhz": c(n.nvmlDeviceGetClockInfo, h, k["NVML_CLOCK_MEM"]),
            "util_mem_pct": None if util is None else util.memory,
            "pcie_link_width": c(n.nvmlDeviceGetCurrPcieLinkWidth, h),
            "pcie_link_width_max": d.width_max,
            "pcie_link_gen": c(n.nvmlDeviceGetCurrPcieLinkGeneration, h),
            "pcie_link_gen_max": d.gen_max,
            "nvlink_replay_errors": v.get("nvlink_replay_errors"),
            "nvlink_recovery_errors": v.get("nvlink_recovery_errors"),
            "power_violation_us": None if pv is None else pv // 1000,  # NVML counts nanoseconds
            "thermal_violation_us": None if tv is None else tv // 1000,
            "remap_pending": _flag(v.get("remap_pending")),
            "remap_failure": _flag(v.get("remap_failure")),
            "lost": False,
            "retired_pages_pending": _flag(v.get("retired_pages_pending")),
            "throttle_reasons": c(self._throttle_fn, h),
            "xid": [],
        }

    def _counters(self, d: _Device) -> dict[str, Any]:
        """Counter values by key: one batched call, then one call per group the batch could not answer."""
        out: dict[str, Any] = {}
        fallback = set(_ALL_GROUPS)
        if self._batch:
            try:
                fvs = self._nvml.nvmlDeviceGetFieldValues(d.handle, self._field_ids)
            except self._err as exc:
                code = getattr(exc, "value", None)
                if code in _LOST:
                    raise _Lost from None
                if code in _SKIP:
                    self._batch = False  # an old driver: use one call per counter from now on
                    self.query_status["nvmlDeviceGetFieldValues"] = "unsupported"
                    log.info("nvmlDeviceGetFieldValues is not supported here; reading counters one by one")
                else:
                    self.errors += 1
                    self.query_status["nvmlDeviceGetFieldValues"] = f"failed: {exc}"
            else:
                self.query_status["nvmlDeviceGetFieldValues"] = "read"
                fallback.clear()
                for fv, key in zip(fvs, self._field_keys, strict=True):
                    ret = fv.nvmlReturn
                    if ret == 0:
                        out[key] = getattr(fv.value, _VALUE_MEMBER.get(fv.valueType, "ullVal"))
                        self.query_status[f"field {key}"] = "read"
                    elif ret in _LOST:
                        raise _Lost
                    elif ret not in _SKIP:
                        self.query_status[f"field {key}"] = f"failed: NVML return {ret}; read by its own call"
                        fallback.add(_GROUP[key])  # e.g. an id this driver does not know
                    else:
                        self.query_status[f"field {key}"] = "unsupported"
        for group in fallback:
            out.update(self._read_group(d, group))
        return out

    def _read_group(self, d: _Device, group: str) -> dict[str, Any]:
        n, c, h, k = self._nvml, self._call, d.handle, self._c
        if group == "ecc":
            corr, unc = k["NVML_MEMORY_ERROR_TYPE_CORRECTED"], k["NVML_MEMORY_ERROR_TYPE_UNCORRECTED"]
            vol, agg = k["NVML_VOLATILE_ECC"], k["NVML_AGGREGATE_ECC"]
            ecc = n.nvmlDeviceGetTotalEccErrors
            return {
                "ecc_sbe_volatile": c(ecc, h, corr, vol),
                "ecc_dbe_volatile": c(ecc, h, unc, vol),
                "ecc_sbe_aggregate": c(ecc, h, corr, agg),
                "ecc_dbe_aggregate": c(ecc, h, unc, agg),
            }
        if group == "retired":
            # causes: NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS (0), ..._DOUBLE_BIT_ECC_ERROR (1)
            sbe = c(n.nvmlDeviceGetRetiredPages, h, 0)
            dbe = c(n.nvmlDeviceGetRetiredPages, h, 1)
            return {
                "retired_sbe": None if sbe is None else len(sbe),
                "retired_dbe": None if dbe is None else len(dbe),
                "retired_pages_pending": c(n.nvmlDeviceGetRetiredPagesPendingStatus, h),
            }
        if group == "remap":
            rows = c(n.nvmlDeviceGetRemappedRows, h)
            keys = (
                "remapped_rows_correctable",
                "remapped_rows_uncorrectable",
                "remap_pending",
                "remap_failure",
            )
            return dict.fromkeys(keys) if rows is None else dict(zip(keys, rows, strict=True))
        if group == "pcie_replay":
            return {"pcie_replay": c(n.nvmlDeviceGetPcieReplayCounter, h)}
        if group == "violation":
            pw = c(n.nvmlDeviceGetViolationStatus, h, k["NVML_PERF_POLICY_POWER"])
            th = c(n.nvmlDeviceGetViolationStatus, h, k["NVML_PERF_POLICY_THERMAL"])
            return {
                "power_violation_ns": None if pw is None else pw.violationTime,
                "thermal_violation_ns": None if th is None else th.violationTime,
            }
        return self._read_nvlink(d)

    def _link_exists(self, handle: Any, link: int) -> bool:
        """Whether NVLink `link` exists on the GPU (NVML answers InvalidArgument past the last one)."""
        try:
            self._nvml.nvmlDeviceGetNvLinkState(handle, link)
        except self._err as exc:
            if getattr(exc, "value", None) in _LOST:
                raise _Lost from None
            return False
        return True

    def _read_nvlink(self, d: _Device) -> dict[str, Any]:
        """NVLink error counters summed over the GPU's links; all null on a GPU without NVLink."""
        n, c, h, k = self._nvml, self._call, d.handle, self._c
        if d.nvlinks is None:
            d.nvlinks = [link for link in range(k["NVML_NVLINK_MAX_LINKS"]) if self._link_exists(h, link)]
        out: dict[str, Any] = dict.fromkeys(("nvlink_crc_flit", "nvlink_crc_data", "nvlink_replay_errors",
                                             "nvlink_recovery_errors"))  # fmt: skip
        counters = (("nvlink_crc_flit", k["NVML_NVLINK_ERROR_DL_CRC_FLIT"]),
                    ("nvlink_crc_data", k["NVML_NVLINK_ERROR_DL_CRC_DATA"]),
                    ("nvlink_replay_errors", k["NVML_NVLINK_ERROR_DL_REPLAY"]),
                    ("nvlink_recovery_errors", k["NVML_NVLINK_ERROR_DL_RECOVERY"]))  # fmt: skip
        for link in d.nvlinks:
            for key, counter in counters:
                value = c(n.nvmlDeviceGetNvLinkErrorCounter, h, link, counter)
                if value is not None:
                    out[key] = (out[key] or 0) + value
        return out


def _flag(value: Any) -> bool | None:
    return None if value is None else bool(value)
