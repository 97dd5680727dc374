"""`gpuwatch top` against a real redis-server filled by RiskWriter."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
import time

import redis

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer
from gpuwatch.schemas.fields import FailureMode
from gpuwatch.schemas.records import Risk
from gpuwatch.sinks.policy import set_killswitch
from gpuwatch.sinks.redis_writer import RiskWriter
from gpuwatch.sinks.top import age, run_top


def rec(host: str, gpu: int, ts: float, risk: float, mode: FailureMode = "none", **state: bool) -> Risk:
    return Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=risk, horizon_s=3600.0, mode=mode,
                model="lstm-v1", scored_at=ts, **state)


def fill(client: redis.Redis, now: float) -> None:
    RiskWriter(client).write_batch(
        [
            rec("node-0001", 0, now - 3, 1.2e-6),
            rec("node-0001", 5, now - 2, 1.0, "memory", failed=True),
            rec("node-0002", 1, now - 400, 0.0031, "thermal", alarm=True, drain=True),  # stale: silent for 400 s
            rec("node-0003", 7, now - 1, 0.00042, "interconnect", alarm=True),
        ]
    )


def table(text: str) -> list[list[str]]:
    """The data rows of a rendered table, split into columns."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#")) + 1
    return [line.split() for line in lines[start:] if line.strip()]


def test_once_prints_the_riskiest_gpus_in_order(
    redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    fill(redis_client, time.time())
    out = io.StringIO()
    assert run_top(Settings(redis_url=redis_server.url), n=3, once=True, out=out) == 0
    text = out.getvalue()
    assert "\x1b" not in text  # plain text for scripts and logs
    header = text.splitlines()[0]
    assert "3 riskiest of 4 GPUs" in header and "1 stale" in header and "kill switch off" in header
    assert "2 in alarm" in header and "1 failed" in header
    rows = table(text)
    assert [r[:5] for r in rows] == [
        ["1", "node-0001:5", "1", "FAILED", "memory"],
        ["2", "node-0002:1", "0.0031", "DRAIN", "thermal"],
        ["3", "node-0003:7", "0.00042", "ALARM", "interconnect"],
    ]
    assert rows[1][5:] in (["6m40s", "STALE", "lstm-v1"], ["6m41s", "STALE", "lstm-v1"])
    assert rows[0][6:] == ["lstm-v1"]  # fresh: no STALE mark
    assert [r[3] for r in table(run_top_text(redis_server, n=4))][-1] == "-"  # in no alarm


def run_top_text(redis_server: EmbeddedServer, n: int) -> str:
    out = io.StringIO()
    run_top(Settings(redis_url=redis_server.url), n=n, once=True, out=out)
    return out.getvalue()


def test_kill_switch_and_an_empty_fleet_are_shown(
    redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    out = io.StringIO()
    assert run_top(Settings(redis_url=redis_server.url), once=True, out=out) == 0
    assert "0 riskiest of 0 GPUs" in out.getvalue() and "no risk recorded yet" in out.getvalue()
    set_killswitch(redis_client, True, "alice: maintenance")
    out = io.StringIO()
    run_top(Settings(redis_url=redis_server.url), once=True, out=out)
    assert "kill switch ON (alice: maintenance)" in out.getvalue()


def test_live_view_redraws_with_new_data_until_stopped(
    redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    now = time.time()
    fill(redis_client, now)
    out = io.StringIO()
    stop = threading.Event()
    thread = threading.Thread(
        target=run_top,
        args=(Settings(redis_url=redis_server.url),),
        kwargs={"n": 2, "interval_s": 0.05, "out": out, "stop": stop},
    )
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while out.getvalue().count("\x1b[H\x1b[2J") < 2:
            assert time.monotonic() < deadline, "no second frame"
            time.sleep(0.02)
        RiskWriter(redis_client).write_batch([rec("node-0009", 2, time.time(), 1.0, "sudden", failed=True)])
        while "node-0009:2" not in out.getvalue().rpartition("\x1b[2J")[2]:
            assert time.monotonic() < deadline, "new data never shown"
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    last = out.getvalue().rpartition("\x1b[2J")[2]
    assert [r[1] for r in table(last)] == ["node-0009:2", "node-0001:5"]


def test_unreachable_redis_fails_once_and_is_retried_live(redis_server: EmbeddedServer) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    assert run_top(settings, once=True, out=io.StringIO()) == 1
    out = io.StringIO()
    stop = threading.Event()
    thread = threading.Thread(
        target=run_top, args=(settings,), kwargs={"interval_s": 0.05, "out": out, "stop": stop}
    )
    thread.start()
    deadline = time.monotonic() + 10
    while out.getvalue().count("unreachable") < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()


def test_the_cli_prints_once(redis_server: EmbeddedServer, redis_client: redis.Redis) -> None:
    fill(redis_client, time.time())
    env = {**os.environ, "GPUWATCH_REDIS_URL": redis_server.url}
    env.pop("GPUWATCH_CONFIG", None)
    done = subprocess.run(
        [sys.executable, "-P", "-m", "gpuwatch.apps.cli", "top", "--once", "-n", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [r[1] for r in table(done.stdout)] == ["node-0001:5", "node-0002:1"]


def test_age_reads_like_a_clock() -> None:
    assert [age(s) for s in (-3, 0, 59.9, 60, 185, 3600, 7620, 86400 * 3 + 4 * 3600)] == [
        "0s",
        "0s",
        "59s",
        "1m00s",
        "3m05s",
        "1h00m",
        "2h07m",
        "3d04h",
    ]


def test_control_characters_from_redis_never_reach_the_terminal(
    redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    RiskWriter(redis_client).write_batch([rec("evil\x1b]0;pwned\x07", 0, time.time(), 0.5)])
    set_killswitch(redis_client, True, "note\x1b[2J")
    out = io.StringIO()
    run_top(Settings(redis_url=redis_server.url), once=True, out=out)
    assert "\x1b" not in out.getvalue() and "\x07" not in out.getvalue()
    assert "evil?]0;pwned?:0" in out.getvalue() and "kill switch ON (note?[2J)" in out.getvalue()
