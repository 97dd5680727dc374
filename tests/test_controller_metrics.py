"""`gpuwatch controller` serves remediation outcomes as Prometheus metrics on controller_metrics_port."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from helpers import scrape

from gpuwatch.config import Settings
from gpuwatch.embedded import free_port
from gpuwatch.kafka import make_producer
from gpuwatch.schemas.codecs import encode_remediation, remediation_id
from gpuwatch.schemas.records import Remediation


@pytest.mark.slow
def test_controller_counts_executed_and_duplicate_remediations(settings: Settings) -> None:
    port = free_port()
    env = {key: v for key, v in os.environ.items() if not key.startswith("GPUWATCH_")}
    env.update(
        {
            "GPUWATCH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            "GPUWATCH_REDIS_URL": settings.redis_url,
            "GPUWATCH_TOPIC_REMEDIATION": settings.topic_remediation,
            "GPUWATCH_TOPIC_DEADLETTER": settings.topic_deadletter,
            "GPUWATCH_TOPIC_OUTCOMES": f"outcomes.{settings.stream_app_id}",
            "GPUWATCH_STREAM_APP_ID": settings.stream_app_id,
            "GPUWATCH_CONTROLLER_METRICS_PORT": str(port),
        }
    )
    # -P: import the installed package, not the source folder of the same name in the working directory.
    proc = subprocess.Popen([sys.executable, "-P", "-m", "gpuwatch.apps.cli", "controller"], env=env)
    try:
        uuid = "GPU-ctl-node-2"
        event = Remediation(id=remediation_id("ctl-node", 2, uuid, "checkpoint", 1_750_000_000.0), host="ctl-node",
                            gpu_index=2, uuid=uuid, action="checkpoint", reason="risk 0.97 >= 0.85, mode memory",
                            risk=0.97, ts=1_750_000_360.0)
        # Every action/outcome series is there at 0 before the first event, so the first failure is an
        # increase an alert sees (GpuwatchRemediationFailed).
        failed = 'gpuwatch_remediation_actions_total{action="migrate",outcome="failed"} 0.0'
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and failed not in scrape(port):
            assert proc.poll() is None, f"gpuwatch controller exited early with {proc.returncode}"
            time.sleep(0.25)
        assert failed in scrape(port)
        producer = make_producer(settings)
        for _ in range(2):  # the same id twice: executed once, then skipped as a duplicate
            producer.produce(settings.topic_remediation, encode_remediation(event), key=b"ctl-node")
        assert producer.flush(10) == 0

        executed = 'gpuwatch_remediation_actions_total{action="checkpoint",outcome="dry_run"} 1.0'
        duplicate = 'gpuwatch_remediation_actions_total{action="checkpoint",outcome="duplicate"} 1.0'
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline and not (executed in text and duplicate in text):
            assert proc.poll() is None, f"gpuwatch controller exited early with {proc.returncode}"
            time.sleep(0.25)
            text = scrape(port)
        assert executed in text, text[-2000:]
        assert duplicate in text
        # The controller's own metrics only: none of the stream's or the sink's at 0.
        assert "gpuwatch_stream_samples_total" not in text and "gpuwatch_risk_records_written_total" not in text
    finally:
        proc.terminate()
        proc.wait(10)
