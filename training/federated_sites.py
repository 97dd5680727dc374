"""Three simulated sites for the federated experiment (docs/federated.md), and the time split of a recording.

Each site is one simulated fleet with its own hardware and fault mix, recorded for `DAYS` days. Its first
`TRAIN_FRACTION` of time is what the site trains on (imported into its own archive); the rest is the site's
held-out data, scored only. The split is by time, decided before any model was trained: a site's held-out data
is its future. The coordinator owns a fourth, separate fleet (`coordinator-val`) on which every model's
calibration map and operating points are chosen, local and federated alike.

`python -m gpuwatch.training.federated_sites OUT_DIR` writes OUT_DIR/NAME/{train,test,test-6h} for every site
(test-6h: the first 6 hours of test, what the figure scores) and OUT_DIR/coordinator-val.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import orjson

from gpuwatch.training.fleets import Fleet

DAYS = 1.5
TRAIN_FRACTION = 2 / 3
# The held-out data scored in the figure: the first 6 hours after the training period (test-6h/), to fit the machine.
SCORED_HELD_OUT_S = 6 * 3600.0
_FAILING = {"rate_scale": 3000.0, "repair_time_scale": 0.01}

SITES: dict[str, Fleet] = {
    "site-a": Fleet(
        24, 8, DAYS, 30.0, 611,
        {**_FAILING, "hardware": {"h100-fan": 1.0},
         "mode_mix": {"memory": 0.55, "thermal": 0.3, "power": 0.05, "interconnect": 0.05, "sudden": 0.05}},
        "legacy fan-cooled H100 boards; mostly memory and thermal failures; simulator-default look-alikes",
    ),
    "site-b": Fleet(
        24, 8, DAYS, 30.0, 622,
        {**_FAILING, "hardware": {"a100-sxm": 0.6, "v100-sxm2": 0.4},
         "mode_mix": {"memory": 0.1, "thermal": 0.05, "power": 0.45, "interconnect": 0.35, "sudden": 0.05},
         "power_brake_per_host_day": 0.6, "replay_trickle_frac": 0.04},
        "A100 and V100 boards; mostly power and interconnect failures; more brake blips and replay trickles",
    ),
    "site-c": Fleet(
        24, 8, DAYS, 30.0, 633,
        {**_FAILING, "hardware": {"h100-sxm": 0.5, "h200-sxm": 0.5},
         "mode_mix": {"memory": 0.15, "thermal": 0.4, "power": 0.15, "interconnect": 0.2, "sudden": 0.1},
         "hot_gpu_frac": 0.08, "sbe_trickle_frac": 0.05},
        "fanless H100 and H200 SXM boards; thermal-heavy mix; more hot boards and SBE trickles",
    ),
}  # fmt: skip

COORDINATOR_VAL = Fleet(
    16, 8, 0.5, 30.0, 644,
    {**_FAILING, "hardware": {"h100-fan": 0.25, "a100-sxm": 0.25, "v100-sxm2": 0.1, "h100-sxm": 0.2, "h200-sxm": 0.2}},
    "the coordinator's own validation fleet: every board of the three sites, simulator-default fault mix",
)  # fmt: skip


def split_by_time(src: Path, train_out: Path, test_out: Path, fraction: float = TRAIN_FRACTION) -> float:
    """Write the first `fraction` of `src`'s time span to `train_out` and the rest to `test_out` (samples.jsonl);
    both get every label and meta.json (failures on either side of the cut must be known to both: a GPU that failed
    just before the cut is down just after it). Returns the cut time."""
    meta = orjson.loads((src / "meta.json").read_bytes())
    cut = float(meta["start_ts"]) + fraction * (float(meta["end_ts"]) - float(meta["start_ts"]))
    for out in (train_out, test_out):
        out.mkdir(parents=True, exist_ok=True)
        for name in ("labels.jsonl", "meta.json"):
            shutil.copyfile(src / name, out / name)
    with open(src / "samples.jsonl", "rb") as fh, open(train_out / "samples.jsonl", "wb") as tr, \
            open(test_out / "samples.jsonl", "wb") as te:  # fmt: skip
        for line in fh:
            if line.strip():
                (tr if orjson.loads(line)["ts"] < cut else te).write(line)
    return cut


def main(argv: list[str] | None = None) -> int:
    from gpuwatch.simulator.fleet import simulate_to_dir

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m gpuwatch.training.federated_sites OUT_DIR", file=sys.stderr)
        return 2
    root = Path(args[0])
    for name, f in [*SITES.items(), ("coordinator-val", COORDINATOR_VAL)]:
        full = root / name / "full" if name in SITES else root / name
        stats = simulate_to_dir(f.hosts, f.gpus_per_host, f.days, full, seed=f.seed, interval_s=f.interval_s,
                                config_overrides=dict(f.overrides))  # fmt: skip
        print(f"{name}: {f.hosts * f.gpus_per_host} GPUs x {f.days} days at {f.interval_s:g} s, "
              f"{stats['gpu_samples']:,} GPU-samples, {stats['failures']} failures {stats['by_mode']}")  # fmt: skip
        if name in SITES:
            cut = split_by_time(full, root / name / "train", root / name / "test")
            scored = TRAIN_FRACTION + SCORED_HELD_OUT_S / (f.days * 86400.0)
            end = split_by_time(root / name / "test", root / name / "test-6h", root / name / "test-later", fraction=scored)
            shutil.rmtree(full)
            shutil.rmtree(root / name / "test-later")
            print(f"{name}: train before ts {cut:.0f}, held-out after (test-6h: up to ts {end:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
