"""The node agent's command listener: verifies signed commands for this host, asks jobs to checkpoint, throttles.

`CommandListener` reads `settings.topic_commands` in a consumer group of its own (one per host), keeps
the messages keyed by its host, and checks each with `gpuwatch.signing.verify`: unsigned, forged,
malformed, expired and replayed commands, and commands signed for another host, are refused. An accepted
checkpoint command runs the handler (`CheckpointHandler`: signal the processes NVML reports on that GPU,
or run a hook); `throttle` and `restore` run the power limiter (`producers/throttle.py`: a power limit or
locked clocks) when the agent has one (`agent_throttle_state_file` set), and are refused as
unsupported_action otherwise. Every accepted or refused command is logged with its reason and acknowledged on
`settings.topic_outcomes` as a `gpuwatch.command_ack/1` record keyed by host. Keys are never logged.

Start it next to the sampler: ``threading.Thread(target=listener.run, args=(stop,), daemon=True).start()``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import orjson
from confluent_kafka import Message

from gpuwatch.argv import fill, parse_template, run_argv
from gpuwatch.config import ConfigError, Settings
from gpuwatch.kafka import BatchLoop, Output, Processed, ensure_topics
from gpuwatch.schemas.codecs import DecodeError, command_from_builtins, encode_command_ack
from gpuwatch.schemas.records import MAX_GPU_INDEX, Command, CommandAck
from gpuwatch.signing import (
    CommandRejected,
    FileNonceStore,
    MemoryNonceStore,
    NonceStore,
    parse_keys,
    verify,
)

if TYPE_CHECKING:
    from .throttle import PowerLimiter

log = logging.getLogger(__name__)

HOOK_PLACEHOLDERS = ("host", "gpu_index", "uuid", "pids", "id")


@dataclass(frozen=True)
class Handled:
    """What the handler did with an accepted command: `ok`, a line for humans, the processes it reached."""

    ok: bool
    detail: str
    pids: tuple[int, ...] = field(default=())


Handler = Callable[[Command], Handled]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class CheckpointHandler:
    """Asks the processes on one GPU to checkpoint: sends them `signal_name`, or runs `hook` instead.

    `nvml` is an initialised pynvml module (or a stand-in with nvmlDeviceGetHandleByIndex,
    nvmlDeviceGetUUID and nvmlDeviceGetComputeRunningProcesses). PIDs are NVML's, i.e. of the host's PID
    namespace: a containerised agent needs hostPID. A command whose uuid is not the GPU's is refused
    (the card at that index was replaced). `hook` is a template (no shell) with {host} {gpu_index}
    {uuid} {pids} (comma-separated) {id}.
    """

    def __init__(
        self,
        nvml: Any,
        *,
        host: str,
        signal_name: str = "SIGUSR1",
        hook: str | Sequence[str] = "",
        timeout_s: float = 60.0,
    ) -> None:
        try:
            self.signal = signal.Signals[signal_name.upper()]
        except KeyError:
            raise ConfigError(
                f"setting 'agent_checkpoint_signal': {signal_name!r} is not a signal name"
            ) from None
        self.nvml = nvml
        self.host = host
        self.hook = parse_template(hook, HOOK_PLACEHOLDERS, "agent_checkpoint_hook") if hook else None
        self.timeout_s = timeout_s

    def pids(self, gpu_index: int, uuid: str) -> list[int]:
        """PIDs of the compute processes on GPU `gpu_index`; ValueError if its uuid is not `uuid`."""
        handle = self.nvml.nvmlDeviceGetHandleByIndex(gpu_index)
        actual = _text(self.nvml.nvmlDeviceGetUUID(handle))
        if uuid and actual != uuid:
            raise ValueError(f"GPU {gpu_index} is {actual}, the command names {uuid}")
        return sorted({int(p.pid) for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle)})

    def __call__(self, command: Command) -> Handled:
        gpu, uuid = command.gpu_index, command.uuid
        try:
            pids = self.pids(gpu, uuid)
        except Exception as exc:  # NVMLError and the uuid check
            return Handled(False, f"cannot list the processes on GPU {gpu}: {exc}")
        if self.hook is not None:
            values = {"host": self.host, "gpu_index": str(gpu), "uuid": uuid, "id": command.id}
            argv = fill(self.hook, {**values, "pids": ",".join(map(str, pids))})
            try:
                done = run_argv(argv, timeout_s=self.timeout_s)
            except OSError as exc:
                return Handled(
                    False, f"cannot run {argv[0]}: {exc}; check 'agent_checkpoint_hook'", tuple(pids)
                )
            return Handled(done.ok, f"hook {argv[0]}: {done.describe()}", tuple(pids))
        if not pids:
            return Handled(True, f"no compute processes on GPU {gpu}; nothing to checkpoint")
        reached, errors = [], []
        for pid in pids:
            try:
                os.kill(pid, self.signal)
                reached.append(pid)
            except ProcessLookupError:
                errors.append(f"{pid} gone")
            except PermissionError:
                errors.append(f"{pid} not permitted")
        detail = f"sent {self.signal.name} to {len(reached)} of {len(pids)} processes on GPU {gpu} {reached}"
        if errors:
            detail += f" ({', '.join(errors)})"
        return Handled(bool(reached), detail, tuple(reached))


class CommandListener:
    """Receives, verifies and executes the commands for `host` (see the module docstring).

    `keys` verify signatures (current and previous keys during a rotation); `seen_nonce_store`
    remembers accepted nonces (a `FileNonceStore` survives restarts); `handler` executes accepted
    checkpoint commands, `limiter` throttle and restore commands (None: refused); `clock` gives unix seconds.
    """

    def __init__(
        self,
        settings: Settings,
        host: str,
        *,
        keys: Sequence[bytes],
        seen_nonce_store: NonceStore,
        handler: Handler,
        limiter: PowerLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not keys:
            raise ConfigError("the command listener needs 'command_signing_key' (the controller's key)")
        self.settings = settings
        self.host = host
        self._keys = list(keys)
        self.nonces = seen_nonce_store
        self.handler = handler
        self.limiter = limiter
        self.clock = clock

    @classmethod
    def from_settings(cls, settings: Settings, host: str, nvml: Any) -> CommandListener:
        """A listener with `command_signing_key`, `agent_nonce_file` and a `CheckpointHandler` built from
        `agent_checkpoint_signal` / `agent_checkpoint_hook`, and a power limiter keeping its state in
        `agent_throttle_state_file` (none when that is empty). ConfigError when no key is set."""
        store: NonceStore = (
            FileNonceStore(settings.agent_nonce_file) if settings.agent_nonce_file else MemoryNonceStore()
        )
        handler = CheckpointHandler(
            nvml,
            host=host,
            signal_name=settings.agent_checkpoint_signal,
            hook=settings.agent_checkpoint_hook,
            timeout_s=settings.controller_timeout_s,
        )
        limiter = None
        if settings.agent_throttle_state_file:
            from .throttle import PowerLimiter, ThrottleState

            limiter = PowerLimiter(nvml, ThrottleState(settings.agent_throttle_state_file))
        return cls(
            settings,
            host,
            keys=parse_keys(settings.command_signing_key),
            seen_nonce_store=store,
            handler=handler,
            limiter=limiter,
        )

    def group_id(self) -> str:
        """Consumer group: one per host, so every agent sees every command and keeps its own."""
        return f"{self.settings.stream_app_id}-agent-{self.host}"

    def process(self, key: bytes | str | None, value: bytes | None) -> CommandAck | None:
        """Verifies and executes one message; returns its ack record, or None if it is for another host."""
        if key is None or _text(key) != self.host:
            return None
        now = self.clock()
        parsed: Any = None
        try:
            try:
                parsed = orjson.loads(value or b"")
            except orjson.JSONDecodeError:
                raise CommandRejected("malformed", "not JSON") from None
            # The MAC covers the object as sent, unknown fields included: verified before it is read as a Command.
            verify(parsed, self._keys, now=now, seen_nonces=self.nonces)
            command = self._checked(parsed)
        except CommandRejected as exc:
            log.warning(
                "command %r for %s refused: %s (%s)", _field(parsed, "id"), self.host, exc.reason, exc.detail
            )
            return self._ack(parsed, now, accepted=False, reason=exc.reason, ok=False, detail=exc.detail)
        try:
            done = self.handler(command) if command.action == "checkpoint" else self._limiter()(command)
        except Exception as exc:  # a handler bug must not stop the listener; it is acknowledged as failed
            log.exception("command %s: handler failed", command.id)
            done = Handled(False, f"handler raised {type(exc).__name__}: {exc}")
        (log.info if done.ok else log.warning)(
            "command %s (%s GPU %s) accepted: %s", command.id, command.action, command.gpu_index, done.detail
        )
        return self._ack(
            parsed, now, accepted=True, reason="accepted", ok=done.ok, detail=done.detail, pids=done.pids
        )

    def _checked(self, parsed: dict[str, Any]) -> Command:
        # authentic by now; these catch a signed command meant for another host or a newer agent
        try:
            command = command_from_builtins(parsed)
        except DecodeError as exc:
            raise CommandRejected("malformed", exc.reason) from None
        if command.host != self.host:
            raise CommandRejected("wrong_host", f"signed for {command.host!r}, this is {self.host}")
        if command.action in ("throttle", "restore"):
            if self.limiter is None:
                raise CommandRejected("unsupported_action", f"this agent cannot {command.action}: set "
                                      "'agent_throttle_state_file' (where it saves the limit it changes)")  # fmt: skip
            if command.action == "throttle":
                _check_throttle(command)
        elif command.action != "checkpoint":
            raise CommandRejected(
                "unsupported_action", f"agents checkpoint, throttle and restore, not {command.action!r}"
            )
        return command

    def _limiter(self) -> PowerLimiter:
        assert self.limiter is not None  # _checked refused throttle and restore without one
        return self.limiter

    def _ack(
        self,
        command: Any,
        now: float,
        *,
        accepted: bool,
        reason: str,
        ok: bool,
        detail: str,
        pids: Sequence[int] = (),
    ) -> CommandAck:
        """The ack of a command; `command` is the object as received (it may be malformed: fields that are not a
        short plain value of the right type are echoed as null)."""
        gpu = _field(command, "gpu_index")
        return CommandAck(
            id=_text_field(command, "id"),
            host=self.host,
            gpu_index=gpu if type(gpu) is int and 0 <= gpu <= MAX_GPU_INDEX else None,
            action=_text_field(command, "action"),
            nonce=_text_field(command, "nonce"),
            accepted=accepted,
            reason=reason,
            ok=ok,
            detail=detail,
            pids=list(pids),
            at=now,
        )

    def acks(self, batch: list[Message]) -> Processed:
        """Verifies and executes a batch of commands; their acks are what goes to Kafka."""
        outputs = []
        for msg in batch:
            ack = self.process(msg.key(), msg.value())
            if ack is not None:
                outputs.append(Output(self.settings.topic_outcomes, self.host.encode(), encode_command_ack(ack)))
        return Processed(outputs)

    def run(self, stop: threading.Event, *, poll_timeout_s: float = 0.5) -> None:
        """Consumes `topic_commands` until `stop` is set, acknowledging each command on `topic_outcomes`; a
        command's offset is committed once Kafka has its ack (`BatchLoop`)."""
        ensure_topics(self.settings, [self.settings.topic_commands, self.settings.topic_outcomes])
        if self.limiter is not None:  # a throttle still in the state file outlived the agent that set it
            self.limiter.restore_all("agent start")
            expiry = threading.Thread(target=self.limiter.run_expiry, args=(stop,), name="gpuwatch-throttle",
                                      daemon=True)  # fmt: skip
            expiry.start()
        log.info("listening for signed commands for %s on %s", self.host, self.settings.topic_commands)
        loop = BatchLoop(self.settings, name="agent-commands", group=self.group_id(),
                         topics=[self.settings.topic_commands], process=self.acks, max_batch=100,
                         poll_timeout_s=poll_timeout_s, batch_metrics=False, lag_metrics=False)  # fmt: skip
        loop.run(stop)


THROTTLE_LIMITS = ("power_limit_w", "power_limit_frac", "sm_clock_max_mhz", "sm_clock_frac")


def _check_throttle(command: Command) -> None:
    """A throttle names one limit (a power limit in watts or as a share of the default, or a clock ceiling in MHz
    or as a share of the maximum clock) and a duration, or it is malformed."""
    limits = [f for f in THROTTLE_LIMITS if getattr(command, f) is not msgspec.UNSET]
    if len(limits) != 1:
        raise CommandRejected("malformed", f"a throttle command needs exactly one of {', '.join(THROTTLE_LIMITS)}, "
                              f"got {', '.join(limits) or 'none'}")  # fmt: skip
    if not isinstance(command.duration_s, float):
        raise CommandRejected("malformed", "a throttle command needs duration_s")


def _field(command: Any, name: str) -> Any:
    """A field of a possibly malformed command, only if it is a short plain value (acks and logs)."""
    value = command.get(name) if isinstance(command, dict) else None
    if isinstance(value, str):
        return value[:128]
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text_field(command: Any, name: str) -> str | None:
    """A text field of a possibly malformed command for its ack: at most 128 characters, None if not text."""
    value = _field(command, name)
    return value if isinstance(value, str) else None
