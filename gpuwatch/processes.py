"""Start gpuwatch components as child processes with given settings (demo, tests, benchmarks)."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer, spawn_child
from gpuwatch.schemas.codecs import DecodeError, decode_stats_line
from gpuwatch.schemas.records import StreamStats

log = logging.getLogger(__name__)

# What a worker has reported before its first stats line.
NO_STATS = StreamStats(
    samples=0,
    rejected_samples=0,
    scored=0,
    deadletters=0,
    batches=0,
    partitions=0,
    offsets={},
    refreshed=0,
    restored_gpus=0,
    checkpointed=0,
    uptime_s=0.0,
    first_batch_at=0.0,
    last_batch_at=0.0,
    gpus_tracked=0,
    state_bytes_per_gpu=0,
)


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
    argv = [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "stream", *(extra_args or [])]
    env = settings_env(settings)
    env["GPUWATCH_STREAM_STATS_INTERVAL_S"] = str(stats_interval_s)
    return spawn_child(name, argv, env=env)


class StatsFollower:
    """Follows the `gpuwatch.stats/1` lines a stream worker started by `start_stream_worker` prints on its stdout;
    `latest` is the newest (`NO_STATS` before the first). A line that breaks the contract is logged, not used."""

    def __init__(self, proc: EmbeddedServer) -> None:
        self.proc = proc
        self.latest: StreamStats = NO_STATS
        self.bad_lines = 0
        threading.Thread(target=self._run, daemon=True, name=f"stats-{proc.name}").start()

    def _run(self) -> None:
        assert self.proc.proc.stdout is not None
        for raw in self.proc.proc.stdout:
            try:
                stats = decode_stats_line(raw)
            except DecodeError as exc:
                self.bad_lines += 1
                log.warning("%s printed a stats line that breaks gpuwatch.stats/1 (%s): %r", self.proc.name, exc,
                            raw[:200])  # fmt: skip
                continue
            if stats is not None:
                self.latest = stats

    def wait(self, pred: Callable[[StreamStats], bool], timeout: float, what: str) -> StreamStats:
        """The first stats for which `pred` holds; RuntimeError if the worker exits or `timeout` s pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            latest = self.latest
            if latest is not NO_STATS and pred(latest):
                return latest
            if not self.proc.alive():
                raise RuntimeError(
                    f"{self.proc.name} exited while waiting for {what}:\n{self.proc.log_tail(30)}"
                )
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; last stats: {self.latest}")
