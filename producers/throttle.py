"""The node agent's power-limit throttle: lowers a GPU's power limit for a while and always puts it back.

`PowerLimiter` carries out two signed commands (`gpuwatch.command/1`, verified by `CommandListener` first):
`throttle` sets GPU `gpu_index`'s power limit to `power_limit_w` watts or `power_limit_frac` of the board's
default limit, clamped to the board's constraints (nvmlDeviceGetPowerManagementLimitConstraints), for
`duration_s`; `restore` puts back the limit a throttle saved (the controller sends it when risk fell). The
limit in force before the first throttle is written to the state file (`ThrottleState`, fsync'd) *before*
NVML changes it, so whatever happens next the agent knows what to put back: `restore_due` restores GPUs whose
time ran out (the listener calls it every few seconds), `restore_all` every GPU in the file (the listener
calls it when it starts: a leftover file means the agent stopped while a throttle held). A second throttle of
a throttled GPU keeps the saved original and moves the end of the hold.

Permissions: nvmlDeviceSetPowerManagementLimit needs root on the node (NVML answers NVML_ERROR_NO_PERMISSION
otherwise); in a container, a privileged one. A limit set this way lasts until the driver unloads: with
persistence mode off it is lost when the last client exits, which undoes a throttle early, never the
reverse. docs/agent.md says how to run the agent for it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct

from gpuwatch.schemas.records import Command

from .commands import Handled

log = logging.getLogger(__name__)

NVML_ERROR_NO_PERMISSION = 4  # pynvml's value (nvidia-ml-py 13.x)
NO_PERMISSION_FIX = (
    "setting a GPU power limit needs root on the node (a privileged container); run the agent as root, "
    "or leave policy_throttle_s at 0 so the policy does not ask for throttles"
)


class Saved(Struct, kw_only=True, frozen=True):
    """One throttled GPU in the state file: what to put back and until when the throttle holds."""

    gpu_index: int
    uuid: str
    original_mw: int  # the power limit in force before the first throttle, milliwatts
    limit_mw: int  # the limit the throttle set
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
            raise ValueError(f"throttle state file {self.path} is unreadable ({exc}); "
                             "check the GPUs' power limits by hand (nvidia-smi -q -d POWER), then delete it") from None
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


def _nvml_error(exc: Exception) -> str:
    if getattr(exc, "value", None) == NVML_ERROR_NO_PERMISSION:
        return f"not permitted ({exc}): {NO_PERMISSION_FIX}"
    return f"{type(exc).__name__}: {exc}"


class PowerLimiter:
    """Throttles and restores GPU power limits through `nvml` (an initialised pynvml module, or the stand-in
    with nvmlDeviceGetHandleByIndex, nvmlDeviceGetUUID, nvmlDeviceGetPowerManagementLimit,
    nvmlDeviceGetPowerManagementDefaultLimit, nvmlDeviceGetPowerManagementLimitConstraints and
    nvmlDeviceSetPowerManagementLimit). Call it with an accepted `throttle` or `restore` command."""

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
        """Saves the GPU's limit (unless a throttle already did), then sets the lower one for `duration_s`."""
        gpu, nvml = command.gpu_index, self.nvml
        if not isinstance(command.duration_s, float):
            return Handled(False, "a throttle command needs duration_s")
        with self._lock:
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(gpu)
                actual = _text(nvml.nvmlDeviceGetUUID(handle))
                if command.uuid and actual != command.uuid:
                    return Handled(False, f"GPU {gpu} is {actual}, the command names {command.uuid}; not throttled")
                lo, hi = (int(v) for v in nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle))
                current = int(nvml.nvmlDeviceGetPowerManagementLimit(handle))
                if isinstance(command.power_limit_w, float):
                    wanted = round(command.power_limit_w * 1000.0)
                elif isinstance(command.power_limit_frac, float):
                    wanted = round(command.power_limit_frac * int(nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)))
                else:
                    return Handled(False, "a throttle command needs power_limit_w or power_limit_frac")
            except Exception as exc:  # NVMLError: the GPU is lost, the query unsupported
                return Handled(False, f"cannot read GPU {gpu}'s power limits: {_nvml_error(exc)}")
            target = min(max(wanted, lo), hi)
            entries = self.state.load()
            old = entries.get(gpu)
            original = old.original_mw if old is not None and old.uuid == actual else current
            until = self.clock() + command.duration_s
            entries[gpu] = Saved(gpu_index=gpu, uuid=actual, original_mw=original, limit_mw=target, until=until,
                                 command_id=command.id)  # fmt: skip
            self.state.save(entries)  # before NVML changes anything: a crash from here on is restored at start
            try:
                nvml.nvmlDeviceSetPowerManagementLimit(handle, target)
            except Exception as exc:
                if old is None:
                    del entries[gpu]
                else:
                    entries[gpu] = old
                self.state.save(entries)
                return Handled(False, f"cannot set GPU {gpu}'s power limit to {target / 1000:g} W: {_nvml_error(exc)}")
        clamp = f" (asked {wanted / 1000:g} W; the board allows {lo / 1000:g}..{hi / 1000:g} W)" if target != wanted else ""
        return Handled(True, f"GPU {gpu} power limit {current / 1000:g} W -> {target / 1000:g} W{clamp} for "
                             f"{command.duration_s:g} s; {original / 1000:g} W saved in {self.state.path}")  # fmt: skip

    def restore(self, gpu: int, uuid: str, why: str) -> Handled:
        """Puts back the limit saved for GPU `gpu` and forgets it; a GPU with nothing saved is left alone (ok).
        If NVML refuses, the entry stays, so the next `restore_due` tries again."""
        with self._lock:
            entries = self.state.load()
            saved = entries.get(gpu)
            if saved is None:
                return Handled(True, f"GPU {gpu} is not throttled; nothing to restore ({why})")
            if uuid and saved.uuid != uuid:
                return Handled(False, f"GPU {gpu}'s throttle was of {saved.uuid}, the command names {uuid}")
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(gpu)
                actual = _text(self.nvml.nvmlDeviceGetUUID(handle))
                if actual != saved.uuid:  # the board was replaced: its limit is the new board's own
                    del entries[gpu]
                    self.state.save(entries)
                    return Handled(True, f"GPU {gpu} is now {actual}, not the throttled {saved.uuid}; forgotten ({why})")
                self.nvml.nvmlDeviceSetPowerManagementLimit(handle, saved.original_mw)
            except Exception as exc:
                return Handled(False, f"cannot restore GPU {gpu}'s power limit to {saved.original_mw / 1000:g} W "
                                      f"({why}): {_nvml_error(exc)}; retried")  # fmt: skip
            del entries[gpu]
            self.state.save(entries)
        return Handled(True, f"GPU {gpu} power limit restored to {saved.original_mw / 1000:g} W ({why})")

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
