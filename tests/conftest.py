"""Fixtures that start real servers on free loopback ports: Tansu (Kafka protocol) and redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer, start_kafka, start_redis


@pytest.fixture(scope="session")
def kafka_server() -> Iterator[EmbeddedServer]:
    server = start_kafka()
    yield server
    server.stop()


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
def settings(kafka_server: EmbeddedServer, redis_server: EmbeddedServer, request: pytest.FixtureRequest) -> Settings:
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
        stream_app_id=f"stream-{suffix}",
        partitions=4,
    )
