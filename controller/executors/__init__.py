"""Executors carry out remediation events; one module per kind (dry-run now; command, webhook, Slurm and
Kubernetes later). The controller owns de-duplication, timing and recording; an executor only acts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from gpuwatch.config import ConfigError, Settings


@dataclass(frozen=True)
class Outcome:
    """What executing one remediation event did: `ok`, a line for humans, and whether it was only a dry run."""

    ok: bool
    detail: str
    dry_run: bool = False


@runtime_checkable
class Executor(Protocol):
    """Carries out a decoded `gpuwatch.remediation/1` event (action checkpoint, migrate or reboot).

    `execute` should return a failed Outcome rather than raise; an exception is recorded as a failure too.
    It runs on the controller's thread: long operations block the next event.
    """

    name: str

    def execute(self, event: dict[str, Any]) -> Outcome: ...


def make_executor(settings: Settings) -> Executor:
    """The executor named by `settings.controller_executor`."""
    if settings.controller_executor == "dry-run":
        from .dry_run import DryRunExecutor

        return DryRunExecutor()
    raise ConfigError(
        f"setting 'controller_executor': {settings.controller_executor!r} is not available yet; use 'dry-run'"
    )
