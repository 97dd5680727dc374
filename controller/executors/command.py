"""Runs a configured program for each remediation, e.g. ``/usr/local/bin/drain {host} {gpu_index} {action}``.

The template is split once (like a shell line) and run as an argument list, never through a shell. The
event's values are checked first (`target_values`: an RFC 1123 host name, an int GPU index, ...), so an
event naming ``node1; rm -rf /`` is refused before anything runs. Exit 0 is success.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gpuwatch.argv import fill, parse_template, run_argv
from gpuwatch.schemas.records import Remediation

from . import Outcome, UnsafeTarget, target_values

log = logging.getLogger(__name__)

PLACEHOLDERS = ("host", "gpu_index", "action", "id", "uuid", "risk")


class CommandExecutor:
    """Runs `template` with the event's {host} {gpu_index} {action} {id} {uuid} {risk} filled in.

    `template` is a string (split with shlex) or a list of arguments; its program must be fixed.
    A run longer than `timeout_s` is killed (with its children) and recorded as a failure.
    """

    name = "command"

    def __init__(self, template: str | Sequence[str], *, timeout_s: float = 120.0) -> None:
        self.template = parse_template(template, PLACEHOLDERS, "controller_command")
        self.timeout_s = timeout_s

    def argv(self, event: Remediation) -> list[str]:
        """The argument list for `event`; raises UnsafeTarget when a value fails its check."""
        return fill(self.template, target_values(event))

    def execute(self, event: Remediation) -> Outcome:
        try:
            argv = self.argv(event)
        except UnsafeTarget as exc:
            log.warning("remediation %s refused: %s", event.id, exc)
            return Outcome(ok=False, detail=f"refused: {exc}")
        try:
            done = run_argv(argv, timeout_s=self.timeout_s)
        except OSError as exc:
            return Outcome(
                ok=False, detail=f"cannot run {argv[0]}: {exc}; check setting 'controller_command'"
            )
        detail = f"{' '.join(argv)}: {done.describe()}"
        (log.info if done.ok else log.warning)("remediation %s: %s", event.id, detail)
        return Outcome(ok=done.ok, detail=detail)
