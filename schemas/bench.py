"""Example `gpuwatch.samples/1` snapshots and micro-benchmarks of the codecs' hot paths.

`bench_decode`: `decode_snapshot` on 8-GPU messages. `bench_codecs` (`gpuwatch bench codecs`): in one run, the
samples decode per GPU-sample (the usual message, and one the typed fast path refuses) and the risk record's
encode per record as the stream worker writes it, next to the path it replaced (a dict literal + orjson).
Run ``python -m gpuwatch.schemas.bench [n_snapshots]`` to print the decode throughput on this machine.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable

import orjson

from .codecs import decode_risk, decode_snapshot, encode_risk
from .fields import FAILURE_MODES, RISK_SCHEMA, SAMPLES_SCHEMA
from .records import Risk


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


def _per_item_us(run: Callable[[], object], items: int, repeat: int) -> float:
    """Best of `repeat` timings of `run()` (which handles `items` items), in µs per item."""
    run()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best / items * 1e6


def _risk_columns(n: int, seed: int = 0) -> list[tuple]:
    """What the stream worker's `emit` has per record after its `.tolist()` calls: plain Python values."""
    rnd = random.Random(seed)
    return [(f"node-{i // 8:04d}", i % 8, f"GPU-{rnd.getrandbits(128):032x}", 1_700_000_000.0 + i,
             rnd.random() * 1e-3, rnd.random(), FAILURE_MODES[i % len(FAILURE_MODES)], rnd.random() < 0.1,
             rnd.random() < 0.02, 3600.0 + i) for i in range(n)]  # fmt: skip


def bench_codecs(records: int = 20000, snapshots: int = 2500, repeat: int = 5) -> dict:
    """The codecs' hot paths, measured in one run on one core (best of `repeat`, µs per item):

    - samples decode per GPU-sample: `decode_snapshot` on the usual 8-GPU message (typed fast path), and on one
      carrying a field this version does not know (the fast path refuses it: orjson + the checks derived from
      the struct);
    - risk encode per record: a `Risk` struct built and encoded as the stream worker does (`validate=False`),
      the same with the encoder's contract check, and the path the worker used before typed records (a dict
      literal + `orjson.dumps`), on the same values;
    - risk decode per record (`decode_risk`, the sinks' path).
    """
    messages = [orjson.dumps(example_snapshot(8, seed, seq=seed)) for seed in range(256)]
    unusual = [orjson.dumps({**orjson.loads(m), "agent_version": "9.9"}) for m in messages]
    batch = [messages[i & 255] for i in range(snapshots)]
    batch_unusual = [unusual[i & 255] for i in range(snapshots)]
    columns = _risk_columns(records)
    horizon, model, scored_at, op = 3600.0, "lstm-bench", 1_700_000_000.5, "model:0.658x2"

    def typed(validate: bool) -> Callable[[], list[bytes]]:
        def run() -> list[bytes]:
            return [encode_risk(Risk(host=h, gpu_index=g, uuid=u, ts=ts, risk=r, horizon_s=horizon, mode=m,
                                     model=model, scored_at=scored_at, op=op, score=sc, alarm=a, drain=d,
                                     history_s=hs), validate=validate)
                    for h, g, u, ts, r, sc, m, a, d, hs in columns]  # fmt: skip
        return run

    def dict_literal() -> list[bytes]:  # streams/processor.py's emit before this version, line for line
        return [orjson.dumps({"schema": RISK_SCHEMA, "host": h, "gpu_index": g, "uuid": u, "ts": ts, "risk": r,
                              "horizon_s": horizon, "mode": m, "model": model, "scored_at": scored_at, "op": op,
                              "score": sc, "alarm": a, "drain": d, "failed": False, "history_s": hs})
                for h, g, u, ts, r, sc, m, a, d, hs in columns]  # fmt: skip

    encoded = typed(False)()
    assert [decode_risk(raw) for raw in encoded[:100]] and encoded[0] == typed(True)()[0]
    return {
        "samples_decode_us_per_gpu_sample": round(_per_item_us(lambda: [decode_snapshot(m) for m in batch],
                                                               snapshots * 8, repeat), 3),
        "samples_decode_unknown_field_us_per_gpu_sample": round(_per_item_us(
            lambda: [decode_snapshot(m) for m in batch_unusual], snapshots * 8, repeat), 3),
        "risk_encode_us_per_record": round(_per_item_us(typed(False), records, repeat), 3),
        "risk_encode_validated_us_per_record": round(_per_item_us(typed(True), records, repeat), 3),
        "risk_encode_dict_orjson_us_per_record": round(_per_item_us(dict_literal, records, repeat), 3),
        "risk_decode_us_per_record": round(_per_item_us(lambda: [decode_risk(raw) for raw in encoded], records,
                                                        repeat), 3),
        "risk_bytes_per_record": sum(map(len, encoded)) // len(encoded),
        "records": records, "snapshots": snapshots, "gpus_per_snapshot": 8, "repeat": repeat,
    }


if __name__ == "__main__":
    print(orjson.dumps(bench_decode(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)).decode())
