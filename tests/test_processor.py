"""The stream's batch step without Kafka: folding, rescoring cadence, silent GPUs, dead letters."""

from __future__ import annotations

import logging

import numpy as np
import orjson
import pytest
import torch
from prometheus_client import REGISTRY

from gpuwatch.schemas.codecs import decode_deadletter, decode_risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.app import export_slow_sampling
from gpuwatch.streams.model import CPU_ENCODE_ROWS, Scorer, load_artifact
from gpuwatch.streams.processor import Inbound, RiskProcessor
from gpuwatch.streams.window import WINDOW_LAYOUT


def _processor(rescore_s: float = 5.0) -> RiskProcessor:
    return RiskProcessor(Scorer(load_artifact(), device="cpu"), rescore_interval_s=rescore_s)


def _feed(sim: FleetSimulator, steps: int) -> list[Inbound]:
    return [Inbound(v, "samples", 0, i) for i in range(steps) for _, v in sim.step_json()]


def test_each_gpu_is_rescored_once_per_interval_of_sample_time() -> None:
    sim = FleetSimulator(FleetConfig(hosts=2, seed=1, start_ts=1.7e9))
    proc = _processor(rescore_s=5.0)
    result = proc.process(_feed(sim, 20))  # 20 s of samples at 1 Hz, one batch (a backlog)
    assert result.samples == 20 * 16 and not result.deadletters
    per_gpu: dict[str, list[float]] = {}
    for _, v in result.risk:
        r = decode_risk(v)
        per_gpu.setdefault(r.uuid, []).append(r.ts)
    # Even within one batch: the first sample, then every 5 s of sample time (4 of 20 samples).
    assert len(per_gpu) == 16
    assert all(np.diff(ts).tolist() == [5.0, 5.0, 5.0] for ts in per_gpu.values())
    more = proc.process(_feed(sim, 10))
    again: dict[str, list[float]] = {}
    for _, v in more.risk:
        r = decode_risk(v)
        again.setdefault(r.uuid, []).append(r.ts)
    assert all(len(ts) == 2 and ts[0] - per_gpu[u][-1] == 5.0 for u, ts in again.items()) and len(again) == 16


def test_a_backlog_batch_scores_the_same_records_as_one_snapshot_per_host_at_a_time() -> None:
    """A worker draining a backlog (many snapshots of a host per batch) writes what it writes live at 1 Hz,
    which is what `score` and `eval` replay: the records do not depend on how Kafka batched the snapshots."""
    sim = FleetSimulator(FleetConfig(hosts=3, seed=4, start_ts=1.7e9))
    msgs = _feed(sim, 40)
    rng = np.random.default_rng(0)
    live, backlog = _processor(), _processor()
    one_at_a_time = [decode_risk(v) for m in msgs for _, v in live.process([m]).risk]
    got = []
    start = 0
    while start < len(msgs):  # batches of random size, up to the whole backlog
        size = int(rng.integers(1, 50))
        got += [decode_risk(v) for _, v in backlog.process(msgs[start:start + size]).risk]
        start += size
    key = lambda r: (r.uuid, r.ts)  # noqa: E731
    assert len(got) == len(one_at_a_time) > 16
    assert sorted((key(r), r.risk, r.alarm) for r in got) == sorted((key(r), r.risk, r.alarm) for r in one_at_a_time)


def test_silent_gpus_are_republished_with_their_last_sample_ts() -> None:
    sim = FleetSimulator(FleetConfig(hosts=1, seed=2, start_ts=1.7e9))
    proc = _processor()
    first = [decode_risk(v) for _, v in proc.process(_feed(sim, 3)).risk]  # scored at its first sample
    scored_at = max(r.scored_at for r in first)
    assert proc.refresh_silent(scored_at + 5.0, max_age_s=10.0).risk == []
    again = proc.refresh_silent(scored_at + 10.5, max_age_s=10.0).risk
    # Published again as they were: the ts of the sample scored, not a rescoring of the two samples since (the
    # rescoring interval skipped them, as `gpuwatch score` and `eval` do), so no alarm run moves on a wall clock.
    assert [decode_risk(v) for _, v in again] == first
    assert sim.now > max(r.ts for r in first)
    assert proc.refresh_silent(scored_at + 15.0, max_age_s=10.0).risk == []  # republished 4.5 s ago
    # A GPU with no record of this process yet (windows restored after a restart) is scored.
    restored = _processor()
    restored.restore([(k, v) for _, k, v in proc.checkpoint(everything=True)])
    fresh = [decode_risk(v) for _, v in restored.refresh_silent(scored_at + 10.5, max_age_s=10.0).risk]
    assert {r.uuid for r in fresh} == {r.uuid for r in first} and {r.ts for r in fresh} == {sim.now}


def test_duplicate_snapshot_is_dead_lettered_and_leaves_the_window_alone() -> None:
    sim = FleetSimulator(FleetConfig(hosts=1, seed=3, start_ts=1.7e9))
    msgs = _feed(sim, 5)
    proc = _processor()
    proc.process(msgs)
    before = proc.store.current.copy()
    result = proc.process([msgs[2]])  # a redelivered, older snapshot
    assert result.samples == 0 and result.rejected_samples == 8
    (letter,) = [decode_deadletter(d) for d in result.deadletters]
    assert "duplicate or out of order" in letter.error
    assert (proc.store.current == before).all()


def test_garbage_is_dead_lettered_with_its_source() -> None:
    proc = _processor()
    result = proc.process([Inbound(b"\xff\xfe", "samples", 3, 42), Inbound(orjson.dumps({"schema": 1}), "samples", 3, 43)])
    letters = [decode_deadletter(d) for d in result.deadletters]
    assert [(d.source.partition, d.source.offset) for d in letters] == [(3, 42), (3, 43)]
    assert all(d.error for d in letters) and result.samples == 0


def test_incremental_scoring_equals_a_full_forward_pass() -> None:
    sim = FleetSimulator(FleetConfig(hosts=2, seed=6, start_ts=1.7e9, rate_scale=2000.0))
    proc = _processor(rescore_s=1.0)
    scorer = proc.scorer
    hits = 0
    for _ in range(120):  # 1 s a batch: the ring advances every 30th batch; caches are reused in between
        cached = proc._cache_push_ts.copy()
        result = proc.process(_feed(sim, 1))
        hits += int(np.sum(cached[: len(proc._cache_push_ts)] == proc._cache_push_ts[: len(cached)]))
        assert result.scored == 16
        slots = np.sort(np.array(list(proc.store.slot_of.values())))
        incremental = [decode_risk(v).risk for _, v in result.risk]
        full, _ = scorer.score(proc.store.sequences(slots))
        assert np.allclose(sorted(incremental), sorted(full), atol=1e-5)
    assert hits > 100  # the cache was really used, not recomputed every time


def test_a_large_batch_is_encoded_in_parts_with_the_states_of_one_call() -> None:
    """The CPU encodes pasts CPU_ENCODE_ROWS sequences a call (faster per sequence than one big call): every
    sequence gets the LSTM state the whole batch in one call gives it; the past rows are the sequences without
    their current row."""
    sim = FleetSimulator(FleetConfig(hosts=2, seed=6, start_ts=1.7e9, rate_scale=2000.0))
    proc = _processor()
    for _ in range(70):  # two ring rows
        proc.process(_feed(sim, 1))
    slots = np.sort(np.array(list(proc.store.slot_of.values())))
    past = proc.store.sequences(slots, past_only=True)
    assert np.array_equal(past, proc.store.sequences(slots)[:, :-1])
    rng = np.random.default_rng(0)
    batch = np.concatenate([past] * (2 * CPU_ENCODE_ROWS // len(past) + 2))
    batch = (batch + rng.normal(0.0, 0.01, batch.shape)).astype(np.float32)  # all different
    h, c = proc.scorer.encode_past(batch)
    scorer = proc.scorer
    was, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False  # PyTorch's kernels, as the scorer's
    try:
        with torch.inference_mode():
            _, (h1, c1) = scorer.model.lstm((torch.from_numpy(batch) - scorer._mean) / scorer._std)
    finally:
        torch.backends.mkldnn.enabled = was
    np.testing.assert_allclose(h, h1[0].numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(c, c1[0].numpy(), rtol=1e-6, atol=1e-7)


def test_gpus_sampled_more_slowly_than_validated_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """The shipped model was validated at up to 60 s: a worker counts the GPUs sampled every 120 s in a gauge and
    logs one warning naming one of them; GPUs at 60 s are not counted."""
    procs = {}
    for interval in (60.0, 120.0):
        sim = FleetSimulator(FleetConfig(hosts=2, seed=6, start_ts=1.7e9, interval_s=interval))
        procs[interval] = proc = _processor()
        for _ in range(5):
            proc.process(_feed(sim, 1))
    assert procs[60.0].sampled_slower_than_validated() == (0, "", 0.0)
    count, example, interval_s = procs[120.0].sampled_slower_than_validated()
    assert count == 16 and example.endswith("/0") and interval_s == pytest.approx(120.0)
    with caplog.at_level(logging.WARNING, logger="gpuwatch.streams.app"):
        assert export_slow_sampling(procs[120.0], warned=False)
        assert export_slow_sampling(procs[120.0], warned=True)  # already said
    assert REGISTRY.get_sample_value("gpuwatch_stream_gpus_sampled_slower_than_validated") == 16
    assert len(caplog.records) == 1 and "16 GPUs sampled more slowly than validated" in caplog.text
    assert not export_slow_sampling(procs[60.0], warned=True)
    assert REGISTRY.get_sample_value("gpuwatch_stream_gpus_sampled_slower_than_validated") == 0


def test_the_stream_bench_compares_the_worker_path_with_per_request_scoring_on_its_own_sequences() -> None:
    from gpuwatch.apps.bench.stream import RISK_TOLERANCE, batched_speedup

    sim = FleetSimulator(FleetConfig(hosts=2, seed=3, start_ts=1.7e9))
    msgs = [m for _ in range(70) for m in sim.step_json()]
    figures = batched_speedup(msgs, batch=2, rescore_s=5.0)  # one fleet step per batch
    assert figures["records"] == 16 * 14  # 70 s at 1 Hz, every GPU scored at 0, 5, ..., 65 s
    assert figures["max_abs_risk_diff"] <= RISK_TOLERANCE and figures["mode_mismatches"] == 0
    # The first 30 s (no ring row yet) and the scoring after each ring advance encode the past afresh.
    assert 0.2 < figures["past_encoded_share"] < 0.8
    assert figures["speedup"] > 0 and figures["batching_only_speedup"] > 0


def _shifted(msgs: list[Inbound], by_s: float) -> list[Inbound]:
    """The same snapshots (same seq) stamped `by_s` later: a node clock that is off by that much."""
    out = []
    for m in msgs:
        obj = orjson.loads(m.value)
        obj["ts"] += by_s
        out.append(Inbound(orjson.dumps(obj), m.topic, m.partition, m.offset))
    return out


def _ts(result_risk: list[tuple[bytes, bytes]]) -> set[float]:
    return {decode_risk(v).ts for _, v in result_risk}


def test_a_snapshot_stamped_ahead_does_not_lock_out_the_next_ones() -> None:
    now = 1.7e9 + 60
    sim = FleetSimulator(FleetConfig(hosts=1, seed=6, start_ts=1.7e9))
    proc = _processor(rescore_s=1.0)
    proc.process(_feed(sim, 30), now=now)
    # One valid snapshot stamped 120 s ahead (inside max_future_s), then the host's real ones.
    ahead = proc.process(_shifted(_feed(sim, 1), 120.0), now=now)
    assert ahead.samples == 8 and not ahead.deadletters
    real = _feed(sim, 10)
    after = proc.process(real, now=now)
    assert after.samples == 80 and after.rejected_samples == 0 and not after.deadletters
    newest = orjson.loads(real[-1].value)["ts"]
    assert _ts(after.risk) and max(_ts(after.risk)) == newest  # records carry the real time again
    # History is kept (the window moved back with the clock), and a resend is still a duplicate.
    assert (proc.store.last_ts[:8] - proc.store.first_ts[:8] > 35).all()
    again = proc.process(real[-1:], now=now)
    assert again.samples == 0 and again.rejected_samples == 8


def test_a_node_clock_stepped_back_keeps_its_window_and_scores_as_before() -> None:
    sim = FleetSimulator(FleetConfig(hosts=1, seed=7, start_ts=1.7e9))
    msgs = _feed(sim, 60)
    steady, stepped = _processor(rescore_s=1.0), _processor(rescore_s=1.0)
    steady.process(msgs)
    stepped.process(msgs[:40])
    # NTP steps the node's clock back by 100 s: the next snapshots (seq going on) are stamped in the "past".
    result = stepped.process(_shifted(msgs[40:], -100.0))
    assert result.samples == 20 * 8 and not result.deadletters
    assert max(_ts(result.risk)) == orjson.loads(msgs[-1].value)["ts"] - 100.0
    # Time differences in the window are what they were, so the features (and risk) match the steady clock's.
    np.testing.assert_allclose(stepped.store.current[:8], steady.store.current[:8], atol=1e-4)
    np.testing.assert_allclose(stepped.store.ewma[:8], steady.store.ewma[:8], atol=1e-4)
    np.testing.assert_allclose(
        stepped.store.last_ts[:8] - stepped.store.first_ts[:8], steady.store.last_ts[:8] - steady.store.first_ts[:8]
    )


def test_a_window_checkpoint_brings_back_what_was_framed_after_it_and_refuses_another_layout() -> None:
    sim = FleetSimulator(FleetConfig(hosts=1, seed=2, start_ts=1.7e9))
    proc = _processor()
    proc.process(_feed(sim, 3))
    slots = np.arange(8)
    extensions = [b"runs of GPU %d" % i for i in range(8)]
    assert _processor().store.import_state(proc.store.export_state(slots, extensions)) == list(enumerate(extensions))
    assert _processor().store.import_state(proc.store.export_state(slots)) == [(i, b"") for i in range(8)]
    longer = [(u, blob + bytes(9)) for u, blob in proc.store.export_state(slots)]  # another window layout
    assert _processor().store.import_state(longer) == []
    # the same size, another meaning (a release that changed what a feature holds): the layout byte refuses it
    older = [(u, blob[:-1] + bytes([WINDOW_LAYOUT - 1])) for u, blob in proc.store.export_state(slots)]
    assert _processor().store.import_state(older) == []
