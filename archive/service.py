"""`gpuwatch archive`: the Kafka edge of the archive. Consumes samples, risk, remediation and outcomes, hands
each message to the `ArchiveWriter`, and commits offsets only once the writer has made their files durable.

All the Kafka code of the archive is here: one consumer in group `<stream_app_id>-archive`, offsets committed by
hand after each flush. On assignment, `ArchiveWriter.recover` settles what a killed predecessor left (files of a
batch whose offsets were not committed are deleted; Kafka then delivers that batch again), so a restart neither
loses nor duplicates rows. A commit that fails is retried with the next flush, or within a second when nothing
new arrives; meanwhile the markers stay.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_consumer

from .storage import Storage
from .tables import topic_tables
from .writer import ArchiveWriter, ensure_layout

log = logging.getLogger(__name__)

RETENTION_CHECK_S = 3600.0


def group_id(settings: Settings) -> str:
    """Consumer group of the archive."""
    return settings.stream_app_id + "-archive"


class _Committer:
    """Offsets flushed but not yet committed (a failed commit is retried with the next flush)."""

    def __init__(self, consumer: Consumer, writer: ArchiveWriter) -> None:
        self.consumer = consumer
        self.writer = writer
        self.owed: dict[tuple[str, int], int] = {}

    def flush_and_commit(self) -> bool:
        self.owed.update(self.writer.flush())
        if not self.owed:
            return True
        offsets = [TopicPartition(t, p, o) for (t, p), o in self.owed.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning("offset commit failed (%s); the files stay pending and the commit is retried", exc)
            return False
        self.writer.committed(self.owed)
        self.owed.clear()
        return True

    def forget(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.owed.pop((tp.topic, tp.partition), None)


def run_archive(settings: Settings, *, stop: threading.Event | None = None, url: str = "",
                max_batch: int = 5000, poll_timeout_s: float = 0.5) -> int:  # fmt: skip
    """Archives the four topics into `url` (default `settings.archive_url`) until `stop` is set or SIGTERM/SIGINT
    arrives; flushes and commits what it holds before returning 0."""
    stop = stop or threading.Event()
    storage = Storage(url or settings.archive_url)
    ensure_layout(storage)
    tables = topic_tables(settings)
    ensure_topics(settings, list(tables))
    writer = ArchiveWriter(storage, tables, flush_rows=settings.archive_flush_rows,
                           flush_interval_s=settings.archive_flush_interval_s)  # fmt: skip
    consumer = make_consumer(
        settings, group_id(settings), **{"enable.auto.commit": False, "fetch.wait.max.ms": 500}
    )
    committer = _Committer(consumer, writer)

    def on_assign(c: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in c.committed(partitions, timeout=30):
            writer.recover(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else None)

    def on_revoke(_c: Consumer, partitions: list[TopicPartition]) -> None:
        committer.flush_and_commit()  # ours until this returns: what we hold is written and committed, not lost
        committer.forget(partitions)
        for tp in partitions:
            writer.drop(tp.topic, tp.partition)

    consumer.subscribe(list(tables), on_assign=on_assign, on_revoke=on_revoke)
    previous = _install_signal_handlers(stop)
    next_expiry = next_retry = 0.0
    log.info("archiving %s into %s (flush every %g s or %d rows)", ", ".join(tables), storage.url,
             settings.archive_flush_interval_s, settings.archive_flush_rows)  # fmt: skip
    try:
        while not stop.is_set():
            for msg in consumer.consume(num_messages=max_batch, timeout=poll_timeout_s):
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("consumer error: %s", err)
                    continue
                topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
                assert (
                    topic is not None and partition is not None and offset is not None
                )  # a message, not an event
                writer.add(topic, partition, offset, msg.key(), msg.value())
            if writer.due():
                t0 = time.perf_counter()
                files = writer.files_written
                committed = committer.flush_and_commit()
                log.info("archived: %d files in %.2f s%s (%d rows, %.1f MB so far)", writer.files_written - files,
                         time.perf_counter() - t0, "" if committed else ", commit pending", writer.rows_written,
                         writer.bytes_written / 1e6)  # fmt: skip
            elif committer.owed and time.monotonic() >= next_retry:  # a failed commit, nothing new to flush
                committer.flush_and_commit()
                next_retry = time.monotonic() + 1.0
            if time.monotonic() >= next_expiry:
                writer.expire(settings.archive_retention_days)
                next_expiry = time.monotonic() + RETENTION_CHECK_S
        committer.flush_and_commit()
    finally:
        _restore_signal_handlers(previous)
        consumer.close()
    return 0


def _install_signal_handlers(stop: threading.Event) -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s; writing what is held, then stopping", signal.Signals(signum).name)
        stop.set()

    return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
