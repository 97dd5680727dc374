"""Where a plain healthy fleet's high scores and false alarms come from (issue 14 diagnostic).

    python scripts/plain-alarms.py SEED DAYS OUT.jsonl [--occlude]

Simulates `gpuwatch realrate`'s plain fleet (128 hosts x 8 GPUs, the realistic hardware mix, every look-alike
off, the real failure rate, a snapshot every 30 s) for DAYS days with SEED, scores it with the shipped model
through the stream's `RiskProcessor`, and writes one JSON line per scoring at or above 0.9: host, GPU, sample ts,
calibrated score, whether the GPU was in alarm (the shipped operating point), whether that was an alarm onset,
the host's board and the explainer's reasons. The first line holds the run's size and the simulator's failures.
Use a seed no fleet was chosen on (realrate uses 9100 and up to 9213).

`--occlude` also says which inputs drive those scorings: each feature in turn is set, over the whole window, to
the median of its board's GPUs (a random 0.2 % of every batch's scorings), and the drop of the risk logit is
averaged over the high scorings; the first line then holds `occlusion`, the ten largest drops and how often each
feature is the largest.
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
from gpuwatch.streams.window import FEATURE_NAMES, N_FEATURES
from gpuwatch.training.score import replay_messages

HIGH = 0.9  # scorings at or above this calibrated score are written
SAMPLE = 0.002  # share of every batch's scorings kept as the boards' normal (--occlude)
INTERVAL_S, HOSTS, GPUS = 30.0, 128, 8


def main(seed: int, days: float, out: str, occlude: bool = False) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    found: list[dict] = []
    windows: dict[str, list] = {"high": [], "high_board": [], "normal": [], "normal_board": []}
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
            if occlude:
                normal = np.flatnonzero(rng.random(len(live)) < SAMPLE)
                for name, rows in (("high", high), ("normal", normal)):
                    if len(rows):
                        windows[name].append(store.sequences(live[rows]))
                        windows[f"{name}_board"] += [board[store.hosts[int(slot)]] for slot in live[rows]]

    scorer = Scorer(load_artifact(None), "cpu")
    processor = Recorder(scorer, rescore_interval_s=5.0, stage="plain-alarms")

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
    if occlude and windows["high"]:
        head["occlusion"] = occlusion(scorer, windows)
    with open(out, "wb") as fh:
        fh.write(b"".join(orjson.dumps(x) + b"\n" for x in [head, *found]))
    print(f"{samples:,} GPU-samples, {len(found)} scorings >= {HIGH}, "
          f"{sum(x['onset'] for x in found)} alarm onsets -> {out}")  # fmt: skip


def occlusion(scorer: Scorer, windows: dict[str, list]) -> list[dict]:
    """Per feature: the mean drop of the high scorings' risk logit when it is set to its board's median."""
    high, normal = np.concatenate(windows["high"]), np.concatenate(windows["normal"])
    high_board, normal_board = np.array(windows["high_board"]), np.array(windows["normal_board"])
    base = scorer.logits(high)[0]
    drops = np.zeros((len(high), N_FEATURES))
    for f in range(N_FEATURES):
        x = high.copy()
        for b in np.unique(high_board):
            x[high_board == b, :, f] = np.median(normal[normal_board == b, -1, f])
        drops[:, f] = base - scorer.logits(x)[0]
    first = np.bincount(drops.argmax(axis=1), minlength=N_FEATURES)
    return [{"feature": FEATURE_NAMES[f], "mean_logit_drop": round(float(drops[:, f].mean()), 3),
             "largest_for": int(first[f])} for f in np.argsort(-drops.mean(axis=0))[:10]]  # fmt: skip


if __name__ == "__main__":
    usage = "usage: python scripts/plain-alarms.py SEED DAYS OUT.jsonl [--occlude] (e.g. 9500 3 plain.jsonl)"
    args = [a for a in sys.argv[1:] if a != "--occlude"]
    if len(args) != 3:
        sys.exit(usage)
    try:
        seed, days = int(args[0]), float(args[1])
    except ValueError:
        sys.exit(f"plain-alarms: SEED must be an integer and DAYS a number, got {args[0]!r} {args[1]!r}; {usage}")
    if not days > 0:
        sys.exit(f"plain-alarms: DAYS must be above 0, got {args[1]}; {usage}")
    try:
        open(args[2], "ab").close()  # now, not after the run: a folder that is not there fails here
    except OSError as exc:
        sys.exit(f"plain-alarms: cannot write {args[2]} ({exc.strerror}); give a path in a folder that exists")
    main(seed, days, args[2], occlude="--occlude" in sys.argv[1:])
