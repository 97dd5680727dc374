"""The embedded stack starts real servers and never leaves a process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import redis
from confluent_kafka.admin import AdminClient

from gpuwatch.config import Settings
from gpuwatch.embedded import embedded_stack


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_stack_serves_kafka_and_redis_then_stops_them() -> None:
    from gpuwatch.embedded import child_pids

    before = set(child_pids())  # servers other fixtures in this session already hold
    with embedded_stack(Settings()) as s:
        assert s.kafka_bootstrap.startswith("127.0.0.1:")
        assert redis.Redis.from_url(s.redis_url).ping()
        metadata = AdminClient({"bootstrap.servers": s.kafka_bootstrap}).list_topics(timeout=10)
        assert metadata.brokers
        pids = sorted(set(child_pids()) - before)
        assert len(pids) == 2
    assert _wait_dead(pids) == []


def test_configured_services_start_nothing(redis_server, kafka_server) -> None:  # type: ignore[no-untyped-def]
    from gpuwatch.embedded import child_pids

    before = set(child_pids())
    with embedded_stack(Settings(kafka_bootstrap=kafka_server.url, redis_url=redis_server.url)) as s:
        assert s.kafka_bootstrap == kafka_server.url and s.redis_url == redis_server.url
        assert set(child_pids()) == before


_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    # Ctrl-C as in a terminal, whatever this test's runner passed down (a background job has SIGINT ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from gpuwatch.config import Settings
    from gpuwatch.embedded import embedded_stack, child_pids
    with embedded_stack(Settings()) as s:
        print(" ".join(map(str, child_pids())), flush=True)
        if sys.argv[1] == "crash":
            raise RuntimeError("boom")
        time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["sigkill", "sigterm", "sigint", "crash"])
def test_no_orphan_servers_after_parent_dies(how: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-P", "-c", _CHILD, "crash" if how == "crash" else "wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2, proc.stderr.read() if proc.stderr else ""
    if how != "crash":
        proc.send_signal({"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[how])
    # A deadline, not a timing check: each server gets up to 5 s to stop and 5 s more once killed
    # (EmbeddedServer.stop), so a loaded machine can take up to 20 s for the two.
    proc.wait(timeout=30)
    assert _wait_dead(pids) == [], f"orphaned servers after {how}: {pids}"
