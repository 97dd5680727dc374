"""`gpuwatch bench agent`: CPU and memory of the real node agent at 1 Hz with 8 stand-in NVML GPUs.

The agent runs as its own process (`gpuwatch agent --fake-nvml 8`, or with `--real-nvml` plain
`gpuwatch agent` on this machine's GPUs through the driver), exactly as an operator runs it,
publishing to an embedded Tansu broker; its CPU time and resident memory are read from /proc (Linux).
After a warm-up, CPU is measured over `seconds` of steady state as a percentage of one core. Then it
gets SIGTERM, and every published snapshot is read back and decoded to show the run was real.
The stand-in NVML answers from memory, so a real driver's call latency is not included; `gpuwatch bench gpu`
runs this with the real driver on a GPU machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gpuwatch.apps.bench.table import emit
from gpuwatch.config import Settings
from gpuwatch.embedded import free_port, start_kafka
from gpuwatch.kafka import ensure_topics, partition_count, read_partitions_to_end
from gpuwatch.schemas.codecs import DecodeError, decode_snapshot

CPU_BUDGET_PCT = 1.0
RSS_BUDGET_MB = 80.0
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14 and 15 of the full line)


def _status_mib(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0  # kB -> MiB
    raise RuntimeError(f"/proc/{pid}/status has no {key}")


def _snapshots(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return int(json.loads(resp.read())["snapshots"])
    except (OSError, ValueError, KeyError):
        return 0


def run_agent_bench(
    json_path: str | None,
    *,
    seconds: float = 60.0,
    gpus: int = 8,
    warmup_s: float = 5.0,
    real_nvml: bool = False,
    during: Callable[[], None] | None = None,
    keep_snapshots: bool = False,
) -> dict:
    """Runs the benchmark, prints a table, writes the figures to `json_path` (if given) and returns them.

    `real_nvml` samples this machine's GPUs through the driver (`gpus` is then what NVML reports);
    `during` runs after the measurement, while the agent still publishes; `keep_snapshots` returns the
    published snapshots (bytes) under "snapshots".
    """
    broker = start_kafka()
    work = Path(tempfile.mkdtemp(prefix="gpuwatch-bench-agent-"))
    settings = Settings(kafka_bootstrap=broker.url, topic_samples="gpuwatch.samples.bench", partitions=1)
    proc: subprocess.Popen[bytes] | None = None
    try:
        ensure_topics(settings, [settings.topic_samples])
        port = free_port()
        env = {**os.environ, "GPUWATCH_KAFKA_BOOTSTRAP": broker.url, "GPUWATCH_TOPIC_SAMPLES": settings.topic_samples,
               "GPUWATCH_AGENT_HOST": "bench-node"}  # fmt: skip
        argv = [sys.executable, "-P", "-c", "import sys; from gpuwatch.apps.cli import main; sys.exit(main())", "agent",
                "--interval", "1", "--spool-dir", str(work / "spool"), "--metrics-port", str(port)]  # fmt: skip
        if not real_nvml:
            argv += ["--fake-nvml", str(gpus)]
        with open(work / "agent.log", "wb") as log:
            proc = subprocess.Popen(argv, env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while _snapshots(port) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the agent did not start; its log:\n{(work / 'agent.log').read_text()[-3000:]}"
                )
            time.sleep(0.2)
        time.sleep(warmup_s)

        t0, cpu0 = time.monotonic(), _cpu_seconds(proc.pid)
        rss_max = 0.0
        while (elapsed := time.monotonic() - t0) < seconds:
            rss_max = max(rss_max, _status_mib(proc.pid, "VmRSS"))
            time.sleep(min(1.0, seconds - elapsed))
        cpu1, t1 = _cpu_seconds(proc.pid), time.monotonic()
        rss_max = max(rss_max, _status_mib(proc.pid, "VmRSS"))
        rss_peak = _status_mib(proc.pid, "VmHWM")
        if during is not None:
            during()

        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
        n = partition_count(settings, settings.topic_samples)
        records = read_partitions_to_end(settings, settings.topic_samples, list(range(n)), timeout=60)
        seqs, invalid, xids = [], 0, []
        for _, value in records:
            try:
                seqs.append(decode_snapshot(value).seq)
            except DecodeError:
                invalid += 1
                continue
            gpu_list = orjson.loads(value)["gpus"]
            gpus = len(gpu_list)
            xids += [x for g in gpu_list for x in g.get("xid") or ()]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        broker.stop()

    cpu_pct = 100.0 * (cpu1 - cpu0) / (t1 - t0)
    figures: dict[str, Any] = {
        "cpu_pct_one_core": round(cpu_pct, 3),
        "rss_mb": round(rss_max, 1),
        "rss_peak_mb": round(rss_peak, 1),
        "measured_s": round(t1 - t0, 1),
        "gpus": gpus,
        "interval_s": 1.0,
        "snapshots_published": len(records),
        "snapshots_invalid": invalid,
        "seq_contiguous": seqs == list(range(len(seqs))),
        "exit_code": exit_code,
        "cpu_budget_pct": CPU_BUDGET_PCT,
        "rss_budget_mb": RSS_BUDGET_MB,
        "within_budget": cpu_pct <= CPU_BUDGET_PCT and rss_max <= RSS_BUDGET_MB,
        "xids_published": xids,
        "nvml": "real driver" if real_nvml else "stand-in (simulator/fake_nvml.py): real driver call latency not included",
    }
    rows = [
        (
            "cpu_pct_one_core",
            figures["cpu_pct_one_core"],
            f"% of one core over {figures['measured_s']} s (budget 1 %)",
        ),
        ("rss_mb", figures["rss_mb"], "MiB resident, largest seen while measuring (budget 80)"),
        ("rss_peak_mb", figures["rss_peak_mb"], "MiB, VmHWM over the whole run, start-up included"),
        (
            "snapshots_published",
            figures["snapshots_published"],
            f"{gpus} GPUs each, read back from the broker",
        ),
        ("snapshots_invalid", invalid, "rejected by decode_snapshot"),
        ("seq_contiguous", figures["seq_contiguous"], "0..n-1, nothing missing"),
        ("exit_code", exit_code, "after SIGTERM (0: flushed and stopped)"),
        ("within_budget", figures["within_budget"], ""),
    ]
    kind = "real" if real_nvml else "stand-in"
    emit(f"gpuwatch bench agent ({gpus} {kind} GPUs at 1 Hz, one agent process)", rows, figures, json_path)
    if keep_snapshots:
        figures["snapshots"] = [value for _, value in records]
    return figures
