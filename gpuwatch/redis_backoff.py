"""The one way a stage waits out Redis: retry with backoff until it answers, or until the stage is stopped."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis

log = logging.getLogger(__name__)

T = TypeVar("T")
FIRST_DELAY_S = 0.1
MAX_DELAY_S = 5.0


def always(exc: redis.RedisError) -> bool:
    return True


def until_redis_answers(
    stop: threading.Event,
    what: str,
    call: Callable[[], T],
    *,
    retryable: Callable[[redis.RedisError], bool] = always,
) -> tuple[bool, T | None]:
    """Runs `call` until Redis answers: (True, its result), or (False, None) when `stop` is set first.

    Every `redis.RedisError` is taken for an outage (down, loading, out of memory, read-only after a failover)
    and retried with backoff (0.1 s doubling to 5 s), logged once when it starts ("cannot `what`") and once
    when Redis is back; an error `retryable` says is not an outage (a script error caused by the data) is
    raised to the caller.
    """
    delay, down_since = FIRST_DELAY_S, 0.0
    while True:
        try:
            result = call()
            if down_since:
                log.warning("Redis is back after %.1f s; %s succeeded", time.monotonic() - down_since, what)
            return True, result
        except redis.RedisError as exc:
            if not retryable(exc):
                raise
            if not down_since:
                down_since = time.monotonic()
                log.warning("cannot %s (%s); retrying with backoff until Redis answers", what, exc)
        if stop.wait(delay):
            return False, None
        delay = min(delay * 2, MAX_DELAY_S)
