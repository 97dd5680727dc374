"""The NVML sampler against a stand-in pynvml (this machine has no GPU): fields, units, unsupported fields,
a lost GPU, XID events, counter resets, batched reads and a missing library."""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator

import orjson
import pytest

from gpuwatch.apps.cli import main
from gpuwatch.producers.agent import NvmlSource
from gpuwatch.producers.nvml import NvmlSampler, NvmlUnavailable
from gpuwatch.schemas import fields as F
from gpuwatch.schemas.codecs import decode_snapshot
from gpuwatch.simulator.fake_nvml import FakeNvml

GPU_KEYS = {"gpu_index", "uuid", "throttle_reasons", "xid", *F.ALL_NUMERIC, *F.ALL_FLAGS}


@pytest.fixture()
def nvml() -> FakeNvml:
    return FakeNvml(4)


@pytest.fixture()
def sampler(nvml: FakeNvml) -> Iterator[NvmlSampler]:
    s = NvmlSampler(nvml, xid_wait_ms=50)
    yield s
    s.close()


def _wait_for_xids(sampler: NvmlSampler, n: int) -> None:
    deadline = time.monotonic() + 5
    while sampler.xids.xids < n:
        assert time.monotonic() < deadline, "the XID thread did not pick up the events"
        time.sleep(0.01)


def test_every_field_of_the_contract_with_nvml_units(nvml: FakeNvml, sampler: NvmlSampler) -> None:
    g = nvml.gpus[2]
    g.power_mw, g.power_limit_mw = 312_500, 700_000
    g.mem_used, g.mem_total = 61234 << 20, 81559 << 20
    g.ecc_sbe_vol, g.ecc_dbe_vol, g.ecc_sbe_agg, g.ecc_dbe_agg = 3, 1, 40, 2
    g.retired_sbe, g.retired_dbe, g.retired_pending = [0x1000, 0x2000], [0x3000], 1
    g.remapped_cor, g.remapped_unc, g.remap_pending, g.remap_failure = 2, 1, 1, 0
    g.pcie_replay, g.link_width, g.link_gen = 5, 8, 4
    g.nvlink[0] = [7, 1, 3, 2]  # replay, recovery, crc flit, crc data
    g.nvlink[5] = [1, 0, 4, 0]
    g.throttle_reasons = F.THROTTLE_SW_POWER_CAP | F.THROTTLE_HW_SLOWDOWN
    g.power_violation_ns, g.thermal_violation_ns = 2_500_000, 1_000
    g.fan_pct = 55

    gpus = sampler.read()
    assert [s["gpu_index"] for s in gpus] == [0, 1, 2, 3]
    for s in gpus:
        assert set(s) == GPU_KEYS
    s = gpus[2]
    assert s["uuid"] == g.uuid
    assert s["power_w"] == 312.5 and s["power_limit_w"] == 700.0
    assert (s["mem_used_mib"], s["mem_total_mib"]) == (61234, 81559)
    assert (s["temp_c"], s["util_gpu_pct"], s["util_mem_pct"], s["fan_pct"]) == (45, 97, 41, 55)
    assert (s["sm_clock_mhz"], s["mem_clock_mhz"]) == (1980, 2619)
    ecc = (s["ecc_sbe_volatile"], s["ecc_dbe_volatile"], s["ecc_sbe_aggregate"], s["ecc_dbe_aggregate"])
    assert ecc == (3, 1, 40, 2)
    assert s["retired_pages"] == 3 and s["retired_pages_pending"] is True
    assert (s["remapped_rows_correctable"], s["remapped_rows_uncorrectable"]) == (2, 1)
    assert s["remap_pending"] is True and s["remap_failure"] is False and s["lost"] is False
    assert s["pcie_replay"] == 5
    link = (s["pcie_link_width"], s["pcie_link_width_max"], s["pcie_link_gen"], s["pcie_link_gen_max"])
    assert link == (8, 16, 4, 5)
    assert s["nvlink_crc_errors"] == 3 + 2 + 4
    assert (s["nvlink_replay_errors"], s["nvlink_recovery_errors"]) == (8, 1)
    assert s["throttle_reasons"] == 0xC
    assert (s["power_violation_us"], s["thermal_violation_us"]) == (2500, 1)  # NVML counts nanoseconds
    assert s["xid"] == []


def test_counters_come_from_one_batched_call_per_gpu(nvml: FakeNvml, sampler: NvmlSampler) -> None:
    sampler.read()  # the first sample also reads the static maximum link width and generation
    nvml.calls.clear()
    sampler.read()
    assert nvml.calls["nvmlDeviceGetFieldValues"] == 4
    for single in ("nvmlDeviceGetTotalEccErrors", "nvmlDeviceGetRemappedRows", "nvmlDeviceGetRetiredPages",
                   "nvmlDeviceGetPcieReplayCounter", "nvmlDeviceGetNvLinkErrorCounter",
                   "nvmlDeviceGetViolationStatus", "nvmlDeviceGetMaxPcieLinkWidth"):  # fmt: skip
        assert nvml.calls[single] == 0, single


def test_without_batched_reads_the_values_are_the_same() -> None:
    batched, single = FakeNvml(2), FakeNvml(2, field_values=False)
    for fake in (batched, single):
        g = fake.gpus[1]
        g.ecc_sbe_vol, g.ecc_dbe_agg, g.retired_dbe, g.remapped_cor, g.remap_failure = 4, 1, [9], 3, 1
        g.pcie_replay, g.power_violation_ns = 11, 7_000
        g.nvlink[3] = [1, 2, 3, 4]
    a, b = NvmlSampler(batched, xid_events=False), NvmlSampler(single, xid_events=False)
    assert a.read() == b.read()
    assert single.calls["nvmlDeviceGetTotalEccErrors"] == 8 and single.calls["nvmlDeviceGetRemappedRows"] == 2
    assert a.errors == b.errors == 0


def test_a_field_id_the_driver_does_not_know_falls_back_to_its_own_call() -> None:
    fake = FakeNvml(1, unknown_field_ids={142})  # NVML_FI_DEV_REMAPPED_COR on an older driver
    fake.gpus[0].remapped_cor = 6
    s = NvmlSampler(fake, xid_events=False)
    assert s.read()[0]["remapped_rows_correctable"] == 6
    assert fake.calls["nvmlDeviceGetRemappedRows"] == 1 and fake.calls["nvmlDeviceGetTotalEccErrors"] == 0


def test_unsupported_fields_are_null_not_errors(nvml: FakeNvml, sampler: NvmlSampler) -> None:
    g = nvml.gpus[1]
    g.fan_pct = None  # passively cooled
    g.unsupported |= {"ecc", "remap", "retired", "violation", "pcie_link", "throttle"}
    g.nvlink = {}  # a PCIe card without NVLink
    s = sampler.read()[1]
    for key in ("fan_pct", "ecc_sbe_volatile", "ecc_dbe_aggregate", "remapped_rows_correctable", "remap_pending",
                "retired_pages", "retired_pages_pending", "power_violation_us", "pcie_link_width",
                "pcie_link_width_max", "throttle_reasons", "nvlink_crc_errors", "nvlink_replay_errors"):  # fmt: skip
        assert s[key] is None, key
    assert s["lost"] is False and s["temp_c"] == 45
    assert sampler.errors == 0
    decode_snapshot(orjson.dumps({"schema": F.SAMPLES_SCHEMA, "host": "n", "ts": 1.0, "seq": 0, "gpus": [s]}))


def test_unsupported_fields_without_batched_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(1, field_values=False)
    fake.gpus[0].unsupported |= {"ecc", "remap"}
    fake.gpus[0].nvlink = {}
    s = NvmlSampler(fake, xid_events=False)
    g = s.read()[0]
    assert g["ecc_sbe_volatile"] is None and g["remap_failure"] is None and g["nvlink_crc_errors"] is None
    assert s.errors == 0


def test_a_lost_gpu_is_published_as_lost_and_the_others_keep_reporting(
    nvml: FakeNvml, sampler: NvmlSampler
) -> None:
    source = NvmlSource(sampler, "node-1")
    nvml.gpus[3].lost = True
    nvml.inject_xid(3, 79)  # fallen off the bus
    _wait_for_xids(sampler, 1)
    [(_, raw)] = source.tick()
    snap = decode_snapshot(raw)
    gpus = orjson.loads(raw)["gpus"]
    lost = gpus[3]
    assert lost["lost"] is True and lost["uuid"] == nvml.gpus[3].uuid and lost["xid"] == [79]
    assert all(lost[k] is None for k in F.ALL_NUMERIC) and lost["throttle_reasons"] is None
    assert [g["lost"] for g in gpus[:3]] == [False] * 3 and gpus[0]["temp_c"] == 45
    assert bool(snap.flags[3, F.ALL_FLAGS.index("lost")]) and sampler.lost_count == 1

    nvml.gpus[3].lost = False  # back after a reset
    [(_, raw)] = source.tick()
    assert orjson.loads(raw)["gpus"][3]["lost"] is False and sampler.lost_count == 0
    assert sampler.errors == 0


def test_unknown_error_counts_as_lost_and_a_gpu_lost_at_start_still_appears() -> None:
    fake = FakeNvml(2)
    fake.gpus[1].lost = True  # nvmlDeviceGetHandleByIndex fails already
    s = NvmlSampler(fake, xid_events=False)
    g = s.read()
    assert g[1]["lost"] is True and g[1]["uuid"] == "" and g[1]["gpu_index"] == 1
    fake.gpus[1].lost = False
    fake.gpus[0].unknown_error = True
    g = s.read()
    assert g[0]["lost"] is True
    assert g[1]["lost"] is False and g[1]["uuid"] == fake.gpus[1].uuid  # handle and UUID read again
    s.close()


def test_every_xid_between_two_samples_is_reported_once_in_order(
    nvml: FakeNvml, sampler: NvmlSampler
) -> None:
    assert sampler.read()[0]["xid"] == []
    for code in (13, 31, 13, 13):  # a repeated XID is a new event each time, not one gauge value
        nvml.inject_xid(0, code)
    nvml.inject_xid(2, 48)
    nvml.inject_ecc_event(2, double_bit=True)  # ECC events are counted; the counters carry the numbers
    _wait_for_xids(sampler, 5)
    gpus = sampler.read()
    assert gpus[0]["xid"] == [13, 31, 13, 13]
    assert gpus[2]["xid"] == [48]
    assert gpus[1]["xid"] == [] and gpus[3]["xid"] == []
    assert [g["xid"] for g in sampler.read()] == [[], [], [], []]
    deadline = time.monotonic() + 5
    while sampler.xids.ecc_events < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sampler.xids.ecc_events == 1


def test_an_xid_storm_is_carried_over_within_the_contract_limit(nvml: FakeNvml, sampler: NvmlSampler) -> None:
    for i in range(100):
        nvml.inject_xid(1, 1000 + i)
    _wait_for_xids(sampler, 100)
    first, second = sampler.read()[1]["xid"], sampler.read()[1]["xid"]
    assert len(first) == 64 and first + second == [1000 + i for i in range(100)]


def test_counter_reset_is_reported_as_the_new_lower_value(nvml: FakeNvml, sampler: NvmlSampler) -> None:
    g = nvml.gpus[0]
    g.ecc_sbe_vol, g.ecc_sbe_agg, g.pcie_replay, g.power_violation_ns = 120, 500, 33, 9_000_000
    g.nvlink[1] = [5, 5, 5, 5]
    before = sampler.read()[0]
    nvml.driver_reload(0)
    g.ecc_sbe_vol = 1
    after = sampler.read()[0]
    assert (before["ecc_sbe_volatile"], after["ecc_sbe_volatile"]) == (120, 1)
    assert (before["pcie_replay"], after["pcie_replay"]) == (33, 0)
    assert (before["power_violation_us"], after["power_violation_us"]) == (9000, 0)
    assert (before["nvlink_crc_errors"], after["nvlink_crc_errors"]) == (10, 0)
    assert after["ecc_sbe_aggregate"] == 500  # lifetime counters survive a reload


def test_snapshots_pass_the_consumer_codec(nvml: FakeNvml, sampler: NvmlSampler) -> None:
    source = NvmlSource(sampler, "gpu-node-17")
    nvml.gpus[1].unsupported |= {"ecc", "fan"}
    nvml.gpus[2].lost = True
    for seq in range(3):
        [(host, raw)] = source.tick()
        snap = decode_snapshot(raw, now=time.time())
        assert (host, snap.host, snap.seq, len(snap.uuids)) == ("gpu-node-17", "gpu-node-17", seq, 4)


def test_no_event_support_leaves_xid_lists_empty() -> None:
    fake = FakeNvml(2, events=False)
    s = NvmlSampler(fake)
    assert s.xids is not None and not s.xids.available
    assert [g["xid"] for g in s.read()] == [[], []]
    s.close()


def test_older_nvidia_ml_py_without_clock_event_reasons() -> None:
    fake = FakeNvml(1)
    fake.nvmlDeviceGetCurrentClocksEventReasons = None  # older bindings only have the throttle name
    fake.gpus[0].throttle_reasons = F.THROTTLE_SW_THERMAL
    s = NvmlSampler(fake, xid_events=False)
    assert s.read()[0]["throttle_reasons"] == F.THROTTLE_SW_THERMAL
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 1


def test_close_stops_the_event_thread_and_shuts_nvml_down(nvml: FakeNvml) -> None:
    s = NvmlSampler(nvml, xid_wait_ms=50)
    thread = s.xids._thread
    assert nvml.initialized == 1 and thread is not None and thread.is_alive()
    s.close()
    s.close()
    assert nvml.initialized == 0 and not thread.is_alive() and nvml.calls["nvmlEventSetFree"] == 1


def test_missing_library_is_one_clear_error() -> None:
    with pytest.raises(NvmlUnavailable, match="libnvidia-ml.so.1 was not found"):
        NvmlSampler(FakeNvml(library_missing=True))
    with pytest.raises(NvmlUnavailable, match="sees 0 GPUs"):
        NvmlSampler(FakeNvml(0))


def _module_from(fake: FakeNvml) -> types.ModuleType:
    module = types.ModuleType("pynvml")
    for name in dir(fake):
        if name.startswith(("nvml", "NVML")):
            setattr(module, name, getattr(fake, name))
    return module


def test_cli_exits_non_zero_with_one_message_when_nvml_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    monkeypatch.setenv("GPUWATCH_KAFKA_BOOTSTRAP", "127.0.0.1:9")
    argv = ["agent", "--spool-dir", str(tmp_path)]
    monkeypatch.setitem(sys.modules, "pynvml", _module_from(FakeNvml(library_missing=True)))
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "libnvidia-ml.so.1 was not found" in err[0]

    monkeypatch.setitem(sys.modules, "pynvml", None)  # nvidia-ml-py not installed: import fails
    assert main(argv) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'gpuwatch[nvml]'" in err[0]
