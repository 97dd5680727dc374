"""`gpuwatch sink`: both sinks in one process, metrics served, clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from helpers import scrape

from gpuwatch.config import Settings
from gpuwatch.embedded import free_port
from gpuwatch.kafka import make_producer
from gpuwatch.schemas import redis_keys as k
from gpuwatch.schemas.codecs import encode_risk
from gpuwatch.schemas.records import Risk


@pytest.mark.slow
def test_sink_command_writes_risk_serves_metrics_and_stops_on_sigterm(
    settings: Settings, redis_client: redis.Redis
) -> None:
    port = free_port()
    env = {key: v for key, v in os.environ.items() if not key.startswith("GPUWATCH_")}
    env.update(
        {
            "GPUWATCH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "GPUWATCH_REDIS_URL": settings.redis_url,
            "GPUWATCH_TOPIC_RISK": settings.topic_risk,
            "GPUWATCH_TOPIC_REMEDIATION": settings.topic_remediation,
            "GPUWATCH_TOPIC_DEADLETTER": settings.topic_deadletter,
            "GPUWATCH_STREAM_APP_ID": settings.stream_app_id,
            "GPUWATCH_SINK_METRICS_PORT": str(port),
        }
    )
    # -P: import the installed package, not the source folder of the same name in the working directory.
    proc = subprocess.Popen([sys.executable, "-P", "-m", "gpuwatch.apps.cli", "sink"], env=env)
    try:
        now = time.time()
        record = Risk(
            host="svc-node",
            gpu_index=2,
            uuid="GPU-svc-2",
            ts=now,
            risk=0.42,
            horizon_s=3600.0,
            mode="none",
            model="test",
            scored_at=now,
        )
        producer = make_producer(settings)
        producer.produce(settings.topic_risk, encode_risk(record), key=b"svc-node")
        assert producer.flush(10) == 0

        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and 'host="svc-node"' not in text:
            assert proc.poll() is None, f"gpuwatch sink exited early with {proc.returncode}"
            time.sleep(0.25)
            text = scrape(port)
        assert 'gpuwatch_failure_risk{gpu="2",host="svc-node",mode="none",uuid="GPU-svc-2"} 0.42' in text
        assert redis_client.exists(k.gpu_key("svc-node", 2)), (
            "the risk sink did not write the record to Redis"
        )
        assert "gpuwatch_batch_size_messages_bucket" in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
