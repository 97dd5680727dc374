"""Command templates run as argument lists, never through a shell (controller executors, agent hooks).

A template is split like a shell line once, when it is configured; each argument is then filled in on
its own with ``str.format`` placeholders, so a value can never add, split or quote arguments.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from string import Formatter

from gpuwatch.config import ConfigError


def parse_template(template: str | Sequence[str], allowed: Iterable[str], setting: str) -> list[str]:
    """The argument list of `template` (a string is split with shlex); ConfigError if it is empty, its
    program is not fixed, or it uses a placeholder outside `allowed` (or any format spec or conversion)."""
    try:
        argv = shlex.split(template) if isinstance(template, str) else [str(a) for a in template]
    except ValueError as exc:
        raise ConfigError(f"setting {setting!r}: cannot split {template!r}: {exc}") from exc
    if not argv:
        raise ConfigError(
            f"setting {setting!r} is empty; give a command such as '/usr/local/bin/drain {{host}}'"
        )
    allowed = set(allowed)
    for i, arg in enumerate(argv):
        try:
            parts = list(Formatter().parse(arg))
        except ValueError as exc:
            raise ConfigError(f"setting {setting!r}: argument {arg!r}: {exc}") from exc
        for _, name, spec, conversion in parts:
            if name is None:
                continue
            if i == 0:
                raise ConfigError(
                    f"setting {setting!r}: the program {arg!r} must be fixed, not a placeholder"
                )
            if name not in allowed or spec or conversion:
                raise ConfigError(
                    f"setting {setting!r}: placeholder {{{name}}} is not allowed; use {', '.join(sorted(allowed))}"
                )
    return argv


def fill(argv: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Each argument of a parsed template with its placeholders replaced (one argument stays one)."""
    return [arg.format_map(values) for arg in argv]


@dataclass(frozen=True)
class Completed:
    """How a command ended: `returncode` (None when killed at the timeout) and its output tails."""

    returncode: int | None
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self, limit: int = 300) -> str:
        """A line for outcomes and logs: exit status and the end of stderr (or stdout)."""
        status = "timed out (killed)" if self.returncode is None else f"exit {self.returncode}"
        tail = (self.stderr.strip() or self.stdout.strip())[-limit:]
        return f"{status}: {tail}" if tail else status


def child_env() -> dict[str, str]:
    """This process's environment without GPUWATCH_* variables, which may hold keys and passwords."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_")}


def run_argv(argv: Sequence[str], *, timeout_s: float) -> Completed:
    """Runs `argv` (no shell) in its own session with stdin closed; kills the whole session at the timeout.

    Raises OSError when the program cannot be started (e.g. not found or not executable).
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_env(),
        start_new_session=True,  # so a timeout kills the programs it started too
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        code = None
    return Completed(code, out.decode(errors="replace")[-4000:], err.decode(errors="replace")[-4000:])
