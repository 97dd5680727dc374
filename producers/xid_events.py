"""XID errors from an NVML event set, collected on a background thread so none is missed between samples.

dcgm-exporter polls a last-XID gauge, so a repeated XID is invisible there. Here a thread blocks in
`nvmlEventSetWait` (critical-XID and ECC event types) and queues every XID per GPU; the sampler calls
`drain()` once per interval and puts what came since the last call into that sample's `xid` list.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_XID = 0x8  # nvmlEventTypeXidCriticalError
_SBE, _DBE = 0x1, 0x2  # nvmlEventTypeSingleBitEccError, nvmlEventTypeDoubleBitEccError
_TIMEOUT = 10  # NVML_ERROR_TIMEOUT
MAX_XIDS_PER_SAMPLE = 64  # the contract's limit per GPU sample


def _handle_key(handle: Any) -> Any:
    """A hashable identity for a device handle: the pointer value of a ctypes handle, else the object."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return handle


class XidCollector:
    """Background thread that waits on an NVML event set and queues XIDs per GPU index.

    `handles` are (gpu_index, handle) pairs. `start()` returns False when NVML offers no events here
    (then `available` is False and `drain()` returns nothing). More than 64 XIDs on one GPU in an interval
    are carried into the next samples; beyond `max_pending` per GPU the newest are dropped and counted.
    """

    def __init__(self, nvml: Any, handles: Sequence[tuple[int, Any]], *, wait_ms: int = 1000,
                 max_pending: int = 4096) -> None:  # fmt: skip
        self._nvml = nvml
        self._handles = list(handles)
        self._by_key = {_handle_key(h): i for i, h in self._handles}
        self._wait_ms = int(wait_ms)
        self._max_pending = max_pending
        self._pending: dict[int, deque[int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._set: Any = None
        self.available = False
        self.xids = 0  # XIDs received
        self.ecc_events = 0  # single/double-bit ECC events received (the counters carry the numbers)
        self.dropped = 0  # XIDs dropped because a GPU had more than max_pending queued
        self.errors = 0  # unexpected nvmlEventSetWait errors

    def start(self) -> bool:
        """Creates the event set, registers every GPU and starts the thread; False if NVML has no events here."""
        n = self._nvml
        try:
            self._set = n.nvmlEventSetCreate()
        except n.NVMLError as exc:
            log.warning("NVML event sets are not available (%s): XIDs will not be reported", exc)
            return False
        wanted = getattr(n, "nvmlEventTypeXidCriticalError", _XID) | getattr(
            n, "nvmlEventTypeSingleBitEccError", _SBE
        )
        wanted |= getattr(n, "nvmlEventTypeDoubleBitEccError", _DBE)
        registered = 0
        for index, handle in self._handles:
            try:
                types = wanted & n.nvmlDeviceGetSupportedEventTypes(handle)
                n.nvmlDeviceRegisterEvents(handle, types, self._set)
                registered += 1
            except n.NVMLError as exc:
                log.warning(
                    "GPU %d: cannot register for XID events (%s); its XIDs will not be reported", index, exc
                )
        if not registered:
            n.nvmlEventSetFree(self._set)
            self._set = None
            return False
        self.available = True
        self._thread = threading.Thread(target=self._run, name="gpuwatch-xid", daemon=True)
        self._thread.start()
        return True

    def drain(self) -> dict[int, list[int]]:
        """XIDs per GPU index since the last call, in arrival order, at most 64 per GPU (the rest wait)."""
        if not self._pending:
            return {}
        out: dict[int, list[int]] = {}
        with self._lock:
            for index, queue in list(self._pending.items()):
                n = min(len(queue), MAX_XIDS_PER_SAMPLE)
                out[index] = [queue.popleft() for _ in range(n)]
                if not queue:
                    del self._pending[index]
        return out

    def stop(self, timeout: float = 3.0) -> None:
        """Stops the thread (it wakes within wait_ms) and frees the event set."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("XID thread did not stop within %.1f s; leaving the event set allocated", timeout)
                return
            self._thread = None
        if self._set is not None:
            try:
                self._nvml.nvmlEventSetFree(self._set)
            except self._nvml.NVMLError as exc:
                log.debug("nvmlEventSetFree: %s", exc)
            self._set = None

    def _run(self) -> None:
        n, es = self._nvml, self._set
        while not self._stop.is_set():
            try:
                event = n.nvmlEventSetWait(es, self._wait_ms)
            except n.NVMLError as exc:
                if getattr(exc, "value", None) == _TIMEOUT:
                    continue
                self.errors += 1
                log.debug("nvmlEventSetWait: %s", exc)
                self._stop.wait(1.0)  # e.g. a lost GPU: do not spin
                continue
            self._record(event)

    def _record(self, event: Any) -> None:
        etype = int(event.eventType)
        if not etype & _XID:
            if etype & (_SBE | _DBE):
                self.ecc_events += 1
            return
        index = self._by_key.get(_handle_key(event.device))
        if index is None:
            try:
                index = int(self._nvml.nvmlDeviceGetIndex(event.device))
            except self._nvml.NVMLError:
                self.errors += 1
                log.warning("XID %s from a device the agent does not know; dropped", event.eventData)
                return
        code = int(event.eventData)
        self.xids += 1
        with self._lock:
            queue = self._pending.setdefault(index, deque())
            if len(queue) >= self._max_pending:
                self.dropped += 1
                return
            queue.append(code)
