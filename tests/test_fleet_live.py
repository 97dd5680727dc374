"""The fleet view from live risk in a real redis-server: `RiskClient.fleet()`, and `gpuwatch fleet --serve` as a
process exporting its gauges to Prometheus (its own metrics only) and stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest
import redis
from helpers import scrape, wait_for

from gpuwatch.apps.cli import main
from gpuwatch.apps.fleet import estimators as est
from gpuwatch.embedded import EmbeddedServer, free_port
from gpuwatch.schemas.records import Risk
from gpuwatch.sinks.redis_writer import RiskWriter
from gpuwatch.sinks.risk_client import RiskClient

HOSTS, GPUS = 5, 8


def rec(host: str, gpu: int, ts: float, risk: float, **state: Any) -> Risk:
    return Risk(host=host, gpu_index=gpu, uuid=f"GPU-{host}-{gpu}", ts=ts, risk=risk, horizon_s=3600.0, mode="none",
                model="lstm-v1", scored_at=ts, **state)


def fill(client: redis.Redis, now: float) -> np.ndarray:
    """40 GPUs: one in alarm, one failed, one silent for long; returns the risk of the GPUs not failed."""
    records = [rec(f"node-{h}", g, now - 1, 1e-5) for h in range(HOSTS) for g in range(GPUS)]
    records[3] = rec("node-0", 3, now - 1, 0.4, alarm=True)
    records[9] = rec("node-1", 1, now - 1, 1.0, failed=True, failed_since=now - 100)
    records[20] = rec("node-2", 4, now - 900, 2e-5)  # stale
    RiskWriter(client).write_batch(records)
    return np.array([r.risk for r in records if not r.failed])


def test_risk_client_reads_the_whole_fleet_in_one_round_trip(redis_client: redis.Redis) -> None:
    fill(redis_client, time.time())
    client = RiskClient(redis_client, stale_after_s=60.0)
    fleet = {(g.host, g.gpu_index): g for g in client.fleet()}
    assert len(fleet) == HOSTS * GPUS
    assert [k for k, g in fleet.items() if g.failed] == [("node-1", 1)]
    assert [k for k, g in fleet.items() if g.stale] == [("node-2", 4)]
    assert fleet[("node-0", 3)].risk == pytest.approx(0.4)
    assert client.horizon_s() == 3600.0


def test_fleet_with_redis_unreachable_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    monkeypatch.setenv("GPUWATCH_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert main(["fleet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "cannot read live risk from redis://127.0.0.1:" in err[0] and "--no-live" in err[0]
    )


def gauge(text: str, metric: str, /, **labels: str) -> float | None:
    """The value of the series of `metric` with these labels in an exposition text (None if absent)."""
    for line in text.splitlines():
        m = re.match(rf"{metric}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return None


def test_serve_waits_for_live_risk_exports_it_and_stops_on_sigterm(
    redis_server: EmbeddedServer, redis_client: redis.Redis
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUWATCH_")}
    env |= {"GPUWATCH_REDIS_URL": redis_server.url, "GPUWATCH_FLEET_METRICS_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-P", "-m", "gpuwatch.apps.cli", "fleet", "--serve", "--every", "0.3"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    logged: list[str] = []
    reader = threading.Thread(target=lambda: logged.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        wait_for(lambda: any("Redis holds no risk yet" in line for line in logged), timeout=60,
                 what="the exporter to say it waits for risk")  # fmt: skip
        assert "gpuwatch_fleet_gpus{" not in scrape(port)  # nothing to say yet
        risk = fill(redis_client, time.time())
        text = wait_for(lambda: (t := scrape(port)) and "gpuwatch_fleet_forecast_failures{" in t and t,
                        timeout=30, what="the fleet view once Redis holds risk")  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=5)
    assert proc.returncode == 0, "".join(logged)
    expected = est.window_failure_probability(risk, 3600.0, 86400.0, 1.943e-4).sum()
    assert gauge(text, "gpuwatch_fleet_forecast_failures", window="24h", estimate="value") == pytest.approx(
        expected
    )
    assert gauge(text, "gpuwatch_fleet_forecast_failures", window="7d", estimate="upper") >= 0
    assert gauge(text, "gpuwatch_fleet_gpus", state="failed") == 1.0
    assert gauge(text, "gpuwatch_fleet_gpus", state="total") == HOSTS * GPUS
    assert gauge(text, "gpuwatch_fleet_job_interruption_ratio", job_gpus="1024", estimate="value") is not None
    assert "gpuwatch_fleet_spares_needed " in text and "gpuwatch_fleet_last_update_timestamp_seconds " in text
    exported = set(re.findall(r"^# TYPE (gpuwatch_\w+)", text, re.M))
    assert exported and all(name.startswith("gpuwatch_fleet_") for name in exported), exported


def test_the_history_part_of_the_view_is_exported_per_group() -> None:
    from prometheus_client import generate_latest

    from gpuwatch.apps.fleet.history import Failure, FailureHistory
    from gpuwatch.apps.fleet.view import FleetOptions, fleet_view
    from gpuwatch.metrics import component_registry, export_fleet_view

    day = est.DAY_S
    gpus = tuple((f"node-{h}", g) for h in range(2) for g in range(8))
    failures = tuple(Failure("node-1", g, 1e9 + g * day, "memory", 1e9 + g * day + 3600) for g in range(3))
    view = fleet_view(FailureHistory(1e9, 1e9 + 30 * day, gpus, failures, {"node-0": "h100", "node-1": "a100"}),
                      None, FleetOptions())  # fmt: skip
    export_fleet_view(view, 1.0)
    text = generate_latest(component_registry("fleet")).decode()
    assert gauge(text, "gpuwatch_fleet_failures_observed", group="mode", name="memory") == 3.0
    assert gauge(text, "gpuwatch_fleet_failures_observed", group="host", name="node-0") == 0.0
    a100 = view["mtbf"]["model"]["a100"]["mtbf_gpu_days"]
    assert (
        gauge(text, "gpuwatch_fleet_mtbf_gpu_days", group="model", name="a100", estimate="upper")
        == a100["upper"]
    )
    assert gauge(
        text, "gpuwatch_fleet_mtbf_gpu_days", group="host", name="node-0", estimate="upper"
    ) == float("inf")
    assert gauge(text, "gpuwatch_fleet_gpus", state="failed") is None  # not known without live risk
