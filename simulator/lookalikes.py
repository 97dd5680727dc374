"""Catalogue of the simulator's benign look-alikes: healthy patterns that resemble a failure precursor.

Each entry names the FleetConfig knobs that make a run rich in it (most GPUs or hosts show it), the knob
values at its stated real-world prevalence, and that prevalence in one unit with its reasoning. A false-action
estimate at real prevalence runs one look-alike-rich fleet per kind and scales its false actions per healthy
GPU-day by `weight` (prevalence / rich_prevalence): a look-alike's false actions scale with how often it occurs.
`realistic_overrides()` turns every look-alike on at its stated prevalence (FleetConfig.realistic() uses it).
Prevalences marked `assumption` are engineering judgement, not measurements; docs/simulator.md has the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpuwatch.simulator.hardware import PROFILES, REALISTIC_MIX

# Knobs that keep everything else quiet, so a rich run shows one look-alike only (legacy noise off).
QUIET: dict[str, float] = {
    "hot_gpu_frac": 0.0, "sbe_trickle_frac": 0.0, "replay_trickle_frac": 0.0, "narrow_link_frac": 0.0,
    "remap_pending_frac": 0.0, "power_brake_per_host_day": 0.0,
}  # fmt: skip


# Share of jobs at the power cap in the realistic mix: each profile's own share, weighted by its share of hosts.
MIX_CAP_JOB_SHARE = round(
    sum(w * (PROFILES[k].heavy_job_frac or 0.0) for k, w in REALISTIC_MIX.items())
    / sum(REALISTIC_MIX.values()),
    3,
)


@dataclass(frozen=True)
class Lookalike:
    """One benign pattern: how to make a run rich in it, and how common it really is."""

    name: str
    looks_like: str  # the precursor or failure it resembles
    unit: str  # unit of prevalence and rich_prevalence
    rich: dict  # FleetConfig overrides for a run rich in it (add QUIET to isolate it)
    rich_prevalence: float  # prevalence in that rich run, in `unit`
    real: dict  # FleetConfig overrides at the stated real prevalence (None: each profile's own value)
    prevalence: float  # stated real-world prevalence, in `unit`
    why: str  # one line: the source, or the reasoning behind the assumption
    assumption: bool = True  # True: the prevalence is judgement, not a measurement
    needs: dict = field(default_factory=dict)  # other overrides the rich run needs to show it at all

    @property
    def weight(self) -> float:
        """Factor from the rich run's rate of false actions to the rate at real prevalence. A look-alike that
        comes with failures (a share of repairs) needs a rich run that fails `needs["rate_scale"]` times too
        often; at the real rate it occurs that much less often per GPU-day, so its weight is that much lower."""
        return self.prevalence / self.rich_prevalence / float(self.needs.get("rate_scale", 1.0))


LOOKALIKES: dict[str, Lookalike] = {
    x.name: x
    for x in (
        Lookalike(
            "hot_gpu", "thermal precursor: high temperature per watt, SW_THERMAL throttling, fan at 100 %",
            "share of GPUs", {"hot_gpu_frac": 1.0}, 1.0, {"hot_gpu_frac": 0.05}, 0.05,
            "the simulator's default; boards in the hot positions of a chassis or with worse paste run hot for "
            "life; no published share",
        ),
        Lookalike(
            "sbe_trickle", "memory precursor: steady single-bit ECC errors, an occasional row remap (XID 63)",
            "share of GPUs", {"sbe_trickle_frac": 1.0}, 1.0, {"sbe_trickle_frac": 0.03}, 0.03,
            "SBEs concentrate on a few cards for life (Titan field study, Tiwari et al., HPCA 2015); the 3 % "
            "share is the simulator's default",
        ),
        Lookalike(
            "replay_trickle", "interconnect precursor: steady PCIe replays or NVLink CRC errors",
            "share of GPUs", {"replay_trickle_frac": 1.0}, 1.0, {"replay_trickle_frac": 0.02}, 0.02,
            "marginal risers and cables are common in the field and run fine for years; 2 % is the simulator's "
            "default",
        ),
        Lookalike(
            "narrow_link", "interconnect precursor: PCIe link at x8 of x16",
            "share of GPUs", {"narrow_link_frac": 1.0}, 1.0, {"narrow_link_frac": 0.003}, 0.003,
            "a link that trained narrow at boot and stays so; 0.3 % is the simulator's default (the StepFun trace "
            "has 25 'PCI link width low' faults in 1.1 M GPU-days, i.e. width changes are rarer still)",
        ),
        Lookalike(
            "remap_pending", "memory precursor: remap_pending set (retired_pages_pending on page-retiring boards)",
            "share of GPUs", {"remap_pending_frac": 1.0}, 1.0, {"remap_pending_frac": 0.01}, 0.01,
            "a harmless remap waits for the next reset; H100 memory errors are frequent (Delta: H100 per-GPU "
            "memory MTBE 3.2x below A100, Cui et al. 2025), 1 % is the simulator's default",
        ),
        Lookalike(
            "power_brake_blip", "power precursor: HW_POWER_BRAKE episodes",
            "events per host-day", {"power_brake_per_host_day": 24.0}, 24.0, {"power_brake_per_host_day": 0.3},
            0.3, "PSU or BMC capping blips for a few seconds, host-wide; 0.3 a host-day is the simulator's default",
        ),
        Lookalike(
            "power_cap_job", "power precursor: SW_POWER_CAP, power pinned at the limit, clocks down, violation "
            "time rising for a whole job", "share of jobs", {"power_cap_job_frac": 0.95}, 0.95,
            {"power_cap_job_frac": None}, MIX_CAP_JOB_SHARE,
            "the H200 recording: a dense bf16 job sits at its 700 W cap with SW_POWER_CAP for its whole length; "
            "the per-profile shares (half of the jobs on 700 W Hopper and H100 PCIe, 35 % on A100, 20 % on V100) "
            "are assumptions; the prevalence is their average over the realistic hardware mix",
        ),
        Lookalike(
            "app_xid", "a failure: XID 13/31/43/45 on one GPU or the whole host, the job gone at once",
            "events per host-day", {"app_xid_per_host_day": 24.0}, 24.0, {"app_xid_per_host_day": 0.5}, 0.5,
            "NVIDIA's XID catalogue lists 13, 31, 43, 45 as application-caused; ~30 % of jobs end unsuccessfully "
            "(Philly, Jeon et al., USENIX ATC 2019); one XID-carrying crash or kill per ~24 jobs (~12 jobs a "
            "host-day here) is an assumption",
        ),
        Lookalike(
            "reboot", "a failure or repair: the host silent for minutes, volatile counters reset, seq from 0",
            "events per host-day", {"reboot_per_host_day": 12.0}, 12.0, {"reboot_per_host_day": 0.03}, 0.03,
            "maintenance reboots and driver reloads (kernel, driver, firmware updates, health-check resets) about "
            "monthly per host; an assumption",
        ),
        Lookalike(
            "power_limit_change", "power precursor: power_limit_w lowered, SW_POWER_CAP, clocks and power down "
            "for hours", "events per host-day", {"power_limit_change_per_host_day": 6.0}, 6.0,
            {"power_limit_change_per_host_day": 0.005}, 0.005,
            "operators cap hosts for hours in power or cooling emergencies and efficiency trials, a couple of "
            "times a year per host; an assumption",
        ),
        Lookalike(
            "board_swap", "a repair: a new uuid on a host after a maintenance window, fresh counters",
            "events per host-day", {"board_swap_per_host_day": 4.0}, 4.0, {"board_swap_per_host_day": 0.001},
            0.001, "proactive RMA swaps of a board flagged by a vendor diagnostic, about once per 3 host-years; an "
            "assumption",
        ),
        Lookalike(
            "board_replace", "a repair: the repaired GPU comes back as a new board (new uuid, counters at 0)",
            "share of repairs", {"board_replace_frac": 1.0}, 1.0, {"board_replace_frac": 0.25}, 0.25,
            "memory and 'GPU lost' faults often end in an RMA, fans and PSUs do not (StepFun trace: repairs of "
            "days to weeks); a quarter is an assumption",
            needs={"rate_scale": 1000.0, "repair_time_scale": 0.01},
        ),
        Lookalike(
            "sbe_burst", "memory precursor onset: a burst of single-bit ECC errors, sometimes a row remap, "
            "that never recurs", "events per GPU-day", {"sbe_burst_per_gpu_day": 2.0}, 2.0,
            {"sbe_burst_per_gpu_day": 0.005}, 0.005,
            "a particle strike or a transient in HBM gives a one-off burst; one per GPU every ~200 days is an "
            "assumption",
        ),
        Lookalike(
            "ambient_excursion", "thermal precursor: temperature rising at the same power, SW_THERMAL throttling "
            "(on every GPU of the host)", "events per host-day", {"ambient_excursion_per_host_day": 4.0}, 4.0,
            {"ambient_excursion_per_host_day": 0.01}, 0.01,
            "a cooling unit cycling or in maintenance warms a rack's inlet by 4-12 °C for up to two hours, a few "
            "times a year per rack; an assumption",
        ),
    )
}  # fmt: skip


def realistic_overrides() -> dict:
    """FleetConfig overrides with every look-alike at its stated prevalence and the realistic hardware mix."""
    out: dict = {"hardware": dict(REALISTIC_MIX)}
    for x in LOOKALIKES.values():
        out.update(x.real)
    return out


def rich_overrides(name: str, quiet: bool = True) -> dict:
    """FleetConfig overrides for a run rich in look-alike `name` (with the other legacy noise off if `quiet`)."""
    if name not in LOOKALIKES:
        raise ValueError(f"unknown look-alike {name!r}; known: {', '.join(LOOKALIKES)}")
    x = LOOKALIKES[name]
    return {**(QUIET if quiet else {}), **x.needs, **x.rich}
