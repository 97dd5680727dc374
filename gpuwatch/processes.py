"""Start gpuwatch components as child processes with given settings (demo, tests, benchmarks)."""

from __future__ import annotations

import dataclasses
import os
import sys

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer, spawn_child


def settings_env(settings: Settings) -> dict[str, str]:
    """This process's environment plus every setting as a GPUWATCH_* variable, so a child sees the same."""
    env = dict(os.environ)
    env.pop("GPUWATCH_CONFIG", None)  # the variables below carry everything
    for f in dataclasses.fields(settings):
        env[f"GPUWATCH_{f.name.upper()}"] = str(getattr(settings, f.name))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_stream_worker(
    settings: Settings,
    name: str = "stream-worker",
    extra_args: list[str] | None = None,
    stats_interval_s: float = 2.0,
) -> EmbeddedServer:
    """A `gpuwatch stream` process; its stdout (a `STATS {json}` line every `stats_interval_s`, the pace its
    caller follows progress at, whatever `settings.stream_stats_interval_s` says) is a pipe on `.proc.stdout`."""
    # -P: never import the source checkout from the current directory, only the installed package.
    argv = [sys.executable, "-P", "-m", "gpuwatch.cli", "stream", *(extra_args or [])]
    env = settings_env(settings)
    env["GPUWATCH_STREAM_STATS_INTERVAL_S"] = str(stats_interval_s)
    return spawn_child(name, argv, env=env)
