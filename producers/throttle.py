"""The node agent's throttle: lowers a GPU's power limit or locks its clocks for a while, and always undoes it.

`PowerLimiter` carries out two signed commands (`gpuwatch.command/1`, verified by `CommandListener` first):
`throttle` either sets GPU `gpu_index`'s power limit to `power_limit_w` watts or `power_limit_frac` of the
board's default limit, clamped to the board's constraints (nvmlDeviceGetPowerManagementLimitConstraints), or
locks its graphics (SM) clock between the board's lowest supported clock and `sm_clock_max_mhz` MHz or
`sm_clock_frac` of its maximum clock, clamped to the supported range (nvmlDeviceSetGpuLockedClocks), for
`duration_s`; `restore` undoes what throttles changed (the controller sends it when risk fell). Before NVML
changes anything the state file (`ThrottleState`, fsync'd) records it: the power limit in force before the
first throttle, or that clocks are locked (NVML has no readable "previous lock": undoing one is
nvmlDeviceResetGpuLockedClocks). So whatever happens next the agent knows what to undo: `restore_due` restores
GPUs whose time ran out (the listener calls it every few seconds), `restore_all` every GPU in the file (the
listener calls it when it starts: a leftover file means the agent stopped while a throttle held). A second
throttle of a throttled GPU keeps what was saved, sets its own limit and moves the end of the hold; if it is of
the other kind, both hold (the tighter bites) until that end, and a restore undoes both.

Permissions: nvmlDeviceSetPowerManagementLimit, nvmlDeviceSetGpuLockedClocks and nvmlDeviceResetGpuLockedClocks
need root on the node (NVML answers NVML_ERROR_NO_PERMISSION otherwise); in a container, a privileged one.
Clock locking needs a Volta or newer board (NVML_ERROR_NOT_SUPPORTED otherwise). A limit or lock set this way
lasts until the driver unloads: with persistence mode off it is lost when the last client exits, which undoes a
throttle early, never the reverse. docs/agent.md says how to run the agent for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from msgspec import UNSET, Struct

from gpuwatch.schemas.records import Command

from .commands import Handled

log = logging.getLogger(__name__)

NVML_ERROR_NOT_SUPPORTED = 3  # pynvml's values (nvidia-ml-py 13.x)
NVML_ERROR_NO_PERMISSION = 4
NVML_CLOCK_GRAPHICS = 0
NO_PERMISSION_FIX = (
    "{doing} needs root on the node (a privileged container); run the agent as root, "
    "or leave policy_throttle_s at 0 so the policy does not ask for throttles"
)
DOING = {"power limit": "setting a GPU power limit", "clocks": "locking a GPU's clocks"}
NOT_SUPPORTED_FIX = {
    "clocks": 'locking clocks needs a Volta or newer board and driver; set policy_throttle_kind = "power"',
    "power limit": 'this board has no settable power limit; set policy_throttle_kind = "clocks" (Volta or newer)',
}


class Saved(Struct, kw_only=True, frozen=True):
    """One throttled GPU in the state file: what to undo and until when the throttle holds. A power throttle
    sets `original_mw` and `limit_mw`, a clock throttle `clock_max_mhz`; a GPU throttled both ways has both."""

    gpu_index: int
    uuid: str
    original_mw: int | None = None  # the power limit in force before the first power throttle, milliwatts
    limit_mw: int | None = None  # the limit the throttle set
    clock_max_mhz: int | None = None  # clocks are locked at most this high (undo: reset the lock)
    until: float  # unix time the throttle ends
    command_id: str


class ThrottleState:
    """The state file: the throttled GPUs of this node as a JSON list, rewritten atomically (temp file, fsync,
    rename) on every change. A missing file holds nothing; an unreadable one raises ValueError naming it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def load(self) -> dict[int, Saved]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            entries = msgspec.json.decode(raw, type=list[Saved])
        except msgspec.DecodeError as exc:
            raise ValueError(f"throttle state file {self.path} is unreadable ({exc}); check the GPUs' power "
                             "limits and clocks by hand (nvidia-smi -q -d POWER,CLOCK; nvidia-smi -rgc resets a "
                             "lock), then delete it") from None
        return {e.gpu_index: e for e in entries}

    def save(self, entries: dict[int, Saved]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(sorted(entries.values(), key=lambda e: e.gpu_index)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_error(exc: Exception, what: str = "power limit") -> str:
    """One line for an NVML error of a `what` ("power limit" or "clocks") call, with the fix where there is one."""
    code = getattr(exc, "value", None)
    if code == NVML_ERROR_NO_PERMISSION:
        return f"not permitted ({exc}): {NO_PERMISSION_FIX.format(doing=DOING[what])}"
    if code == NVML_ERROR_NOT_SUPPORTED:
        return f"not supported ({exc}): {NOT_SUPPORTED_FIX[what]}"
    return f"{type(exc).__name__}: {exc}"


class _Malformed(ValueError):
    """A throttle command that names no limit (the listener refuses those first)."""


@dataclass(frozen=True)
class _Plan:
    """What one throttle command will do to one GPU, read from NVML before anything changes."""

    fields: dict[str, Any]  # the state file entry's fields it sets
    apply: Callable[[], None]  # the NVML call
    target: str  # the setting, for the failure line
    done: str  # the success line, less the duration
    saved: str  # what the state file keeps


def _clocks_range(nvml: Any, handle: Any) -> tuple[int, int]:
    """The graphics clocks a lock may span: the lowest supported one (at the board's highest memory clock)
    and the board's maximum."""
    mem = max(int(c) for c in nvml.nvmlDeviceGetSupportedMemoryClocks(handle))
    lowest = min(int(c) for c in nvml.nvmlDeviceGetSupportedGraphicsClocks(handle, mem))
    return lowest, int(nvml.nvmlDeviceGetMaxClockInfo(handle, NVML_CLOCK_GRAPHICS))


class PowerLimiter:
    """Throttles and restores GPU power limits and clocks through `nvml` (an initialised pynvml module, or the
    stand-in with nvmlDeviceGetHandleByIndex, nvmlDeviceGetUUID, the power-limit calls
    (nvmlDeviceGetPowerManagementLimit, ...DefaultLimit, ...LimitConstraints, nvmlDeviceSetPowerManagementLimit)
    and the clock calls (nvmlDeviceGetSupportedMemoryClocks, nvmlDeviceGetSupportedGraphicsClocks,
    nvmlDeviceGetMaxClockInfo, nvmlDeviceSetGpuLockedClocks, nvmlDeviceResetGpuLockedClocks)). Call it with an
    accepted `throttle` or `restore` command."""

    def __init__(self, nvml: Any, state: ThrottleState, *, clock: Callable[[], float] = time.time) -> None:
        self.nvml = nvml
        self.state = state
        self.clock = clock
        self._lock = threading.Lock()  # the listener's thread and the expiry loop both restore

    def __call__(self, command: Command) -> Handled:
        if command.action == "throttle":
            return self.throttle(command)
        if command.action == "restore":
            return self.restore(command.gpu_index, command.uuid, "restore command")
        return Handled(False, f"the power limiter does not {command.action}")

    def throttle(self, command: Command) -> Handled:
        """Records what it changes (a power limit's original unless a throttle already did, or that clocks are
        locked), then sets the lower limit or locks the clocks for `duration_s`."""
        gpu, nvml = command.gpu_index, self.nvml
        if not isinstance(command.duration_s, float):
            return Handled(False, "a throttle command needs duration_s")
        clocks = command.sm_clock_max_mhz is not UNSET or command.sm_clock_frac is not UNSET
        what = "clocks" if clocks else "power limit"
        with self._lock:
            entries = self.state.load()
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(gpu)
                actual = _text(nvml.nvmlDeviceGetUUID(handle))
                if command.uuid and actual != command.uuid:
                    return Handled(False, f"GPU {gpu} is {actual}, the command names {command.uuid}; not throttled")
                old = entries.get(gpu)
                kept = old if old is not None and old.uuid == actual else None
                plan = self._clock_plan(command, handle) if clocks else self._power_plan(command, handle, kept)  # fmt: skip
            except _Malformed as exc:
                return Handled(False, str(exc))
            except Exception as exc:  # NVMLError: the GPU is lost, the query unsupported
                return Handled(False, f"cannot read GPU {gpu}'s {what}: {_nvml_error(exc, what)}")
            base = kept or Saved(gpu_index=gpu, uuid=actual, until=0.0, command_id="")
            entries[gpu] = msgspec.structs.replace(base, until=self.clock() + command.duration_s,
                                                   command_id=command.id, **plan.fields)  # fmt: skip
            self.state.save(entries)  # before NVML changes anything: a crash from here on is restored at start
            try:
                plan.apply()
            except Exception as exc:
                if old is None:
                    del entries[gpu]
                else:
                    entries[gpu] = old
                self.state.save(entries)
                error = _nvml_error(exc, what)
                return Handled(False, f"cannot set GPU {gpu}'s {what} to {plan.target}: {error}")
        return Handled(True, f"{plan.done} for {command.duration_s:g} s; {plan.saved} in {self.state.path}")

    def _power_plan(self, command: Command, handle: Any, kept: Saved | None) -> _Plan:
        nvml, gpu = self.nvml, command.gpu_index
        lo, hi = (int(v) for v in nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle))
        current = int(nvml.nvmlDeviceGetPowerManagementLimit(handle))
        if isinstance(command.power_limit_w, float):
            wanted = round(command.power_limit_w * 1000.0)
        elif isinstance(command.power_limit_frac, float):
            default = int(nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle))
            wanted = round(command.power_limit_frac * default)
        else:
            raise _Malformed("a throttle command needs power_limit_w, power_limit_frac, sm_clock_max_mhz or "
                             "sm_clock_frac")  # fmt: skip
        target = min(max(wanted, lo), hi)
        original = kept.original_mw if kept is not None and kept.original_mw is not None else current
        clamp = f" (asked {wanted / 1000:g} W; the board allows {lo / 1000:g}..{hi / 1000:g} W)" if target != wanted else ""
        return _Plan({"original_mw": original, "limit_mw": target},
                     lambda: nvml.nvmlDeviceSetPowerManagementLimit(handle, target), f"{target / 1000:g} W",
                     f"GPU {gpu} power limit {current / 1000:g} W -> {target / 1000:g} W{clamp}",
                     f"{original / 1000:g} W saved")  # fmt: skip

    def _clock_plan(self, command: Command, handle: Any) -> _Plan:
        nvml, gpu = self.nvml, command.gpu_index
        lo, hi = _clocks_range(nvml, handle)
        if isinstance(command.sm_clock_max_mhz, int):
            wanted = command.sm_clock_max_mhz
        else:
            assert isinstance(command.sm_clock_frac, float)  # throttle() chose clocks for one of the two
            wanted = round(command.sm_clock_frac * hi)
        target = min(max(wanted, lo), hi)
        clamp = f" (asked {wanted} MHz; the board supports {lo}..{hi} MHz)" if target != wanted else ""
        return _Plan({"clock_max_mhz": target}, lambda: nvml.nvmlDeviceSetGpuLockedClocks(handle, lo, target),
                     f"{lo}..{target} MHz", f"GPU {gpu} SM clock locked to {lo}..{target} MHz{clamp}",
                     "the lock recorded")  # fmt: skip

    def restore(self, gpu: int, uuid: str, why: str) -> Handled:
        """Undoes what throttles changed on GPU `gpu` (puts the saved power limit back, resets locked clocks) and
        forgets it; a GPU with nothing saved is left alone (ok). If NVML refuses, what it could not undo stays
        in the state file, so the next `restore_due` tries again."""
        with self._lock:
            entries = self.state.load()
            saved = entries.get(gpu)
            if saved is None:
                return Handled(True, f"GPU {gpu} is not throttled; nothing to restore ({why})")
            if uuid and saved.uuid != uuid:
                return Handled(False, f"GPU {gpu}'s throttle was of {saved.uuid}, the command names {uuid}")
            undone: list[str] = []
            kind = "power limit" if saved.original_mw is not None else "clocks"
            what = "clocks" if saved.original_mw is None else f"power limit to {saved.original_mw / 1000:g} W"
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(gpu)
                actual = _text(self.nvml.nvmlDeviceGetUUID(handle))
                if actual != saved.uuid:  # the board was replaced: its settings are the new board's own
                    del entries[gpu]
                    self.state.save(entries)
                    return Handled(True, f"GPU {gpu} is now {actual}, not the throttled {saved.uuid}; forgotten ({why})")
                if saved.original_mw is not None:
                    self.nvml.nvmlDeviceSetPowerManagementLimit(handle, saved.original_mw)
                    undone.append(f"power limit restored to {saved.original_mw / 1000:g} W")
                    saved = entries[gpu] = msgspec.structs.replace(saved, original_mw=None, limit_mw=None)
                if saved.clock_max_mhz is not None:
                    kind, what = "clocks", "clocks (reset the lock)"
                    self.nvml.nvmlDeviceResetGpuLockedClocks(handle)
                    undone.append("clocks unlocked")
            except Exception as exc:
                if undone:  # what was undone is not undone again
                    self.state.save(entries)
                return Handled(False, f"cannot restore GPU {gpu}'s {what} ({why}): {_nvml_error(exc, kind)}; "
                                      f"retried")  # fmt: skip
            del entries[gpu]
            self.state.save(entries)
        return Handled(True, f"GPU {gpu} {' and '.join(undone) or 'restored'} ({why})")

    def restore_due(self, now: float | None = None) -> list[Handled]:
        """Restores every GPU whose throttle has run out by `now` (default: the clock)."""
        now = self.clock() if now is None else now
        due = [e for e in self.state.load().values() if e.until <= now]
        return [self._logged(self.restore(e.gpu_index, e.uuid, "throttle time ran out")) for e in due]

    def restore_all(self, why: str = "agent start") -> list[Handled]:
        """Restores every GPU in the state file (a leftover file: the agent stopped while a throttle held)."""
        return [self._logged(self.restore(e.gpu_index, e.uuid, why)) for e in self.state.load().values()]

    def run_expiry(self, stop: threading.Event, every_s: float = 5.0) -> None:
        """Calls `restore_due` every `every_s` seconds until `stop` is set (the listener runs it in a thread)."""
        while not stop.wait(every_s):
            try:
                self.restore_due()
            except Exception:  # an unreadable state file must not stop the agent: logged, tried again
                log.exception("throttle expiry check failed")

    @staticmethod
    def _logged(done: Handled) -> Handled:
        (log.info if done.ok else log.warning)("throttle: %s", done.detail)
        return done
