"""Fixtures that start real servers on free loopback ports: Tansu (Kafka protocol) and redis-server."""

from __future__ import annotations

import os
from collections.abc import Iterator

# Set before torch (or LightGBM) loads OpenMP, which reads them once. torch takes one thread per core, and
# OpenMP threads spin while they wait for each other: on a busy 2-core machine (CI, other jobs) each of the
# tiny per-snapshot inference steps of a replay then waits for a scheduler slice. On this project's 2-core
# machine under load, replaying one validation fleet of test_training (17,280 GPU-samples, LSTM + GBDT) took
# 175 s as it was, and 9-18 s with one thread or with sleeping waits. train() still sets its 2 threads; they
# now sleep while they wait. Stream and score workers already run one torch thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import redis  # noqa: E402

from gpuwatch.config import Settings  # noqa: E402
from gpuwatch.embedded import EmbeddedServer, start_kafka, start_redis  # noqa: E402


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[EmbeddedServer]:
    server = start_kafka()
    yield server
    server.stop(timeout=1.0)  # memory-only; Tansu waits out clients still connected on SIGTERM (5 s at most)


@pytest.fixture()
def redis_server() -> Iterator[EmbeddedServer]:
    """A fresh redis-server per test (cheap: ~50 ms), so tests never see each other's keys."""
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture()
def redis_client(redis_server: EmbeddedServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture()
def settings(
    kafka_server: EmbeddedServer, redis_server: EmbeddedServer, request: pytest.FixtureRequest
) -> Settings:
    """Settings pointing at the test's servers, with topic names unique to the test."""
    suffix = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:80]
    return Settings(
        kafka_bootstrap=kafka_server.url,
        redis_url=redis_server.url,
        topic_samples=f"samples.{suffix}",
        topic_risk=f"risk.{suffix}",
        topic_remediation=f"remediation.{suffix}",
        topic_deadletter=f"deadletter.{suffix}",
        topic_outcomes=f"outcomes.{suffix}",
        topic_commands=f"commands.{suffix}",
        topic_risk_shadow=f"risk-shadow.{suffix}",
        topic_model_control=f"model-control.{suffix}",
        stream_app_id=f"stream-{suffix}",
        partitions=4,
    )
