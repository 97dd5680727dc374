"""Named simulated fleets for training, validation and held-out evaluation of the default model.

`python -m gpuwatch.training.fleets NAME OUT_DIR` writes OUT_DIR/samples.jsonl, labels.jsonl and meta.json.
Held-out fleets use other seeds AND other fleet parameters than training: precursors stretched past
the training range of lengths and scaled past its range of strengths, another mode mix, more hot GPUs
and more benign error trickles (more chances for false alarms), another failure rate.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from gpuwatch.simulator.fleet import simulate_to_dir
from gpuwatch.simulator.lookalikes import realistic_overrides


@dataclass(frozen=True)
class Fleet:
    hosts: int
    gpus_per_host: int
    days: float
    interval_s: float
    seed: int
    overrides: dict = field(default_factory=dict)
    about: str = ""


# Training fleets: many failures (x5000, spread evenly over hosts, quick repairs) so the model sees
# hundreds of precursors; two sampling intervals so features do not overfit one cadence.
_TRAIN = {"rate_scale": 5000.0, "repair_time_scale": 0.005, "host_frailty": False}
# Validation fleets (operating points, model choice): simulator defaults, failures x3000, other seeds.
_VAL = {"rate_scale": 3000.0, "repair_time_scale": 0.01}
# Hardware the model trains and is validated on: the legacy fan board and three fanless Hopper boards. A100 and
# V100 boards are left out on purpose: heldout-hw holds them out, to see what other hardware does to the model.
TRAIN_HARDWARE = {"h100-fan": 0.25, "h100-sxm": 0.3, "h200-sxm": 0.3, "h100-pcie": 0.15}
# Every benign look-alike at its stated real prevalence (simulator/lookalikes.py), on the training hardware.
_REAL_LOOKALIKES = {**realistic_overrides(), "hardware": dict(TRAIN_HARDWARE)}
# ... and several times as common, so that training sees enough of each to learn it is benign.
_MANY_LOOKALIKES = {
    **_REAL_LOOKALIKES, "app_xid_per_host_day": 3.0, "reboot_per_host_day": 0.5, "power_limit_change_per_host_day": 0.3,
    "board_swap_per_host_day": 0.05, "sbe_burst_per_gpu_day": 0.1, "ambient_excursion_per_host_day": 0.3,
    "hot_gpu_frac": 0.08, "sbe_trickle_frac": 0.05, "replay_trickle_frac": 0.04, "power_brake_per_host_day": 0.6,
}  # fmt: skip

FLEETS: dict[str, Fleet] = {
    "train-a": Fleet(
        32, 8, 2.0, 10.0, 101, dict(_TRAIN), "training fleet at 10 s: simulator defaults, failures x5000"
    ),
    "train-b": Fleet(
        16, 8, 1.0, 5.0, 102, {**_TRAIN, **_MANY_LOOKALIKES},
        "training fleet at 5 s on the training hardware mix, with every look-alike several times its real rate",
    ),
    "train-c": Fleet(
        16,
        8,
        1.0,
        5.0,
        103,
        {
            **_TRAIN,
            "hot_gpu_frac": 0.10,
            "sbe_trickle_frac": 0.06,
            "replay_trickle_frac": 0.05,
            "narrow_link_frac": 0.01,
            "remap_pending_frac": 0.02,
            "power_brake_per_host_day": 1.0,
            "hardware": dict(TRAIN_HARDWARE),
        },
        "training fleet at 5 s with twice the benign look-alikes (hot boards, error trickles, brake blips)",
    ),  # fmt: skip
    "train-d": Fleet(
        32, 8, 2.0, 30.0, 105, {**_TRAIN, **_MANY_LOOKALIKES},
        "training fleet at 30 s (an agent set to a slow interval) on the training hardware, many look-alikes",
    ),
    "train-e": Fleet(
        8, 8, 0.25, 1.0, 106, {**_TRAIN, **_MANY_LOOKALIKES},
        "training fleet at 1 s (the agent's default) on the training hardware, many look-alikes",
    ),
    # Slow agents (2026-12-07): a model trained at 1 to 30 s alone made about 10 times the false alarms at 120 s
    # sampling that it made at 10 s (docs/model.md, "Sampling intervals"), mostly thermal: its smoothed signals
    # rest on far fewer samples there, so they are noisier than anything it had seen. Training with these two as
    # well was tried and not shipped (docs/model.md, "What was tried", step 15): scripts/train-default-model.sh
    # leaves them out.
    "train-f": Fleet(
        64, 8, 4.0, 60.0, 107, {**_TRAIN, **_MANY_LOOKALIKES},
        "training fleet at 60 s (a slow agent or a DCGM scrape) on the training hardware, many look-alikes",
    ),
    "train-g": Fleet(
        64, 8, 8.0, 120.0, 108, {**_TRAIN, **_MANY_LOOKALIKES},
        "training fleet at 120 s on the training hardware, many look-alikes",
    ),
    "val": Fleet(
        16,
        8,
        1.0,
        5.0,
        202,
        dict(_VAL),
        "validation fleet (operating thresholds): simulator defaults, failures x3000, another seed",
    ),
    "val-b": Fleet(
        32,
        8,
        1.0,
        5.0,
        212,
        {**_VAL, **_REAL_LOOKALIKES},
        "second validation fleet, twice val's size, on the training hardware with every look-alike at its real "
        "rate; pooled with val",
    ),
    "val-c": Fleet(
        16, 8, 1.0, 30.0, 222, {**_VAL, **_REAL_LOOKALIKES},
        "third validation fleet, at 30 s, training hardware, look-alikes at their real rates",
    ),
    "val-healthy": Fleet(
        64, 8, 5.0, 60.0, 232, {**_REAL_LOOKALIKES, "rate_scale": 1.0},
        "validation fleet at the real failure rate: 2,560 GPU-days of mostly healthy GPUs with every look-alike "
        "at its real rate, so the operating points see what a false action costs where it matters",
    ),
    "val-healthy-b": Fleet(
        96, 8, 10.0, 30.0, 242, {**_REAL_LOOKALIKES, "rate_scale": 1.0},
        "second validation fleet at the real failure rate, at 30 s: 7,680 GPU-days, so that the alarm's false "
        "checkpoints per 1,000 healthy GPU-days are placed on more than a handful of look-alike episodes",
    ),
    "heldout": Fleet(
        40,
        8,
        0.75,
        5.0,
        303,
        {
            "rate_scale": 2500.0,
            "repair_time_scale": 0.02,
            # Stretched: every mode 5 min to 2.5 h (training: power <= 30 min, thermal <= 1 h, others <= 2 h).
            "precursor_range_s": (300.0, 9000.0),
            # Scaled: strengths U(0.25, 1) x 1.3, i.e. up to 1.3, past the training maximum of 1.0.
            "precursor_strength": 1.3,
            "mode_mix": {"memory": 0.2, "thermal": 0.2, "power": 0.2, "interconnect": 0.2, "sudden": 0.2},
            "hot_gpu_frac": 0.10,
            "sbe_trickle_frac": 0.05,
            "replay_trickle_frac": 0.04,
            "power_brake_per_host_day": 0.6,
        },
        "held-out fleet: other seed, stretched and stronger precursors, even mode mix, noisier fleet",
    ),  # fmt: skip
    "heldout-faint": Fleet(
        40,
        8,
        0.5,
        5.0,
        404,
        {
            "rate_scale": 2500.0,
            "repair_time_scale": 0.02,
            # Scaled down: strengths U(0.25, 1) x 0.6, so the faintest are 0.15, below the training minimum 0.25.
            "precursor_strength": 0.6,
            "precursor_range_s": (120.0, 5400.0),
            "hot_gpu_frac": 0.08,
            "sbe_trickle_frac": 0.05,
            "replay_trickle_frac": 0.04,
        },
        "held-out fleet: other seed, fainter precursors (down to 0.15 strength), 2 min to 1.5 h",
    ),  # fmt: skip
    "heldout-hw": Fleet(
        40, 8, 1.0, 30.0, 505,
        {**realistic_overrides(), "hardware": {"a100-sxm": 0.6, "v100-sxm2": 0.4}, "rate_scale": 2500.0,
         "repair_time_scale": 0.02},
        "held-out fleet on hardware the model never trained on (A100 and V100 boards: other power limits, "
        "clocks, memory, page retirement), sampled at 30 s, every look-alike at its real rate",
    ),  # fmt: skip
    "heldout-slow": Fleet(
        40, 8, 3.0, 180.0, 606,
        {**realistic_overrides(), "hardware": {"h100-sxm": 0.5, "a100-sxm": 0.5}, "rate_scale": 2500.0,
         "repair_time_scale": 0.02, "hot_gpu_frac": 0.08, "sbe_trickle_frac": 0.05, "replay_trickle_frac": 0.04},
        "held-out fleet sampled every 3 min, slower than any training fleet, half on hardware not trained on, "
        "with more hot boards and error trickles than real",
    ),  # fmt: skip
}


def simulate_fleet(name: str, out: Path) -> dict:
    """Simulate the named fleet into `out`; returns the simulator's stats."""
    if name not in FLEETS:
        raise SystemExit(f"unknown fleet {name!r}; choose one of {', '.join(FLEETS)}")
    f = FLEETS[name]

    def progress(frac: float) -> None:
        sys.stderr.write(f"\rsimulating fleet {name}: {frac:6.1%}")
        sys.stderr.flush()

    stats = simulate_to_dir(f.hosts, f.gpus_per_host, f.days, out, seed=f.seed, interval_s=f.interval_s,
                            config_overrides=dict(f.overrides), progress=progress)  # fmt: skip
    sys.stderr.write("\n")
    return stats


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(f"usage: python -m gpuwatch.training.fleets {{{','.join(FLEETS)}}} OUT_DIR", file=sys.stderr)
        return 2
    stats = simulate_fleet(args[0], Path(args[1]))
    print(f"fleet {args[0]}: {stats['gpu_samples']:,} GPU-samples, {stats['failures']} failures "
          f"{stats['by_mode']} in {stats['seconds']:.0f} s -> {args[1]}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
