"""Stream workers keep their windows across a crash and split partitions when scaled out."""

from __future__ import annotations

import time

import pytest
from helpers import consume_from_start, wait_for

from gpuwatch.config import Settings
from gpuwatch.embedded import EmbeddedServer
from gpuwatch.kafka import ensure_topics, make_producer, partition_count, read_partitions_to_end
from gpuwatch.processes import StatsFollower, start_stream_worker
from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.schemas.records import Risk, StreamStats
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator

pytestmark = pytest.mark.slow

STATS_S = 0.5  # the workers' STATS cadence: the waits below see progress within this long


def _worker(settings: Settings, name: str, extra_args: list[str] | None = None) -> EmbeddedServer:
    return start_stream_worker(settings, name, extra_args, stats_interval_s=STATS_S)


def _publish(settings: Settings, sim: FleetSimulator, steps: int) -> None:
    producer = make_producer(settings)
    for _ in range(steps):
        for host, value in sim.step_json():
            producer.produce(settings.topic_samples, key=host.encode(), value=value)
    assert producer.flush(15) == 0


def _count_through_worker(
    settings: Settings, sim: FleetSimulator, steps: int, name: str, extra_args: list[str] | None = None,
    settle_s: float = 0.0,
) -> StreamStats:
    """Publishes `steps` of `sim` to a fresh worker; its STATS once it has counted them all (`settle_s` later)."""
    ensure_topics(settings)
    worker = _worker(settings, name, extra_args)
    stats = StatsFollower(worker)
    try:
        _publish(settings, sim, steps)
        done = stats.wait(lambda s: s.samples >= steps * sim.H * sim.G, 90, "every sample counted")
        if settle_s:
            time.sleep(settle_s)
            done = stats.latest
    finally:
        worker.stop()
    return done


def _risk_records(settings: Settings, until, timeout: float = 90.0) -> list[Risk]:  # type: ignore[no-untyped-def]
    got = consume_from_start(
        settings,
        [settings.topic_risk],
        lambda g: until([decode_risk(v) for v in g[settings.topic_risk]]),
        timeout,
    )
    return [decode_risk(v) for v in got[settings.topic_risk]]


def test_crashed_worker_successor_restores_windows_from_changelog(settings: Settings) -> None:
    settings = settings.replace(checkpoint_interval_s=1.0, rescore_interval_s=1.0)
    ensure_topics(settings)
    sim = FleetSimulator(FleetConfig(hosts=2, gpus_per_host=8, seed=11, start_ts=time.time() - 400))
    first = _worker(settings, "worker-a")
    stats = StatsFollower(first)
    _publish(settings, sim, 300)  # five minutes of history
    stats.wait(lambda s: s.samples >= 300 * 16 and s.checkpointed >= 16, 90, "five minutes checkpointed")
    time.sleep(2.5)  # one more checkpoint after the last batch
    first.proc.kill()  # a crash: no revoke handler, no final checkpoint
    first.proc.wait()

    second = _worker(settings, "worker-b")
    stats_b = StatsFollower(second)
    resumed_at = sim.now
    _publish(settings, sim, 20)
    restored = stats_b.wait(lambda s: s.restored_gpus >= 16 and s.samples >= 20 * 16, 90, "windows restored")
    assert restored.restored_gpus == 16
    after = _risk_records(settings, lambda rs: len({r.uuid for r in rs if r.ts >= resumed_at}) >= 16)
    fresh = [r for r in after if r.ts >= resumed_at]
    assert len({r.uuid for r in fresh}) == 16
    # Each score after the restart is backed by the history from before the crash, not only 20 s.
    assert min(r.history_s for r in fresh) > 250
    second.stop()


def test_two_workers_split_the_partitions(settings: Settings) -> None:
    settings = settings.replace(partitions=4, rescore_interval_s=1.0)
    ensure_topics(settings)
    workers = [_worker(settings, f"worker-{i}") for i in range(2)]
    watchers = [StatsFollower(w) for w in workers]
    # Both members in the group before data arrives: each owns a share of the 4 partitions, and their shares
    # add up (a report from before the rebalance would count a partition twice).
    for w in watchers:
        w.wait(lambda s: s.partitions > 0, 90, "a partition assigned")
    deadline = time.monotonic() + 90
    while sum(w.latest.partitions for w in watchers) != 4 or min(w.latest.partitions for w in watchers) == 0:
        assert time.monotonic() < deadline, [w.latest for w in watchers]
        time.sleep(0.1)
    sim = FleetSimulator(FleetConfig(hosts=16, gpus_per_host=8, seed=12, start_ts=time.time() - 60))
    _publish(settings, sim, 30)
    records = _risk_records(settings, lambda rs: len({r.uuid for r in rs}) >= 128)
    assert len({r.uuid for r in records}) == 128
    # Every GPU lives in exactly one worker, and both carry a share. A stats line can come from before a worker
    # has folded every GPU of its partitions (a busy machine), so wait for the counts to settle at 128; GPUs
    # counted twice never settle there and fail the deadline with the counts.
    def settled() -> list[int] | None:
        tracked = [w.latest.gpus_tracked for w in watchers]
        return tracked if sum(tracked) == 128 else None

    tracked = wait_for(settled, 90, "both workers' GPU counts to add up to 128")
    assert min(tracked) > 0, tracked
    for w in workers:
        w.stop()


def test_decode_only_worker_counts_samples_and_scores_nothing(settings: Settings) -> None:
    # `gpuwatch stream --decode-only` is the benchmark's ceiling (ratio_vs_raw): it must consume and decode
    # with the same app, and do nothing else. A worker that scored here would make the ratio meaningless.
    sim = FleetSimulator(FleetConfig(hosts=2, gpus_per_host=8, seed=12, start_ts=time.time() - 40))
    done = _count_through_worker(settings, sim, 30, "worker-decode-only", ["--decode-only"])
    assert done.samples == 30 * 16
    assert (done.scored, done.deadletters, done.rejected_samples) == (0, 0, 0)
    # The worker has stopped, so anything it produced is in the topic by now: read all of it.
    n = partition_count(settings, settings.topic_risk)
    assert n == settings.partitions
    assert read_partitions_to_end(settings, settings.topic_risk, list(range(n))) == []


def test_worker_uses_the_fast_drain_consumer(settings: Settings) -> None:
    # The direct hand-off of each message is where the worker's throughput comes from (docs/architecture.md, Faust);
    # this fails if faust's transport, and with it the slow per-message path, comes back unnoticed.
    from gpuwatch.streams.app import create_app
    from gpuwatch.streams.faust_runtime import FastDrainConsumer

    ensure_topics(settings)
    app = create_app(settings)
    assert isinstance(app.consumer, FastDrainConsumer)


def test_worker_with_full_queues_loses_nothing(settings: Settings) -> None:
    # Batches of 2 messages and a queue of 8: the consumer now and then finds the agent's queue full and takes
    # faust's guarded hand-off instead of the direct one (6 times in a run that counted them). Every sample
    # must still be counted exactly once.
    settings = settings.replace(stream_batch_size=2, stream_batch_within_s=0.01)
    sim = FleetSimulator(FleetConfig(hosts=4, gpus_per_host=8, seed=13, start_ts=time.time() - 40))
    # 3 s after the last sample is counted: anything counted twice would show up by then.
    done = _count_through_worker(settings, sim, 30, "worker-small-batches", settle_s=3.0)
    assert (done.samples, done.deadletters, done.rejected_samples) == (30 * 32, 0, 0)
    assert done.batches >= 30 * 4 // 2
