"""Executors carry out remediation events; one module per kind: dry_run, command, webhook, slurm,
kubernetes, and agent_command (checkpoint, throttle and restore requests signed for the node agent). The controller owns
de-duplication, timing and recording; an executor only acts. docs/remediation.md is the operator's guide.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from gpuwatch.config import EXECUTORS, ConfigError, Settings
from gpuwatch.schemas.fields import ACTIONS, AGENT_ACTIONS
from gpuwatch.schemas.records import Remediation

# RFC 1123 host names: letters, digits, '-' inside labels, '.' between labels; no leading '-' (not an option)
_HOST_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_UUID_RE = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,127})?")

@dataclass(frozen=True)
class Outcome:
    """What executing one remediation event did: `ok`, a line for humans, whether it was only a dry run, and
    whether the controller `skipped` it (the kill switch was on; no executor ran)."""

    ok: bool
    detail: str
    dry_run: bool = False
    skipped: bool = False


@runtime_checkable
class Executor(Protocol):
    """Carries out a decoded `gpuwatch.remediation/1` event (action checkpoint, migrate, reboot, repair, throttle or
    restore).

    `execute` should return a failed Outcome rather than raise; an exception is recorded as a failure too.
    It runs on the controller's thread: long operations block the next event.
    """

    name: str

    def execute(self, event: Remediation) -> Outcome: ...


class UnsafeTarget(ValueError):
    """An event names a host, GPU, id or action that must not reach a command line or an API path."""


def target_values(event: Remediation) -> dict[str, str]:
    """The event's host, gpu_index, action, id, uuid and risk as checked strings.

    Raises UnsafeTarget unless host is an RFC 1123 host name, gpu_index a non-negative int, action one of
    one of ACTIONS, id and uuid plain tokens ([A-Za-z0-9._-], not starting with '-'), risk in 0..1.
    """
    host, gpu, action = event.host, event.gpu_index, event.action
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise UnsafeTarget(
            f"host {host!r} is not a valid host name (RFC 1123); refused before running anything"
        )
    if type(gpu) is not int or gpu < 0:
        raise UnsafeTarget(f"gpu_index {gpu!r} is not a non-negative integer")
    if action not in ACTIONS:
        raise UnsafeTarget(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    rid, uuid, risk = event.id, event.uuid, event.risk
    if not isinstance(rid, str) or not _ID_RE.fullmatch(rid):
        raise UnsafeTarget(f"id {rid!r} is not a plain token")
    if not isinstance(uuid, str) or not _UUID_RE.fullmatch(uuid):
        raise UnsafeTarget(f"uuid {uuid!r} is not a plain token")
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not 0 <= risk <= 1:
        raise UnsafeTarget(f"risk {risk!r} is not a number in 0..1")
    return {
        "host": host,
        "gpu_index": str(gpu),
        "action": action,
        "id": rid,
        "uuid": uuid,
        "risk": f"{risk:.4f}",
    }


def short_reason(event: Remediation, limit: int = 160) -> str:
    """``gpuwatch: <action> GPU <i> [<id>]: <reason>`` in printable ASCII, at most `limit` characters."""
    text = f"gpuwatch: {event.action} GPU {event.gpu_index} [{event.id}]: {event.reason}"
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text[:limit]


class CheckpointRouter:
    """Sends the node agent's events (checkpoint, throttle, restore: `AGENT_ACTIONS`) to `checkpoint` and
    migrate/reboot/repair events to `main`."""

    def __init__(self, main: Executor, checkpoint: Executor) -> None:
        self.main = main
        self.checkpoint = checkpoint
        self.name = f"{main.name}+{checkpoint.name}"

    def execute(self, event: Remediation) -> Outcome:
        return (self.checkpoint if event.action in AGENT_ACTIONS else self.main).execute(event)


def make_executor(settings: Settings) -> Executor:
    """The executor named by `settings.controller_executor` (dry-run, command, webhook, slurm, kubernetes).

    Checkpoint, throttle and restore events go to the node agent as signed commands (`agent_command`) when
    `command_signing_key` is set. Without a key, the command and webhook executors get them like any
    other action, while slurm and kubernetes (which have no checkpoint) only log them (dry run).
    The dry-run executor never acts, key or not. Raises ConfigError naming the setting to fix.
    """
    from gpuwatch.signing import parse_keys

    from .dry_run import DryRunExecutor

    kind = settings.controller_executor
    if kind == "dry-run":
        return DryRunExecutor()
    main: Executor
    if kind == "command":
        from .command import CommandExecutor

        main = CommandExecutor(settings.controller_command, timeout_s=settings.controller_timeout_s)
    elif kind == "webhook":
        from .webhook import WebhookExecutor

        main = WebhookExecutor(
            settings.controller_webhook_url,
            key=settings.controller_webhook_key.encode() or None,
            timeout_s=settings.controller_timeout_s,
        )
    elif kind == "slurm":
        from .slurm import SlurmExecutor

        main = SlurmExecutor(settings.controller_scontrol, timeout_s=settings.controller_timeout_s)
    elif kind == "kubernetes":
        from .kubernetes import KubernetesExecutor

        main = KubernetesExecutor.from_settings(settings)
    else:
        raise ConfigError(
            f"setting 'controller_executor': {kind!r} is unknown; use one of {', '.join(EXECUTORS)}"
        )
    keys = parse_keys(settings.command_signing_key)
    if keys:
        from .agent_command import AgentCommandExecutor

        return CheckpointRouter(main, AgentCommandExecutor(settings, key=keys[0]))
    if kind in ("slurm", "kubernetes"):
        return CheckpointRouter(main, DryRunExecutor())
    return main
