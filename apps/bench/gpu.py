"""`gpuwatch bench gpu`: the checks only a machine with a real NVIDIA GPU and driver can run, in one go.

1. nvml: the real NVML sampler (nvidia-ml-py) on every GPU here. Driver and GPU names; one snapshot put
   through the samples codec (the contract holds on real readings); every NVML query the sampler made as
   read, unsupported or failed (with the error), and which sample fields this GPU leaves null;
   the wall time of `read()` over all GPUs, i.e. the real driver's call latency the stand-in leaves out.
2. cuda: the stream's batch step (`RiskProcessor`) on CUDA and on CPU over the same simulated snapshots:
   the risk records must agree; and scoring throughput, full sequences and incremental steps, per device.
3. agent: `gpuwatch bench agent` with the real NVML: CPU and memory of the agent process at 1 Hz while a
   child process keeps the GPU busy with bf16 matrix products (a production GPU is not idle).
4. xid: while that agent still runs, a child process makes a CUDA kernel write to an unmapped address,
   which the driver reports as an XID (31, MMU fault, on current drivers). The check waits for an
   in-process sampler to carry it in a sample, and reads the agent's published snapshots for it.
5. real_risk: the agent's published snapshots of the real, loaded GPU scored by the shipped model
   (a short window: the agent ran for about a minute), so a healthy busy H100/H200 can be seen not to alarm.

Nothing here is modelled: every figure is read on the machine it runs on. It needs a GPU, the NVIDIA
driver, nvidia-ml-py and a CUDA build of torch; without them it stops at once and says which is missing.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

from gpuwatch.apps.bench.table import emit
from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.schemas.records import Risk

# bf16 matrix products until killed: the GPU busy at full power while the agent samples it.
_LOAD = """
import torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
print("load running", flush=True)
while True:
    for _ in range(20):
        c = a @ b
    torch.cuda.synchronize()
"""

# A kernel that writes to an address no allocation maps: the driver stops the context and logs an XID.
_FAULT_CUPY = r"""
import cupy, numpy
kernel = cupy.RawKernel('extern "C" __global__ void poke(int* p) { p[0] = 1; }', "poke")
kernel((1,), (1,), (numpy.uint64(0x7F0000000000),))
cupy.cuda.runtime.deviceSynchronize()
"""
_FAULT_TORCH = """
import torch
x = torch.zeros(16, device="cuda")
x[torch.tensor([1 << 40], device="cuda")] = 1.0
torch.cuda.synchronize()
"""


class GpuCheckUnavailable(RuntimeError):
    """This machine cannot run the GPU check (no driver, no nvidia-ml-py, no CUDA torch); the message says which."""


def _say(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def _ms(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": round(1000 * statistics.median(ordered), 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
        "max_ms": round(1000 * ordered[-1], 3),
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_check(nvml: Any, reads: int = 200) -> dict[str, Any]:
    """The real sampler on every GPU: inventory, contract check, null fields, read latency."""
    from gpuwatch.producers.nvml import NvmlSampler
    from gpuwatch.schemas.codecs import decode_snapshot, encode_snapshot
    from gpuwatch.schemas.fields import SAMPLES_SCHEMA

    sampler = NvmlSampler(nvml, xid_events=False)
    try:
        t0 = time.perf_counter()
        first = sampler.read()
        first_s = time.perf_counter() - t0
        times = []
        for _ in range(reads):
            t0 = time.perf_counter()
            gpus = sampler.read()
            times.append(time.perf_counter() - t0)
        raw = encode_snapshot({"schema": SAMPLES_SCHEMA, "host": "gpu-check", "ts": time.time(), "seq": 0,
                               "gpus": gpus})  # fmt: skip
        decode_snapshot(raw)  # the stream's own check, on real readings
        names = [_text(nvml.nvmlDeviceGetName(d.handle)) for d in sampler.devices]
        nulls = sorted(k for k, v in first[0].items() if v is None)
        queries = dict(sorted(sampler.query_status.items()))
        return {
            "driver": _text(nvml.nvmlSystemGetDriverVersion()),
            "nvml_version": _text(getattr(nvml, "nvmlSystemGetNVMLVersion", lambda: "?")()),
            "gpus": sampler.gpu_count,
            "gpu_names": names,
            "first_read_ms": round(1000 * first_s, 3),
            "read_all_gpus": _ms(times),
            "read_per_gpu_p50_ms": round(1000 * statistics.median(times) / sampler.gpu_count, 3),
            "reads": reads,
            "unexpected_nvml_errors": sampler.errors,
            "null_fields_gpu0": nulls,
            # every NVML query the sampler made (function, or `field KEY` of the batched counters): read,
            # unsupported (NotSupported: the field is null) or failed (any other error, with its text)
            "queries": queries,
            "queries_by_status": {st: sum(1 for v in queries.values() if v.split(":")[0] == st)
                                  for st in ("read", "unsupported", "failed")},  # fmt: skip
            "sample_gpu0": gpus[0],
            "snapshot_bytes": len(raw),
            "contract_ok": True,
        }
    finally:
        sampler.close()


def cuda_check(gpus: int = 512, minutes: float = 15.0, devices: tuple[str, str] = ("cpu", "cuda")) -> dict[str, Any]:
    """RiskProcessor on CUDA vs CPU over the same snapshots, and Scorer throughput per device.

    `devices` is (reference, device under test); figures are keyed "cpu" and "cuda" whatever they are."""
    import torch

    from gpuwatch.apps.bench.stream import _messages
    from gpuwatch.streams.model import Scorer, load_artifact
    from gpuwatch.streams.processor import Inbound, RiskProcessor

    if devices[1] == "cuda" and not torch.cuda.is_available():
        raise GpuCheckUnavailable("torch sees no CUDA GPU (a CPU build of torch, or no driver); run it on a GPU "
                                  "machine with a CUDA build of torch")
    artifact = load_artifact()
    msgs = _messages(gpus, int(minutes * 60), seed=11)
    inbound = [Inbound(v, "gpu-check", 0, i) for i, (_, v) in enumerate(msgs)]
    out: dict[str, Any] = {"torch": torch.__version__, "devices": list(devices),
                           "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                           "replay_gpus": gpus, "replay_gpu_samples": 0}  # fmt: skip
    records: dict[str, list[Risk]] = {}
    for key, device in zip(("cpu", "cuda"), devices):
        processor = RiskProcessor(Scorer(artifact, device=device))
        recs: list[Risk] = []
        t0 = time.perf_counter()
        samples = 0
        for i in range(0, len(inbound), 256):  # the worker's batches are a few hundred snapshots
            r = processor.process(inbound[i : i + 256])
            samples += r.samples
            recs += [decode_risk(v) for _, v in r.risk]
        out[f"replay_{key}_samples_per_s"] = round(samples / (time.perf_counter() - t0))
        out["replay_gpu_samples"] = samples
        records[key] = recs
    cpu, gpu = records["cpu"], records["cuda"]
    same_keys = [(r.uuid, r.ts) for r in cpu] == [(r.uuid, r.ts) for r in gpu]
    diffs = [abs(a.risk - b.risk) for a, b in zip(cpu, gpu)] if same_keys else [float("inf")]
    thr = artifact.threshold
    out.update(
        risk_records=len(cpu),
        same_records=same_keys,
        max_abs_risk_diff=max(diffs, default=0.0),
        threshold_side_disagreements=sum((a.risk >= thr) != (b.risk >= thr) for a, b in zip(cpu, gpu)),
        mode_disagreements=sum(a.mode != b.mode for a, b in zip(cpu, gpu)),
    )

    rng = np.random.default_rng(0)
    seq_len, n_feat = artifact.window.seq_len, len(artifact.features)
    for key, device in zip(("cpu", "cuda"), devices):
        scorer = Scorer(artifact, device=device)
        for batch in (256, 4096, 32768):
            seqs = rng.normal(size=(batch, seq_len, n_feat)).astype(np.float32)
            scorer.score(seqs)  # warm-up (CUDA context, cuDNN plans)
            full, step = [], []
            h, c = scorer.encode_past(seqs[:, :-1])
            scorer.score_from_state(h, c, seqs[:, -1])
            for _ in range(5):
                t0 = time.perf_counter()
                scorer.score(seqs)  # returns numpy: the device work has finished
                full.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                scorer.score_from_state(h, c, seqs[:, -1])
                step.append(time.perf_counter() - t0)
            out[f"{key}_full_seqs_per_s_b{batch}"] = round(batch / statistics.median(full))
            out[f"{key}_step_seqs_per_s_b{batch}"] = round(batch / statistics.median(step))
    return out


def _child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def provoke_xid() -> dict[str, Any]:
    """Runs the faulting kernel in a child process; its exit code and the last line it printed."""
    try:
        import cupy  # noqa: F401

        code, how = _FAULT_CUPY, "cupy kernel writing to an unmapped address"
    except ImportError:
        code, how = _FAULT_TORCH, "torch index far out of bounds (device-side assert)"
    proc = _child(code)
    output, _ = proc.communicate(timeout=120)
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    return {"how": how, "child_exit": proc.returncode, "child_said": lines[-1][-240:] if lines else ""}


def xid_check(nvml: Any, provoke: Callable[[], dict[str, Any]], wait_s: float = 20.0) -> dict[str, Any]:
    """An in-process sampler with the XID collector; `provoke` makes the GPU raise one; wait for it."""
    from gpuwatch.producers.nvml import NvmlSampler

    sampler = NvmlSampler(nvml, xid_events=True, xid_wait_ms=200)
    try:
        collector = sampler.xids
        available = bool(collector and collector.available)
        sampler.read()
        out: dict[str, Any] = {"event_set_available": available}
        t0 = time.monotonic()
        out.update(provoke())
        seen: list[tuple[int, int]] = []
        while time.monotonic() - t0 < wait_s and not seen:
            for g in sampler.read():
                seen += [(g["gpu_index"], x) for x in g["xid"]]
            time.sleep(0.2)
        out.update(
            xids_in_samples=[f"gpu {i}: XID {x}" for i, x in seen],
            seconds_to_sample=round(time.monotonic() - t0, 2) if seen else None,
            collector_xids=collector.xids if collector else 0,
            collector_errors=collector.errors if collector else 0,
            lost_after=sampler.lost_count,
        )
        return out
    finally:
        sampler.close()


def score_published(snapshots: list[bytes]) -> dict[str, Any]:
    """The shipped model's risk for the agent's snapshots of the real GPU (CPU scoring, the stream's code)."""
    from gpuwatch.streams.model import Scorer, load_artifact
    from gpuwatch.streams.processor import Inbound, RiskProcessor

    artifact = load_artifact()
    processor = RiskProcessor(Scorer(artifact, device="cpu"), rescore_interval_s=1.0)
    risks: list[float] = []
    for i, value in enumerate(snapshots):
        r = processor.process([Inbound(value, "gpu-check", 0, i)])
        risks += [decode_risk(v).risk for _, v in r.risk]
    return {
        "snapshots": len(snapshots),
        "risk_records": len(risks),
        "max_risk": round(max(risks, default=0.0), 4),
        "median_risk": round(statistics.median(risks), 4) if risks else None,
        "records_at_or_above_threshold": sum(r >= artifact.threshold for r in risks),
        "threshold": artifact.threshold,
        "model": artifact.version,
        "window_note": f"about {len(snapshots)} s of samples: {artifact.window.seq_len} rows of "
        f"{artifact.window.stride_s:g} s make a full window, so this window is short",
    }


def run_gpu_check(json_path: str | None, *, seconds: float = 40.0) -> dict[str, Any]:
    """Runs every check, prints one table and writes the figures to `json_path`; returns them."""
    from gpuwatch.apps.bench.agent import run_agent_bench
    from gpuwatch.producers.agent import load_pynvml
    from gpuwatch.producers.nvml import NvmlUnavailable

    figures: dict[str, Any] = {}
    _say("1/5 NVML sampler on the real driver")
    try:
        nvml = load_pynvml()
        figures["nvml"] = nvml_check(nvml)
    except NvmlUnavailable as exc:
        raise GpuCheckUnavailable(f"{exc}; this check needs a machine with an NVIDIA GPU") from None
    _say("2/5 CUDA inference vs CPU")
    figures["cuda"] = cuda_check()
    _say("3/5 the agent with the real NVML, GPU under load")
    load = _child(_LOAD)
    assert load.stdout is not None
    started = load.stdout.readline().strip()  # "load running" once the first product was queued
    if started != "load running":
        load.kill()
        raise RuntimeError(f"the GPU load did not start: {started}")
    xid: dict[str, Any] = {}

    def during() -> None:
        _say("4/5 XID events: provoking an MMU fault in a child process")
        load.kill()
        load.wait()
        xid.update(xid_check(nvml, provoke_xid))
        time.sleep(3)  # the agent's next tick carries the XID

    try:
        agent = run_agent_bench(None, seconds=seconds, real_nvml=True, during=during, keep_snapshots=True)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    snapshots = agent.pop("snapshots")
    figures["agent"] = agent
    figures["xid"] = xid
    _say("5/5 the shipped model on the real GPU's snapshots")
    figures["real_risk"] = score_published(snapshots)
    n, c, a, x, rr = figures["nvml"], figures["cuda"], figures["agent"], figures["xid"], figures["real_risk"]
    rows = [
        ("gpu", f"{n['gpus']} x {n['gpu_names'][0]}", f"driver {n['driver']}"),
        ("nvml_read_all_gpus_p50_ms", n["read_all_gpus"]["p50_ms"], f"p99 {n['read_all_gpus']['p99_ms']} ms, "
         f"{n['reads']} reads of every GPU"),
        ("nvml_unexpected_errors", n["unexpected_nvml_errors"], "not NotSupported, not lost"),
        ("nvml_queries_read", n["queries_by_status"]["read"], f"of {len(n['queries'])} NVML queries"),
        ("nvml_queries_unsupported", n["queries_by_status"]["unsupported"],
         ", ".join(k for k, v in n["queries"].items() if v == "unsupported") or "none"),
        ("nvml_queries_failed", n["queries_by_status"]["failed"],
         ", ".join(f"{k} ({v[8:]})" for k, v in n["queries"].items() if v.startswith("failed")) or "none"),
        ("nvml_null_fields", len(n["null_fields_gpu0"]), ", ".join(n["null_fields_gpu0"]) or "none"),
        ("contract_ok", n["contract_ok"], "a real snapshot encodes and decodes with the samples codec"),
        ("cuda_vs_cpu_max_abs_risk_diff", c["max_abs_risk_diff"], f"over {c['risk_records']:,} risk records"),
        ("cuda_vs_cpu_threshold_flips", c["threshold_side_disagreements"], "records on the other side of "
         "the threshold"),
        ("replay_cuda_samples_per_s", c["replay_cuda_samples_per_s"], f"CPU: {c['replay_cpu_samples_per_s']:,}"),
        ("cuda_full_seqs_per_s_b32768", c["cuda_full_seqs_per_s_b32768"],
         f"CPU: {c['cpu_full_seqs_per_s_b32768']:,}"),
        ("cuda_step_seqs_per_s_b32768", c["cuda_step_seqs_per_s_b32768"],
         f"CPU: {c['cpu_step_seqs_per_s_b32768']:,}"),
        ("agent_cpu_pct_one_core", a["cpu_pct_one_core"], f"real NVML, {a['gpus']} GPU(s) at 1 Hz, GPU busy"),
        ("agent_rss_mb", a["rss_mb"], "MiB resident"),
        ("agent_snapshots_invalid", a["snapshots_invalid"], f"of {a['snapshots_published']} read back"),
        ("xid_event_set_available", x.get("event_set_available"), x.get("how", "")),
        ("xid_in_sampler", ", ".join(x.get("xids_in_samples", [])) or "none",
         f"{x.get('seconds_to_sample')} s after the fault; child: {x.get('child_said', '')[:60]}"),
        ("xid_in_agent_snapshots", ", ".join(map(str, a["xids_published"])) or "none", "read back from Kafka"),
        ("real_gpu_max_risk", rr["max_risk"], f"{rr['risk_records']} records, threshold {rr['threshold']}"),
    ]  # fmt: skip
    emit("gpuwatch bench gpu (real GPU, driver and CUDA)", rows, figures, json_path)
    return figures


# Memory-bound work: device-to-device copies of 8 GiB, the HBM busy and the SMs mostly idle.
_MEMORY_LOAD = """
import torch
a = torch.empty(2 << 30, device="cuda", dtype=torch.float32)
b = torch.empty_like(a)
print("load running", flush=True)
while True:
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
"""
# (seconds from start, what happens): the GPU's phases in `record_trace`'s default recording.
TRACE_SCHEDULE: tuple[tuple[float, str], ...] = (
    (0, "idle"), (45, "compute"), (150, "memory"), (195, "xid"), (196, "idle"), (240, "compute"), (315, "idle"),
)  # fmt: skip


def record_trace(path: str, *, seconds: float = 360.0, interval_s: float = 1.0,
                 schedule: tuple[tuple[float, str], ...] = TRACE_SCHEDULE) -> dict[str, Any]:  # fmt: skip
    """Records this machine's real GPUs to `path` (one `gpuwatch.samples/1` snapshot per line, as
    `gpuwatch score --input` reads) while `schedule` drives them: idle, compute (bf16 matrix products),
    memory (HBM copies), xid (an application's illegal address: XID 31, the GPU itself is healthy).
    Writes `path`.phases.json with the phase start times. Nothing fails here: a healthy-GPU recording."""
    from gpuwatch.producers.agent import load_pynvml
    from gpuwatch.producers.nvml import NvmlSampler
    from gpuwatch.schemas.codecs import encode_snapshot
    from gpuwatch.schemas.fields import SAMPLES_SCHEMA

    sampler = NvmlSampler(load_pynvml(), xid_events=True, xid_wait_ms=200)
    loads = {"compute": _LOAD, "memory": _MEMORY_LOAD}
    child: subprocess.Popen[str] | None = None
    phases: list[dict[str, Any]] = []
    pending = list(schedule)
    t0 = time.time()
    seq = 0
    try:
        with open(path, "wb") as out:
            while (now := time.time()) - t0 < seconds:
                while pending and now - t0 >= pending[0][0]:
                    _, what = pending.pop(0)
                    if child is not None:
                        child.kill()
                        child.wait()
                        child = None
                    phases.append({"at_ts": now, "phase": what})
                    _say(f"{now - t0:6.1f} s: {what}")
                    if what in loads:
                        child = _child(loads[what])
                        assert child.stdout is not None
                        child.stdout.readline()
                    elif what == "xid":
                        phases[-1].update(provoke_xid())
                snap = {"schema": SAMPLES_SCHEMA, "host": "h200-check", "ts": time.time(), "seq": seq,
                        "gpus": sampler.read()}  # fmt: skip
                out.write(encode_snapshot(snap) + b"\n")
                seq += 1
                time.sleep(max(0.0, t0 + seq * interval_s - time.time()))
    finally:
        if child is not None:
            child.kill()
            child.wait()
        sampler.close()
    with open(f"{path}.phases.json", "wb") as fh:
        fh.write(orjson.dumps({"interval_s": interval_s, "snapshots": seq, "phases": phases},
                              option=orjson.OPT_INDENT_2))  # fmt: skip
    return {"snapshots": seq, "phases": phases}
