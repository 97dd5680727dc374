"""Where a plain healthy fleet's high scores and false alarms come from (issue 14 diagnostic).

    python scripts/plain-alarms.py SEED DAYS OUT.jsonl

Simulates `gpuwatch realrate`'s plain fleet (128 hosts x 8 GPUs, the realistic hardware mix, every look-alike
off, the real failure rate, a snapshot every 30 s) for DAYS days with SEED, scores it with the shipped model
through the stream's `RiskProcessor`, and writes one JSON line per scoring at or above 0.9: host, GPU, sample ts,
calibrated score, whether the GPU was in alarm (the shipped operating point), whether that was an alarm onset,
the host's board and the explainer's reasons. The first line holds the run's size and the simulator's failures.
Use a seed no fleet was chosen on (realrate uses 9100 and up to 9213).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import orjson
import torch

from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.simulator.hardware import REALISTIC_MIX
from gpuwatch.simulator.lookalikes import QUIET
from gpuwatch.streams.explain import explain
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import RiskProcessor
from gpuwatch.training.score import replay_messages

HIGH = 0.9  # scorings at or above this calibrated score are written
INTERVAL_S, HOSTS, GPUS = 30.0, 128, 8


def main(seed: int, days: float, out: str) -> None:
    torch.set_num_threads(1)
    found: list[dict] = []
    in_alarm: dict[tuple[str, int], bool] = {}
    sim = FleetSimulator(FleetConfig(hosts=HOSTS, gpus_per_host=GPUS, seed=seed, interval_s=INTERVAL_S,
                                     start_ts=1_700_000_000.0, hardware=dict(REALISTIC_MIX), rate_scale=1.0,
                                     **QUIET))  # fmt: skip
    board = dict(zip(sim.hosts, sim.host_hardware, strict=True))

    class Recorder(RiskProcessor):
        def emit(self, scored, scored_at, result):  # noqa: ANN001, ANN202 - RiskProcessor's hook
            store, live = self.store, scored.slots[~scored.failed]
            high = np.flatnonzero(scored.score >= HIGH)
            for j, why in zip(high.tolist(), explain(store, live[high]) if len(high) else [], strict=True):
                slot = int(live[j])
                key = (store.hosts[slot], int(store.gpu_index[slot]))
                alarm = bool(scored.alarm[j])
                found.append({"host": key[0], "gpu": key[1], "ts": float(store.last_ts[slot]),
                              "score": float(scored.score[j]), "alarm": alarm,
                              "onset": alarm and not in_alarm.get(key, False), "board": board[key[0]],
                              "why": [r.text for r in why]})  # fmt: skip
                in_alarm[key] = alarm

    processor = Recorder(Scorer(load_artifact(None), "cpu"), rescore_interval_s=5.0, stage="plain-alarms")

    def messages():  # noqa: ANN202
        offset = 0
        for _ in range(int(round(days * 86400.0 / INTERVAL_S))):
            for _, raw in sim.step_json():
                yield offset, raw
                offset += 1

    t0, samples = time.time(), 0
    for result in replay_messages(messages(), "plain-alarms", processor):
        samples += result.samples
    head = {"seed": seed, "gpu_days": HOSTS * GPUS * days, "gpu_samples": samples,
            "seconds": round(time.time() - t0, 1), "failures": sim.drain_labels()}  # fmt: skip
    with open(out, "wb") as fh:
        fh.write(b"".join(orjson.dumps(x) + b"\n" for x in [head, *found]))
    print(f"{samples:,} GPU-samples, {len(found)} scorings >= {HIGH}, "
          f"{sum(x['onset'] for x in found)} alarm onsets -> {out}")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python scripts/plain-alarms.py SEED DAYS OUT.jsonl (e.g. 9500 3 plain.jsonl)")
    main(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3])
