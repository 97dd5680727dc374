"""The model lifecycle: a challenger scores in the shadow, compare reports both, promote and rollback swap them
in running workers without a restart and without losing windows (docs/lifecycle.md)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import orjson
import pytest
import redis
from helpers import consume_from_start, wait_for

from gpuwatch.apps.cli import main
from gpuwatch.config import Settings
from gpuwatch.kafka import ensure_topics, make_producer
from gpuwatch.model_registry import ModelRegistry, RegistryError, transition
from gpuwatch.processes import start_stream_worker
from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.schemas.records import ModelRef, Risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.sinks.risk_client import RiskClient
from gpuwatch.sinks.risk_sink import run_risk_sink
from gpuwatch.streams.model import ModelArtifact, Scorer, load_artifact
from gpuwatch.streams.processor import Inbound, RiskProcessor
from gpuwatch.training.compare import compare
from gpuwatch.training.dataset import Failures
from gpuwatch.training.evaluate import RiskTable, join_labels, scorer_report

CHAMPION = load_artifact()
# A challenger that is surely different: alarms at any score, under its own name.
CHALLENGER = dataclasses.replace(CHAMPION, version="challenger-test", threshold=1e-9, alarm_records=1, alarm_for_s=0.0)


def _ref(version: str) -> ModelRef:
    return ModelRef(version=version, artifact=f"{version}.pt", sha256="0" * 64)


@pytest.fixture(scope="module")
def challenger_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "challenger.pt"
    CHALLENGER.save(path)
    return path


# ---------------------------------------------------------------- the lifecycle as a pure function


def test_promote_swaps_and_rollback_swaps_back() -> None:
    a, b = _ref("a"), _ref("b")
    s1 = transition(None, "shadow", champion=a, challenger=b, at=100.0)
    assert (s1.seq, s1.champion, s1.challenger, s1.challenger_since, s1.rollback_to) == (1, a, b, 100.0, None)
    s2 = transition(s1, "promote", champion=s1.champion, at=200.0)
    assert (s2.seq, s2.champion, s2.challenger, s2.rollback_to, s2.challenger_since) == (2, b, a, a, 100.0)
    s3 = transition(s2, "rollback", champion=s2.champion, at=300.0)
    assert (s3.champion, s3.challenger, s3.rollback_to) == (a, b, None)
    s4 = transition(s3, "stop", champion=s3.champion)
    assert (s4.champion, s4.challenger, s4.challenger_since) == (a, None, None)


@pytest.mark.parametrize("state_after, action, message", [
    (None, "promote", "no challenger to promote"),
    ("shadow", "rollback", "nothing to roll back"),
    (None, "stop", "nothing to stop"),
    (None, "shadow-self", "is the champion already"),
])  # fmt: skip
def test_transitions_that_make_no_sense_are_refused(state_after: str | None, action: str, message: str) -> None:
    a = _ref("a")
    state = transition(None, "shadow", champion=a, challenger=_ref("b")) if state_after else None
    with pytest.raises(RegistryError, match=message):
        if action == "shadow-self":
            transition(state, "shadow", champion=a, challenger=a)
        else:
            transition(state, action, champion=a)  # type: ignore[arg-type]


def test_registry_refuses_a_file_that_is_not_the_registered_one(tmp_path: Path, challenger_pt: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    ref = registry.add(challenger_pt, CHALLENGER.version)
    assert registry.add(challenger_pt, CHALLENGER.version) == ref  # idempotent
    assert load_artifact(registry.path_of(ref)).version == "challenger-test"
    (tmp_path / "registry" / ref.artifact).write_bytes(b"not the model")
    with pytest.raises(RegistryError, match="sha256 differs"):
        registry.path_of(ref)


# ---------------------------------------------------------------- the processor: shadow, promote, windows kept


def _messages(sim: FleetSimulator, steps: int) -> Iterator[list[Inbound]]:
    for _ in range(steps):
        yield [Inbound(value, "samples", 0, 0) for _, value in sim.step_json()]


def test_challenger_scores_the_same_windows_without_changing_the_champions_records() -> None:
    plain = RiskProcessor(Scorer(CHAMPION, "cpu"), rescore_interval_s=1.0)
    proc = RiskProcessor(Scorer(CHAMPION, "cpu"), rescore_interval_s=1.0)
    proc.install(proc.model, proc.model_state(Scorer(CHALLENGER, "cpu")))
    sim_a = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=4, seed=5, start_ts=1.7e9))
    sim_b = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=4, seed=5, start_ts=1.7e9))
    risk, shadow, reference = [], [], []
    for batch_a, batch_b in zip(_messages(sim_a, 40), _messages(sim_b, 40)):
        got = proc.process(batch_a)
        risk += [decode_risk(v) for _, v in got.risk]
        shadow += [decode_risk(v) for _, v in got.shadow]
        reference += [decode_risk(v) for _, v in plain.process(batch_b).risk]
    strip = lambda r: msgspec.structs.replace(r, scored_at=0.0)  # noqa: E731
    assert [strip(r) for r in risk] == [strip(r) for r in reference]  # shadow scoring changes nothing
    assert {r.model for r in shadow} == {"challenger-test"} and {r.model for r in risk} == {CHAMPION.version}
    assert [(r.uuid, r.ts) for r in shadow] == [(r.uuid, r.ts) for r in risk]  # the very same windows
    assert all(r.alarm for r in shadow if not r.failed)  # its own operating point, its own runs
    assert len(proc.store) == 4  # one set of windows


def test_promote_keeps_windows_and_brings_the_challengers_runs_rollback_swaps_back() -> None:
    proc = RiskProcessor(Scorer(CHAMPION, "cpu"), rescore_interval_s=1.0)
    old, new = proc.model, proc.model_state(Scorer(CHALLENGER, "cpu"))
    proc.install(old, new)
    sim = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=2, seed=6, start_ts=1.7e9))
    batches = _messages(sim, 60)
    for batch in list(batches)[:30]:
        before = proc.process(batch)
    ring_before = proc.store.ring.copy()
    runs_before = proc.store.alarm_run[:2].copy()
    challenger_runs = new.runs["alarm_run"][:2].copy()
    proc.install(new, old)  # promote
    assert np.array_equal(proc.store.ring, ring_before)  # windows untouched
    assert np.array_equal(proc.store.alarm_run[:2], challenger_runs) and challenger_runs.min() > 0
    assert np.array_equal(old.runs["alarm_run"][:2], runs_before)
    after = proc.process(next(_messages(sim, 1)))
    first_after = [decode_risk(v) for _, v in after.risk]
    last_before = {r.uuid: r for r in (decode_risk(v) for _, v in before.risk)}
    assert {r.model for r in first_after} == {"challenger-test"}
    assert {decode_risk(v).model for _, v in after.shadow} == {CHAMPION.version}
    assert all(r.history_s >= last_before[r.uuid].history_s for r in first_after)  # type: ignore[operator]
    proc.install(old, new)  # rollback
    back = proc.process(next(_messages(sim, 1)))
    assert {decode_risk(v).model for _, v in back.risk} == {CHAMPION.version}


# A challenger whose alarm needs a run: 4 scorings over 3 s at or above its (any) score.
PERSISTENT = dataclasses.replace(CHALLENGER, alarm_records=4, alarm_for_s=3.0)


def _shadowing(champion: ModelArtifact, challenger: ModelArtifact | None) -> RiskProcessor:
    proc = RiskProcessor(Scorer(champion, "cpu"), rescore_interval_s=1.0)
    if challenger is not None:
        proc.install(proc.model, proc.model_state(Scorer(challenger, "cpu")))
    return proc


def _decisions(records: list[tuple[bytes, bytes]]) -> list[tuple[str, str, float, bool | None, bool | None]]:
    return [(r.model, r.uuid, r.ts, r.alarm, r.drain) for r in (decode_risk(v) for _, v in records)]


CASES = ["same models", "promoted meanwhile", "another challenger", "checkpoint without one"]


@pytest.mark.parametrize("case", CASES)
def test_a_restored_worker_gives_each_model_its_runs_back(case: str) -> None:
    """Checkpoint mid-run, restore into a fresh processor, go on: its alarms (risk and shadow) are those of a
    processor never stopped that installed the restored one's models at the checkpoint. Runs go to the model
    that counted them; a challenger the checkpoint did not count for starts its runs afresh."""
    other = dataclasses.replace(PERSISTENT, version="challenger-other")
    before, after = {
        "same models": ((CHAMPION, PERSISTENT), (CHAMPION, PERSISTENT)),
        "promoted meanwhile": ((CHAMPION, PERSISTENT), (PERSISTENT, CHAMPION)),
        "another challenger": ((CHAMPION, PERSISTENT), (CHAMPION, other)),
        "checkpoint without one": ((CHAMPION, None), (CHAMPION, PERSISTENT)),
    }[case]
    msgs = list(_messages(FleetSimulator(FleetConfig(hosts=1, gpus_per_host=4, seed=9, start_ts=1.7e9)), 30))
    steady, stopped = _shadowing(*before), _shadowing(*before)
    for batch in msgs[:15]:
        steady.process(batch)
        stopped.process(batch)
    changelog = stopped.checkpoint()
    if case == "checkpoint without one":  # byte for byte the layout that workers before this one read
        size = stopped.store._record_dtype().itemsize
        assert {len(v) for _, _, v in changelog} == {2 + len("node-0000") + size}
    running = {m.version: m for m in (steady.model, steady.challenger) if m is not None}
    new = [running.get(a.version) or steady.model_state(Scorer(a, "cpu")) for a in after]  # type: ignore[union-attr]
    steady.install(*new)
    restored = _shadowing(*after)
    assert restored.restore([(k, v) for _, k, v in changelog]) == 4
    for i, batch in enumerate(msgs[15:]):
        want, got = steady.process(batch), restored.process(batch)
        assert _decisions(got.risk) == _decisions(want.risk)
        assert _decisions(got.shadow) == _decisions(want.shadow)
        np.testing.assert_allclose([decode_risk(v).risk for _, v in got.shadow + got.risk],
                                   [decode_risk(v).risk for _, v in want.shadow + want.risk], atol=1e-5)  # fmt: skip
        if i == 0:  # the runs were carried over, or really started afresh (not in alarm at the first scoring)
            carried = case in ("same models", "promoted meanwhile")
            persistent = got.shadow if after[1] is not CHAMPION else got.risk
            assert all(alarm == carried for _, _, _, alarm, _ in _decisions(persistent)), case


def test_a_challenger_with_other_windows_is_refused() -> None:
    proc = RiskProcessor(Scorer(CHAMPION, "cpu"))
    other = dataclasses.replace(CHALLENGER, window=dataclasses.replace(CHAMPION.window, seq_len=7))
    with pytest.raises(ValueError, match="cannot share them"):
        proc.model_state(Scorer(other, "cpu"))


def test_a_worker_dead_letters_a_state_it_cannot_serve_and_keeps_its_models(tmp_path: Path) -> None:
    from gpuwatch.model_registry import ControlEntry
    from gpuwatch.schemas.codecs import decode_deadletter, encode_model_control
    from gpuwatch.streams.lifecycle import ModelSwitcher

    proc = RiskProcessor(Scorer(CHAMPION, "cpu"))
    switcher = ModelSwitcher(Settings(model_registry=str(tmp_path / "empty")), proc)
    running = ModelRef(version=CHAMPION.version, artifact="", sha256="0" * 64)
    state = transition(None, "shadow", champion=running, challenger=_ref("missing"))
    entries = [ControlEntry(0, b"{not json", None, "not JSON"), ControlEntry(1, encode_model_control(state), state)]
    prepared, dead = switcher.follow(entries)
    assert prepared is None and proc.challenger is None and proc.model_version == CHAMPION.version
    reasons = [decode_deadletter(d).error for d in dead]
    assert "not JSON" in reasons[0] and "model missing" in reasons[1] and "does not exist" in reasons[1]
    assert switcher.follow(entries[1:]) == (None, [])  # refused once, not again at every read


# ---------------------------------------------------------------- compare: eval's figures per model


def _record(model: str, uuid: str, ts: float, score: float) -> Risk:
    return Risk(host="n1", gpu_index=0, uuid=uuid, ts=ts, risk=score, horizon_s=3600.0, mode="none", model=model,
                scored_at=ts, score=score, op="model:0.5x1")  # fmt: skip


def test_compare_reports_evals_figures_for_each_model() -> None:
    fail_ts = 10_000.0
    labels = Failures.parse([orjson.dumps({"uuid": "g1", "fail_ts": fail_ts, "mode": "memory",
                                            "precursor_start_ts": fail_ts - 3000, "repair_end_ts": fail_ts + 600})],
                            "labels")  # fmt: skip
    ts = np.arange(0.0, fail_ts, 60.0)
    records = []
    for t in ts:
        for uuid in ("g1", "g2"):
            near = uuid == "g1" and t > fail_ts - 1800
            records.append(_record("sharp", uuid, t, 0.9 if near else 0.01))
            records.append(_record("blind", uuid, t, 0.01))
    report = compare(records, labels, since=0.0, merge_gap_s=600.0, roles={"blind": "champion", "sharp": "challenger"})
    assert list(report["scorers"]) == ["blind", "sharp"]
    sharp, blind = report["scorers"]["sharp"], report["scorers"]["blind"]
    assert (sharp["recall"], sharp["precision"], blind["recall"]) == (1.0, 1.0, 0.0)
    assert sharp["median_lead_min"] == pytest.approx(30.0, abs=1.0)
    # the same figures `gpuwatch eval` computes (training.evaluate), not a second implementation of them
    mine = [r for r in records if r.model == "sharp"]
    table = RiskTable.from_columns([r.uuid for r in mine], np.array([r.ts for r in mine]),
                                   {"x": np.array([r.score for r in mine])}, {"x": np.zeros(len(mine), int)})
    direct = scorer_report(join_labels(table, labels, 3600.0), "x", 0.5, 600.0)
    assert {k: sharp[k] for k in ("precision", "recall", "pr_auc", "false_alarms")} == {
        k: direct[k] for k in ("precision", "recall", "pr_auc", "false_alarms")}


# ---------------------------------------------------------------- bad input: one line, non-zero exit


def test_model_commands_refuse_bad_input_in_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:  # fmt: skip
    monkeypatch.delenv("GPUWATCH_KAFKA_BOOTSTRAP", raising=False)
    assert main(["model", "promote"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GPUWATCH_KAFKA_BOOTSTRAP" in err


# ---------------------------------------------------------------- one worker, every step, no restart


def _passes(records: list[Risk]) -> set[tuple[str, float, float]]:
    """Each record's scoring pass: the champion's and the challenger's records of one pass share all three."""
    return {(r.uuid, r.ts, r.scored_at) for r in records}


@pytest.mark.slow
def test_shadow_promote_rollback_in_a_running_worker(settings: Settings, tmp_path: Path, challenger_pt: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    settings = settings.replace(rescore_interval_s=1.0, model_control_poll_s=0.2, model_registry=str(tmp_path / "reg"))
    for f in dataclasses.fields(settings):  # the in-process CLI reads the same settings as the worker
        monkeypatch.setenv(f"GPUWATCH_{f.name.upper()}", str(getattr(settings, f.name)))
    ensure_topics(settings, [settings.topic_samples, settings.topic_risk, settings.topic_risk_shadow,
                             settings.topic_deadletter])  # fmt: skip
    worker = start_stream_worker(settings)
    stop = threading.Event()
    sink = threading.Thread(target=run_risk_sink, args=(settings,), kwargs={"stop": stop}, daemon=True)
    sink.start()
    sim = FleetSimulator(FleetConfig(hosts=1, gpus_per_host=4, seed=8, start_ts=time.time() - 200))

    def publish() -> None:
        producer = make_producer(settings)
        while not stop.is_set():
            for host, value in sim.step_json():
                producer.produce(settings.topic_samples, key=host.encode(), value=value)
            producer.poll(0)
            # Ten simulated seconds a second, but never near max_future_s (300 s) ahead of the worker's clock: it
            # dead-letters snapshots stamped further ahead, and only silent-GPU refreshes would come out.
            time.sleep(0.1 if sim.now < time.time() + 60 else 1.0)
        producer.flush(5)

    feeder = threading.Thread(target=publish, daemon=True)
    feeder.start()
    topics = [settings.topic_risk, settings.topic_risk_shadow]

    def records_until(pred) -> dict[str, list[Risk]]:  # type: ignore[no-untyped-def]
        got = consume_from_start(settings, topics, lambda g: pred({t: [decode_risk(v) for v in g[t]] for t in g}), 60)
        return {t: [decode_risk(v) for v in vs] for t, vs in got.items()}

    try:
        # Issued while the worker starts: it takes the state at start-up or from its next read of the topic.
        assert main(["model", "shadow", str(challenger_pt)]) == 0
        capsys.readouterr()
        for argv, why in ((["shadow", str(tmp_path / "nope.pt")], "does not exist"), (["rollback"], "nothing to roll"),
                          (["compare"], "no labels")):  # fmt: skip
            assert main(["model", *argv]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and why in err, err
        # The two topics are read side by side, neither waits for the other: wait until the champion's record of
        # each scoring the challenger made has been read too.
        g = records_until(lambda g: len(g[settings.topic_risk_shadow]) >= 8 and _passes(g[settings.topic_risk_shadow])
                          <= _passes(g[settings.topic_risk]))  # fmt: skip
        shadow = g[settings.topic_risk_shadow]
        # A refresh of a silent GPU (its last sample scored again, after a stall of 10 s) advances no run: the
        # challenger's first record of a GPU can be one, not in alarm. Every other is (it alarms at any score).
        first_pass: dict[tuple[str, float], float] = {}
        for r in g[settings.topic_risk]:
            first_pass.setdefault((r.uuid, r.ts), r.scored_at)
        assert {r.model for r in shadow} == {"challenger-test"}
        assert all(r.alarm for r in shadow if not r.failed and first_pass[(r.uuid, r.ts)] == r.scored_at)
        assert {r.model for r in g[settings.topic_risk]} == {CHAMPION.version}
        client = RiskClient(redis.Redis.from_url(settings.redis_url))
        in_redis = wait_for(lambda: client.top(100), 20, "risk in Redis")
        assert {r.model for r in in_redis} == {CHAMPION.version}  # the sink never saw a shadow record

        assert main(["model", "promote"]) == 0
        g = records_until(lambda g: any(r.model == "challenger-test" for r in g[settings.topic_risk]))
        risk = g[settings.topic_risk]
        first_new = next(i for i, r in enumerate(risk) if r.model == "challenger-test")
        before = {r.uuid: r for r in risk[:first_new]}
        after = risk[first_new]
        assert after.history_s >= before[after.uuid].history_s  # type: ignore[operator]  # windows kept
        assert worker.alive()  # no restart

        assert main(["model", "rollback"]) == 0
        g = records_until(lambda g: any(r.model == "challenger-test" for r in g[settings.topic_risk])
                          and g[settings.topic_risk][-1].model == CHAMPION.version)  # fmt: skip
        assert worker.alive()
        capsys.readouterr()
        assert main(["model", "status"]) == 0
        status = capsys.readouterr().out
        assert f"rollback (seq 3): champion {CHAMPION.version}, challenger challenger-test" in status
        assert f"newest records on {settings.topic_risk} name: {CHAMPION.version}\n" in status
        labels = tmp_path / "labels.jsonl"
        labels.write_bytes(orjson.dumps({"uuid": risk[0].uuid, "fail_ts": time.time(), "mode": "memory"}) + b"\n")
        capsys.readouterr()
        assert main(["model", "compare", "--labels", str(labels)]) == 0
        out = capsys.readouterr().out
        assert f"champion: {CHAMPION.version}, challenger: challenger-test" in out and "PR-AUC (event)" in out
    finally:
        stop.set()
        worker.stop()
        sink.join(10)
