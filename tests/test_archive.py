"""The archive without Kafka: files and their recovery, retention, the readers score/eval/train use (the same as
JSONL), the failure labeller's rules (the stream's definition), the label store, and the commands' errors.
The Kafka edge and a SIGKILL mid-batch are in test_archive_kafka.py."""

from __future__ import annotations

import argparse
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from gpuwatch.apps.cli import main
from gpuwatch.archive import labels as L
from gpuwatch.archive.reader import ArchiveReader, is_archive
from gpuwatch.archive.storage import Storage
from gpuwatch.archive.tables import SAMPLES, decode_message, to_arrow
from gpuwatch.archive.writer import PENDING, ArchiveWriter, ensure_layout, import_recording
from gpuwatch.schemas import codecs
from gpuwatch.schemas import fields as F
from gpuwatch.schemas.codecs import decode_snapshot, encode_snapshot
from gpuwatch.schemas.records import Outcome as OutcomeRecord
from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.streams.window import WindowConfig, WindowStore
from gpuwatch.training.dataset import Failures, build_sequences
from gpuwatch.training.recording import open_recording
from gpuwatch.training.score import score_command

T0 = 1_700_000_000.0


# ---------------------------------------------------------------- crafted telemetry


def gpu(i: int = 0, **over: Any) -> dict[str, Any]:
    g = {name: 0.0 for name in F.REQUIRED_NUMERIC}
    g.update({"gpu_index": i, "uuid": f"GPU-{i}", "temp_c": 50.0, "power_w": 300.0, "power_limit_w": 700.0,
              "mem_total_mib": 80000.0, "util_gpu_pct": 90.0, "sm_clock_mhz": 1980.0, "fan_pct": None,
              "pcie_link_width": 16, "pcie_link_width_max": 16, "remap_pending": False, "remap_failure": False,
              "lost": False, "throttle_reasons": 0, "xid": []})  # fmt: skip
    g.update(over)
    return g


def rows_of(snaps: list[dict[str, Any]]) -> Any:
    """The archive's sample rows of snapshot dicts (as the writer builds them), in time order."""
    rows = [decode_message(SAMPLES, "t", 0, k, None, encode_snapshot(s)) for k, s in enumerate(snaps)]
    return to_arrow(SAMPLES, rows).select(L.LABEL_COLUMNS)


def series(*states: dict[str, Any], dt: float = 10.0, host: str = "h") -> list[dict[str, Any]]:
    """One GPU's snapshots, one per state (the fields that differ from a healthy sample), `dt` apart."""
    return [{"schema": F.SAMPLES_SCHEMA, "host": host, "ts": T0 + k * dt, "seq": k, "gpus": [gpu(**st)]}
            for k, st in enumerate(states)]  # fmt: skip


LOST = {"lost": True, "xid": [79], "temp_c": None, "power_w": None, "util_gpu_pct": None}
OK: dict[str, Any] = {}


@pytest.mark.parametrize(("states", "mode", "evidence"), [
    ([OK, LOST, LOST], "sudden", "lost; xid 79"),
    ([OK, {"xid": [48, 63]}], "memory", "xid 48,63"),
    ([OK, {"remap_failure": True}], "memory", "remap_failure"),
    ([OK, {"xid": [74, 79], "lost": True}], "interconnect", "lost; xid 74,79"),
    ([OK, {"pcie_link_width": 8}, OK, LOST], "interconnect", "lost; xid 79"),
    ([OK, {"throttle_reasons": F.THROTTLE_HW_THERMAL}, OK, LOST], "thermal", "lost; xid 79"),
    ([OK, {"throttle_reasons": F.THROTTLE_HW_POWER_BRAKE}, OK, {"xid": [62]}], "power", "xid 62"),
])  # fmt: skip
def test_each_failure_rule_starts_a_label_with_its_mode(states: list, mode: str, evidence: str) -> None:
    got = L.derive_failures([rows_of(series(*states))])
    start = next(k for k, st in enumerate(states) if st.get("lost") or st.get("remap_failure") or
                 set(st.get("xid", [])) & F.XID_FATAL)  # fmt: skip
    assert [(g["fail_ts"], g["mode"], g["evidence"]) for g in got] == [(T0 + 10 * start, mode, evidence)]


def test_application_and_harmless_xids_are_not_failures() -> None:
    assert (
        L.derive_failures(
            [rows_of(series(OK, {"xid": [31]}, {"xid": [13, 43]}, {"xid": [63]}, {"xid": [94]}))]
        )
        == []
    )


def test_a_power_brake_older_than_the_lookback_says_nothing_about_the_mode() -> None:
    states = [{"throttle_reasons": F.THROTTLE_HW_POWER_BRAKE}] + [OK] * 10 + [LOST]
    got = L.derive_failures([rows_of(series(*states, dt=L.MODE_LOOKBACK_S / 8))])
    assert [g["mode"] for g in got] == ["sudden"]


def test_a_failure_ends_when_the_gpu_answers_again_is_reset_or_works_a_minute_later() -> None:
    answers = L.derive_failures([rows_of(series(OK, LOST, LOST, OK, OK))])
    assert [(g["fail_ts"], g["repair_end_ts"]) for g in answers] == [(T0 + 10, T0 + 30)]
    # A fatal XID while still on the bus: working 20 s later is not a repair, 60 s later it is.
    works = L.derive_failures([rows_of(series(OK, {"xid": [62]}, OK, OK, OK, OK, OK, OK, {"xid": [62]}))])
    assert [(g["fail_ts"], g["repair_end_ts"]) for g in works] == [(T0 + 10, T0 + 70), (T0 + 80, None)]
    reset = L.derive_failures([rows_of(series({"ecc_sbe_volatile": 5}, {"xid": [48], "ecc_sbe_volatile": 5},
                                              {"util_gpu_pct": 0, "ecc_sbe_volatile": 0}))])  # fmt: skip
    assert [(g["fail_ts"], g["repair_end_ts"]) for g in reset] == [(T0 + 10, T0 + 20)]


def test_a_resent_snapshot_does_not_fail_a_gpu_twice() -> None:
    snaps = series(OK, LOST, OK)
    assert len(L.derive_failures([rows_of([*snaps[:2], snaps[1], *snaps[2:]])])) == 1


def test_the_labeller_and_the_stream_agree_on_when_a_gpu_failed() -> None:
    """Both apply gpuwatch.schemas.failure: the stream's failed_since is the labeller's fail_ts, sample by sample."""
    states = [OK, {"xid": [48]}, OK, OK, OK, OK, OK, OK, OK, LOST, LOST, OK, {"remap_failure": True}, OK]
    snaps = [decode_snapshot(encode_snapshot(s)) for s in series(*states)]
    store = WindowStore(WindowConfig())
    stream_starts = []
    for s in snaps:
        slots = store.slots_for(s.uuids, [s.host], s.gpu_index)
        store.update(slots, np.array([s.ts]), s.numeric, s.flags, s.throttle, s.xids)
        if store.failed[slots[0]] and store.failed_since[slots[0]] == s.ts:
            stream_starts.append(s.ts)
    labels = L.derive_failures([rows_of(series(*states))])
    assert [g["fail_ts"] for g in labels] == stream_starts == [T0 + 10, T0 + 90, T0 + 120]


def test_alarmed_and_missed_failures_both_become_labels_with_what_the_controller_did() -> None:
    failures = [
        {
            "host": "h",
            "gpu_index": 0,
            "uuid": "A",
            "fail_ts": T0,
            "mode": "memory",
            "repair_end_ts": T0 + 600,
        },
        {"host": "h", "gpu_index": 1, "uuid": "B", "fail_ts": T0, "mode": "sudden", "repair_end_ts": None},
    ]
    risk = [
        {"uuid": "A", "ts": T0 - 900, "alarm": True},
        {"uuid": "A", "ts": T0 - 4000, "alarm": True},
        {"uuid": "B", "ts": T0 - 60, "alarm": False},
    ]
    outcome = {"host": "h", "gpu_index": 0, "uuid": "A", "ok": True, "dry_run": False}
    outcomes = [
        {**outcome, "id": "1", "action": "checkpoint", "event_ts": T0 - 800},
        {**outcome, "id": "2", "action": "repair", "event_ts": T0 + 5},
        {**outcome, "id": "3", "uuid": "C", "gpu_index": 2, "action": "repair", "event_ts": T0 + 9000},
    ]
    got = {g["uuid"]: g for g in L.join_outcomes(failures, risk, outcomes)}  # fmt: skip
    assert got["A"]["alarmed"] and got["A"]["first_alarm_ts"] == T0 - 900
    assert [a["action"] for a in got["A"]["actions"]] == ["checkpoint", "repair"]
    assert not got["B"]["alarmed"] and got["B"]["actions"] == []
    assert got["C"]["source"] == "controller" and got["C"]["fail_ts"] == T0 + 9000


# ---------------------------------------------------------------- the label store


def test_the_label_store_versions_every_write_and_merges_operator_labels(tmp_path: Path) -> None:
    store = L.LabelStore(Storage(str(tmp_path)))
    derived = {"host": "h", "gpu_index": 0, "uuid": "A", "fail_ts": T0, "mode": "sudden", "precursor_start_ts": None,
               "repair_end_ts": None, "source": "telemetry", "alarmed": False}  # fmt: skip
    assert store.append("telemetry", [derived]) == 1
    op = {
        "kind": "failure",
        "host": "h",
        "gpu_index": 0,
        "uuid": "A",
        "fail_ts": T0 + 1200,
        "mode": "thermal",
        "by": "ops",
    }
    assert store.append("operator", [op, {**op, "uuid": "Z", "mode": "power"}]) == 2
    assert store.append("operator", [{"kind": "false_alarm", "host": "h", "gpu_index": 3, "uuid": "D",
                                      "ts": T0}]) == 3  # fmt: skip
    imported = {**derived, "precursor_start_ts": T0 - 300, "source": "import"}
    assert store.append("import", [imported]) == 4
    assert (
        store.append("telemetry", [{**derived, "repair_end_ts": T0 + 60}]) == 5
    )  # a later run knows the repair
    current = [orjson.loads(x) for x in store.labels_jsonl().splitlines()]
    assert [(c["uuid"], c["fail_ts"], c["mode"], c["source"]) for c in current] == [
        ("A", T0, "thermal", "telemetry+operator"),
        ("Z", T0 + 1200, "power", "operator"),
    ]
    assert (
        current[0]["repair_end_ts"] == T0 + 60 and current[0]["precursor_start_ts"] == T0 - 300
    )  # null erases nothing
    assert [orjson.loads(x)["mode"] for x in store.labels_jsonl(1).splitlines()] == [
        "sudden"
    ]  # versions stay
    assert [f["uuid"] for f in store.false_alarms()] == ["D"]
    assert len(list((tmp_path / "labels" / "log").iterdir())) == 5
    failures = Failures.parse(store.labels_jsonl().splitlines(), "store")  # what training reads
    assert set(failures.by_uuid) == {"A", "Z"}


def test_two_writers_cannot_take_the_same_version(tmp_path: Path) -> None:
    (tmp_path / "labels" / "log").mkdir(parents=True)
    (tmp_path / "labels" / "log" / "000001.jsonl").write_bytes(b"")  # another writer's, manifest not yet
    with pytest.raises(L.LabelStoreError, match="another writer is at work"):
        L.LabelStore(Storage(str(tmp_path))).append("telemetry", [])


def test_an_empty_label_store_says_how_to_fill_it(tmp_path: Path) -> None:
    with pytest.raises(L.LabelStoreError, match="gpuwatch labels derive"):
        L.LabelStore(Storage(str(tmp_path))).labels_jsonl()


# ---------------------------------------------------------------- files, recovery, retention


def _writer(storage: Storage) -> ArchiveWriter:
    return ArchiveWriter(storage, {"s": SAMPLES, "r": "risk"}, flush_rows=10**9, flush_interval_s=1e9)


def _snapshot(ts: float, host: str = "h") -> bytes:
    return encode_snapshot(
        {"schema": F.SAMPLES_SCHEMA, "host": host, "ts": ts, "seq": 0, "gpus": [gpu(0), gpu(1)]}
    )


def test_a_batch_written_but_not_committed_is_deleted_and_a_committed_one_kept(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    w = _writer(storage)
    for k in range(3):
        w.add("s", 0, 10 + k, b"h", _snapshot(T0 + k))
    assert w.flush() == {("s", 0): 13}
    w.committed({("s", 0): 13})
    w.add("s", 0, 13, b"h", _snapshot(T0 + 3, host="other"))
    w.add("s", 1, 7, b"h", _snapshot(T0 + 3))
    assert w.flush() == {("s", 0): 14, ("s", 1): 8}  # ... and the writer dies before the commit
    assert len(storage.files(SAMPLES)) == 3 and storage.files(PENDING) == [
        "_pending/s/0.json",
        "_pending/s/1.json",
    ]
    fresh = _writer(storage)
    assert fresh.recover("s", 0, 13) == 1  # committed up to 13: offset 13's file goes (it is read again)
    assert fresh.recover("s", 1, 8) == 0  # this one was committed before the writer died: kept
    assert fresh.recover("s", 2, None) == 0  # nothing pending there
    reader = ArchiveReader(storage)
    offsets = sorted(o for f in storage.files(SAMPLES) for o in reader.read(f)["kafka_offset"].to_pylist())
    assert offsets == [7, 7, 10, 10, 11, 11, 12, 12]  # two GPU rows per snapshot
    assert not (tmp_path / PENDING / "s" / "0.json").exists()


def test_retention_deletes_whole_days_older_than_the_limit(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    w = _writer(storage)
    for day in range(5):  # 2023-11-14 .. 2023-11-18
        w.add("s", 0, day, b"h", _snapshot(T0 + day * 86400.0))
    w.flush()
    assert w.expire(0) == []
    gone = w.expire(2, today=date(2023, 11, 19))
    assert gone == ["samples/day=2023-11-14", "samples/day=2023-11-15", "samples/day=2023-11-16"]
    assert [f.split("/")[1] for f in storage.files(SAMPLES)] == ["day=2023-11-17", "day=2023-11-18"]


def test_bad_messages_are_kept_as_dead_letters_with_the_reason(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    w = _writer(storage)
    w.add("s", 0, 0, b"h", b'{"schema": "gpuwatch.samples/1"}')
    w.add("r", 0, 0, b"h", None)
    w.flush()
    reader = ArchiveReader(storage)
    errors = sorted(e for f in storage.files("deadletter") for e in reader.read(f)["error"].to_pylist())
    assert (
        errors == ["host: missing required field", "message has no value (tombstone)"] and w.deadletters == 2
    )


def test_an_fsspec_location_holds_an_archive_too() -> None:
    storage = Storage("memory://gpuwatch-test-archive")
    ensure_layout(storage)
    w = _writer(storage)
    w.add("s", 0, 0, b"h", _snapshot(T0))
    w.committed(w.flush())
    assert is_archive("memory://gpuwatch-test-archive")
    [(_, raw)] = list(ArchiveReader("memory://gpuwatch-test-archive").snapshot_messages())
    assert decode_snapshot(raw).uuids == ["GPU-0", "GPU-1"]


def test_record_columns_are_the_records_fields() -> None:
    from gpuwatch.controller.executors import Outcome
    from gpuwatch.controller.worker import outcome_record
    from gpuwatch.schemas.records import Remediation, Risk, columns

    for name, cls in (("risk", Risk), ("remediation", Remediation), ("outcome", OutcomeRecord)):
        assert {n for n, _ in columns(cls)} == set(codecs.load_schema(name)["properties"]) - {"schema"}
    event = Remediation(id="x", host="h", gpu_index=0, uuid="u", action="repair", reason="", risk=1.0, ts=T0)
    rec = outcome_record(event, "dry-run", Outcome(ok=True, detail="d", dry_run=True), T0, 0.1)
    assert codecs.decode_outcome(codecs.encode_outcome(rec)) == rec


# ---------------------------------------------------------------- what score, eval and train read


def _archived_fleet(base: Path, hosts: int, days: float) -> tuple[Path, str]:
    """A simulated fleet rich in failures, as JSONL and as an archive of it (labels: the labeller's)."""
    simulate_to_dir(
        hosts,
        8,
        days,
        base / "sim",
        seed=5,
        interval_s=10.0,
        config_overrides={"rate_scale": 30000.0, "repair_time_scale": 0.005, "ts_jitter_s": 2.0},
    )
    archive = str(base / "archive")
    import_recording(str(base / "sim" / "samples.jsonl"), Storage(archive), flush_rows=20_000)
    L.LabelStore(Storage(archive)).append("telemetry", L.label_archive(ArchiveReader(archive)))
    return base / "sim", archive


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _archived_fleet(tmp_path_factory.mktemp("fleet"), 8, 0.12)


@pytest.fixture(scope="module")
def small_fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return _archived_fleet(tmp_path_factory.mktemp("small-fleet"), 2, 0.05)


def test_the_labellers_failures_are_the_simulators(fleet: tuple[Path, str]) -> None:
    sim, archive = fleet
    truth = [orjson.loads(x) for x in (sim / "labels.jsonl").read_bytes().splitlines()]
    truth = [t for t in truth if t["repair_end_ts"] is not None]  # the rest are precursors still running
    got = [orjson.loads(x) for x in L.LabelStore(Storage(archive)).labels_jsonl().splitlines()]
    pairs, hidden = [], 0
    for t in truth:
        same = [g for g in got if g["uuid"] == t["uuid"] and abs(g["fail_ts"] - t["fail_ts"]) <= 10.0]
        if same:  # within one sampling interval (10 s)
            pairs.append((t["mode"], same[0]["mode"]))
            continue
        # The one definition keeps a repaired GPU failed until it answers, is reset or works again: a GPU repaired
        # and left idle that fails anew is still in its earlier failure, for the stream as for the labeller.
        assert any(g["uuid"] == t["uuid"] and g["fail_ts"] < t["fail_ts"] and (g["repair_end_ts"] is None or
                   g["repair_end_ts"] > t["fail_ts"]) for g in got), f"missed {t}"  # fmt: skip
        hidden += 1
    assert len(truth) >= 20 and len(pairs) == len(got) and hidden <= len(truth) // 10
    # The cause is in the telemetry for memory (its XIDs) and NVLink failures (XID 74): those modes must match.
    assert all(derived == "memory" for mode, derived in pairs if mode == "memory")
    assert all(mode == "memory" for mode, derived in pairs if derived == "memory")


def test_an_archive_reads_back_as_its_jsonl_recording(small_fleet: tuple[Path, str]) -> None:
    sim, archive = small_fleet
    lines = [x for x in (sim / "samples.jsonl").read_bytes().splitlines() if x.strip()]
    archived = [raw for _, raw in open_recording(archive).messages()]
    assert len(archived) == len(lines)
    for a, b in zip(map(decode_snapshot, archived), map(decode_snapshot, lines)):
        assert (a.host, a.ts, a.seq, a.uuids, a.xids) == (b.host, b.ts, b.seq, b.uuids, b.xids)
        assert np.array_equal(a.numeric, b.numeric, equal_nan=True) and np.array_equal(a.flags, b.flags)
        assert np.array_equal(a.gpu_index, b.gpu_index) and np.array_equal(a.throttle, b.throttle)


def test_score_and_train_read_the_same_from_an_archive_as_from_jsonl(small_fleet: tuple[Path, str],
                                                                     tmp_path: Path) -> None:  # fmt: skip
    sim, archive = small_fleet
    store = L.LabelStore(Storage(archive))
    store.append("import", [orjson.loads(x) for x in (sim / "labels.jsonl").read_bytes().splitlines()])
    out = {}
    for name, source in (("jsonl", str(sim / "samples.jsonl")), ("archive", archive)):
        args = argparse.Namespace(input=source, output=str(tmp_path / f"{name}.jsonl"), actions="", model="",
                                  rescore_interval=30.0, device="cpu", json="", workers=1)  # fmt: skip
        assert score_command(args) == 0
        out[name] = [{k: v for k, v in orjson.loads(x).items() if k != "scored_at"}
                     for x in (tmp_path / f"{name}.jsonl").read_bytes().splitlines()]  # fmt: skip
    assert len(out["jsonl"]) > 500 and out["archive"] == out["jsonl"]
    a = build_sequences(open_recording(archive), sample_every_s=600.0)
    b = build_sequences(sim / "samples.jsonl", sim / "labels.jsonl", sample_every_s=600.0)
    assert int(b.y.sum()) > 0 and a.uuid == b.uuid
    for name in ("x", "y", "mode", "weight", "ts", "lead_s", "precursor"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


# ---------------------------------------------------------------- the commands' errors


@pytest.mark.parametrize(("argv", "message"), [
    (["label", "node-1", "--failed-at", "1", "--mode", "memory"], "is not HOST:GPU"),
    (["label", "node-1:0", "--failed-at", "yesterday", "--mode", "memory"], "is not a time"),
    (["label", "node-1:0", "--failed-at", "1700000000", "--mode", "melted"], "--mode must be one of"),
    (["label", "node-1:0", "--false-alarm"], "--false-alarm needs --at"),
    (["label", "node-1:0"], "give either --failed-at"),
    (["label", "node-1:0", "--failed-at", "2023-11-14T22:13:20Z", "--mode", "memory"], "no samples of node-1:0"),
    (["labels", "show", "--archive", ""], "no archive location"),
    (["archive", "--import", "/nonexistent-dir"], "has no samples.jsonl"),
    (["score", "--input", "/nonexistent-x", "--output", "/tmp/x.jsonl"], "neither a file nor an archive"),
])  # fmt: skip
def test_bad_command_lines_get_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if "no archive location" in message:
        monkeypatch.delenv("GPUWATCH_ARCHIVE_URL", raising=False)
    else:
        monkeypatch.setenv("GPUWATCH_ARCHIVE_URL", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_a_bad_labels_file_is_named_on_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sim").mkdir()
    (tmp_path / "sim" / "samples.jsonl").write_bytes(_snapshot(T0) + b"\n")
    (tmp_path / "sim" / "labels.jsonl").write_bytes(b'{"uuid": "A", "fail_ts": 1, "mode": "melted"}\n')
    assert main(["archive", "--import", str(tmp_path / "sim"), "--archive", str(tmp_path / "a")]) == 2
    assert "labels.jsonl:1: not a failure label (mode 'melted'" in capsys.readouterr().err
