"""Small helpers shared by the integration tests (polling, scraping, reading topics)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from typing import Any

from gpuwatch.config import Settings
from gpuwatch.kafka import make_consumer, partition_count


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Polls `cond` until it is truthy and returns its value; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def scrape(port: int) -> str:
    """The text of a local Prometheus exporter's /metrics ("" while it is not up yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return resp.read().decode()
    except OSError:
        return ""


def consume_from_start(
    settings: Settings,
    topics: list[str],
    until: Callable[[dict[str, list[bytes]]], bool],
    timeout: float = 60.0,
) -> dict[str, list[bytes]]:
    """The values of every message in `topics` from their start, read until `until(got)` holds or `timeout`
    passes. The partitions are assigned, not subscribed: no consumer-group join (about 3 s on Tansu)."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    parts = []
    for topic in topics:
        n = partition_count(settings, topic)
        assert n, f"topic {topic} does not exist"
        parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(n)]
    consumer = make_consumer(settings, f"check-{time.time_ns()}", **{"enable.auto.commit": False})
    consumer.assign(parts)
    got: dict[str, list[bytes]] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not until(got):
            for msg in consumer.consume(500, 0.5):
                if msg.error() is None:
                    got[msg.topic()].append(msg.value())
    finally:
        consumer.close()
    return got
