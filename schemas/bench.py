"""Example `gpuwatch.samples/1` snapshots and a micro-benchmark of `decode_snapshot`.

Run ``python -m gpuwatch.schemas.bench [n_snapshots]`` to print the decode throughput on this machine.
"""

from __future__ import annotations

import random
import sys
import time

import orjson

from .codecs import decode_snapshot
from .fields import SAMPLES_SCHEMA


def example_snapshot(n_gpus: int = 8, seed: int = 0, *, host: str = "node-0001", ts: float = 1_700_000_000.0,
                     seq: int = 0, optional: bool = True) -> dict:
    """A valid, realistic snapshot of an H100 node (NVML-like values); `optional` adds the OPTIONAL_* extras."""
    rnd = random.Random(seed)
    gpus = []
    for i in range(n_gpus):
        sample = {
            "gpu_index": i, "uuid": f"GPU-{rnd.getrandbits(128):032x}",
            "temp_c": rnd.randint(35, 80), "power_w": round(rnd.uniform(80, 700), 1), "power_limit_w": 700.0,
            "mem_used_mib": rnd.randint(0, 81559), "mem_total_mib": 81559, "util_gpu_pct": rnd.randint(0, 100),
            "sm_clock_mhz": rnd.choice((1410, 1755, 1980)), "fan_pct": None,
            "ecc_sbe_volatile": rnd.randint(0, 3), "ecc_dbe_volatile": 0, "ecc_sbe_aggregate": rnd.randint(0, 40),
            "ecc_dbe_aggregate": 0, "retired_pages": 0, "remapped_rows_correctable": rnd.randint(0, 2),
            "remapped_rows_uncorrectable": 0, "pcie_replay": rnd.randint(0, 5), "nvlink_crc_errors": 0,
            "remap_pending": False, "remap_failure": False, "lost": False,
            "throttle_reasons": rnd.choice((0, 0x1, 0x4)), "xid": [] if rnd.random() < 0.95 else [31],
        }
        if optional:
            sample.update({
                "mem_clock_mhz": 2619, "util_mem_pct": rnd.randint(0, 100), "pcie_link_width": 16,
                "pcie_link_width_max": 16, "pcie_link_gen": 5, "pcie_link_gen_max": 5,
                "nvlink_replay_errors": 0, "nvlink_recovery_errors": 0,
                "power_violation_us": rnd.randint(0, 10**9), "thermal_violation_us": 0, "retired_pages_pending": False,
            })
        gpus.append(sample)
    return {"schema": SAMPLES_SCHEMA, "host": host, "ts": ts, "seq": seq, "gpus": gpus}


def bench_decode(n_snapshots: int = 20000, n_gpus: int = 8) -> dict:
    """Decodes `n_snapshots` distinct-looking 8-GPU messages on one core; returns the throughput figures."""
    messages = [orjson.dumps(example_snapshot(n_gpus, seed, seq=seed)) for seed in range(256)]
    decode_snapshot(messages[0])  # warm-up
    start = time.perf_counter()
    for i in range(n_snapshots):
        decode_snapshot(messages[i & 255])
    seconds = time.perf_counter() - start
    samples = n_snapshots * n_gpus
    return {"snapshots": n_snapshots, "gpus_per_snapshot": n_gpus, "seconds": round(seconds, 4),
            "bytes_per_snapshot": sum(map(len, messages)) // len(messages),
            "gpu_samples_per_s": round(samples / seconds), "us_per_gpu_sample": round(seconds / samples * 1e6, 3)}


if __name__ == "__main__":
    print(orjson.dumps(bench_decode(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)).decode())
