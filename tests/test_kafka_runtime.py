"""The shared Kafka runtime's rules that the stage tests do not reach: a message refused for good is counted
and does not block what follows, a broker that restarted without its state cannot swallow a message, a
batch's offsets, and waiting out Redis.
(The loop's rule itself, offsets only after every output is acknowledged, is tested against a real broker
outage in tests/test_output_outage.py.)"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from confluent_kafka import Message, TopicPartition

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer, start_kafka
from gpuwatch.kafka import (
    PERMANENT_ERRORS,
    ReliableProducer,
    batch_offsets,
    ensure_topics,
    make_producer,
    read_partitions_to_end,
)
from gpuwatch.redis_backoff import until_redis_answers


def test_a_message_the_client_refuses_for_good_is_dropped_counted_and_does_not_block_the_next(
    settings: Settings,
) -> None:
    settings = settings.replace(partitions=1)
    ensure_topics(settings, [settings.topic_deadletter])
    producer = ReliableProducer(settings, **{"message.max.bytes": 2000})
    producer.produce(
        settings.topic_deadletter, b"k", b"x" * 5000
    )  # over message.max.bytes: MSG_SIZE_TOO_LARGE
    producer.produce(settings.topic_deadletter, b"k", b"small")
    assert producer.flush(30) == 0
    assert (producer.dropped, producer.acknowledged, producer.resent) == (1, 1, 0)
    assert [v for _, v in read_partitions_to_end(settings, settings.topic_deadletter, [0])] == [b"small"]
    producer.close()


@pytest.fixture()
def restarted() -> Iterator[list[EmbeddedServer]]:
    servers = [start_kafka()]
    yield servers
    for server in servers:
        server.stop(timeout=1.0)


def test_a_message_sent_after_the_broker_restarted_without_its_state_is_not_swallowed(
    restarted: list[EmbeddedServer],
) -> None:
    # Tansu keeps nothing over a restart and hands out producer ids from the start again. A producer that
    # kept its id then shares it with a fresh one, and its next message, whose sequence number the fresh one
    # has passed, is acknowledged as a duplicate and dropped (a bare idempotent producer loses it this way).
    settings = Settings(kafka_bootstrap=restarted[0].url, partitions=1)
    ensure_topics(settings, ["swallow"])
    ours = ReliableProducer(settings)
    for i in range(5):
        ours.produce("swallow", None, f"before {i}".encode(), partition=0)
    assert ours.flush(30) == 0
    restarted[0].stop(timeout=1.0)
    deadline = time.monotonic() + 30
    while ours.broker_up is not False:  # it notices that every broker is out of reach
        assert time.monotonic() < deadline, "the producer never reported the broker down"
        ours.poll(0.1)
    restarted.append(start_kafka(port=restarted[0].port))
    ensure_topics(settings, ["swallow"])
    theirs = make_producer(settings)  # gets the first producer id the new broker hands out
    for i in range(10):
        theirs.produce("swallow", f"theirs {i}".encode(), partition=0)
    assert theirs.flush(30) == 0
    ours.produce("swallow", None, b"ours after", partition=0)
    assert ours.flush(30) == 0
    assert b"ours after" in [v for _, v in read_partitions_to_end(settings, "swallow", [0])]
    ours.close()


def test_the_permanent_errors_are_the_message_s_own_faults() -> None:
    from confluent_kafka import KafkaError

    assert KafkaError.MSG_SIZE_TOO_LARGE in PERMANENT_ERRORS
    # An outage or a missing permission can end: those are retried, never dropped.
    assert (
        not {KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT, KafkaError.TOPIC_AUTHORIZATION_FAILED}
        & PERMANENT_ERRORS
    )


def test_a_batch_s_offsets_are_one_past_its_last_message_per_partition() -> None:
    batch = [Message(topic="t", partition=p, offset=o) for p, o in ((0, 7), (1, 3), (0, 9), (0, 8), (1, 2))]
    assert sorted(batch_offsets(batch), key=lambda tp: tp.partition) == [TopicPartition("t", 0, 10),
                                                                          TopicPartition("t", 1, 4)]  # fmt: skip
    assert batch_offsets([]) == []


def test_until_redis_answers_waits_out_an_outage_and_gives_up_only_on_stop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("Connection refused")
        return "written"

    assert until_redis_answers(threading.Event(), "write", flaky) == (True, "written")
    assert len(calls) == 3
    assert "cannot write (Connection refused)" in caplog.text and "Redis is back after" in caplog.text

    def down() -> str:
        raise redis.BusyLoadingError("loading")

    stop = threading.Event()
    stop.set()
    assert until_redis_answers(stop, "write", down) == (False, None)

    def bad_data() -> str:
        raise redis.ResponseError("Error running script @user_script:12")

    with pytest.raises(redis.ResponseError):
        until_redis_answers(
            threading.Event(), "write", bad_data, retryable=lambda exc: "@user_script" not in str(exc)
        )
