"""GPU hardware profiles of the fleet simulator: board limits, which NVML fields are null, power and heat.

A profile is what the simulator needs to draw one GPU model: its power limit, memory, clocks, which
counters the driver leaves null on it (no fan, no NVLink, row remapping vs page retirement), how its power
splits between idle and load, how often its jobs sit at the power cap, and how its temperature follows power.
Hosts are homogeneous; `FleetConfig.hardware` picks one profile or a mix drawn per host.

Numbers come from NVIDIA spec sheets where they exist and from the H200 recording in
tests/data/h200-healthy (docs/gpu-check.md); the rest are stated assumptions (docs/simulator.md).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU model as the simulator draws it. Ranges are (low, high) of a uniform draw per GPU or per job."""

    name: str
    about: str  # the board, and where its numbers come from
    power_limit_w: float  # default (maximum) power limit
    mem_total_mib: int  # as NVML reports it
    max_clock_mhz: int  # SM boost clock
    idle_clock_mhz: int
    mem_clock_mhz: int
    pcie_gen_max: int
    pcie_gen_idle: int  # link generation at idle: below pcie_gen_max where the link power-saves
    fan: bool  # reports fan_pct (actively cooled board); passive boards report null
    nvlink: bool  # nvlink_* counters present; null on boards without NVLink
    row_remap: bool  # remapped_rows_*, remap_pending, remap_failure present (Ampere and later)
    retired_pages: bool  # retired_pages, retired_pages_pending present (page retirement, Volta and earlier)
    containment: bool  # uncorrectable ECC errors come as contained/uncontained (XID 94/95, Ampere and later)
    idle_w: tuple[float, float]  # idle power per GPU
    dyn_w: tuple[float, float]  # extra power per GPU at 100 % utilisation, job intensity 1 and full clock
    intensity: tuple[float, float]  # job intensity of ordinary jobs
    heavy_intensity: tuple[float, float]  # job intensity of heavy jobs: their demand exceeds the power limit
    heavy_job_frac: float | None  # share of jobs that are heavy; None: one draw over `intensity` (legacy)
    cap_margin_w: float  # capped power sits this far under the limit, plus noise
    p_noise_w: tuple[float, float]  # power noise (1 sigma): idle, and extra at 100 % utilisation
    idle_mem_mib: int
    r_th: tuple[float, float]  # heat-sink resistance, K/W: mean and standard deviation across boards
    temp_offset_c: float  # rise over inlet air at zero power (server fans run slow at low load)
    tau_s: tuple[float, float]  # time constant of the slow (heat-sink) part of the temperature
    fast_frac: float  # share of a temperature step that follows the die within about a second
    temp_int: bool  # NVML reports whole degrees

    @property
    def null_fields(self) -> frozenset[str]:
        """Sample fields this board always reports as null (when not lost)."""
        out: set[str] = set()
        if not self.fan:
            out.add("fan_pct")
        if not self.nvlink:
            out |= {"nvlink_crc_errors", "nvlink_replay_errors", "nvlink_recovery_errors"}
        if not self.row_remap:
            out |= {"remapped_rows_correctable", "remapped_rows_uncorrectable"}
            out |= {"remap_pending", "remap_failure"}
        if not self.retired_pages:
            out |= {"retired_pages", "retired_pages_pending"}
        return frozenset(out)


# 700 W GH100 boards (H100 SXM, H200 SXM) share the HGX air-cooled platform; the H200 recording calibrates both:
# idle 44-45 °C at 83 W and 67-68 °C at 690 W give 0.038 K/W over a 16-17 °C offset above a ~25 °C inlet; the die
# follows a power step by ~70 % within one second and settles within a minute.
_GH100_THERMAL = dict(
    r_th=(0.038, 0.002), temp_offset_c=17.0, tau_s=(15.0, 40.0), fast_frac=0.85, temp_int=True,
)  # fmt: skip
# A dense bf16 job on a 700 W GH100 demands ~830 W at full clock (the recording: capped at 690 W, 1455-1485 MHz).
_GH100_LOAD = dict(
    dyn_w=(560.0, 640.0), intensity=(0.40, 0.90), heavy_intensity=(1.20, 1.50), heavy_job_frac=0.5,
    cap_margin_w=7.0, p_noise_w=(0.3, 2.5),
)  # fmt: skip

PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        HardwareProfile(
            name="h100-fan",
            about="the legacy board: H100-like with a fan (the simulator's original GPU; no real part has this mix); "
            "FleetConfig.power_limit_w and mem_total_mib set its limit and memory",
            power_limit_w=700.0, mem_total_mib=81559, max_clock_mhz=1980, idle_clock_mhz=345, mem_clock_mhz=2619,
            pcie_gen_max=5, pcie_gen_idle=1, fan=True, nvlink=True, row_remap=True, retired_pages=True,
            containment=True, idle_w=(62.0, 80.0), dyn_w=(560.0, 630.0), intensity=(0.75, 1.12),
            heavy_intensity=(1.20, 1.45), heavy_job_frac=None, cap_margin_w=0.0, p_noise_w=(1.5, 5.0),
            idle_mem_mib=4, r_th=(0.062, 0.004), temp_offset_c=0.0, tau_s=(25.0, 60.0), fast_frac=0.0,
            temp_int=False,
        ),
        HardwareProfile(
            name="h100-sxm",
            about="NVIDIA H100 SXM5 80GB (spec sheet: up to 700 W, 80 GB HBM3, 1980 MHz boost, PCIe gen 5, NVLink 4); "
            "passive heat sink in an HGX chassis; thermal and cap behaviour taken from the H200 recording (same "
            "GH100 die and chassis); idle power 62-80 W is an assumption",
            power_limit_w=700.0, mem_total_mib=81559, max_clock_mhz=1980, idle_clock_mhz=345, mem_clock_mhz=2619,
            pcie_gen_max=5, pcie_gen_idle=5, fan=False, nvlink=True, row_remap=True, retired_pages=False,
            containment=True, idle_w=(62.0, 80.0), idle_mem_mib=4, **_GH100_LOAD, **_GH100_THERMAL,
        ),
        HardwareProfile(
            name="h200-sxm",
            about="NVIDIA H200 SXM 141GB (spec sheet: up to 700 W, 141 GB HBM3e, PCIe gen 5, NVLink 4); calibrated to "
            "the recording in tests/data/h200-healthy: 143771 MiB, idle 83 W / 345 MHz / 615 MiB, memory clock "
            "3201 MHz, PCIe gen 5 at idle, heavy jobs at the cap with SW_POWER_CAP; retired_pages null",
            power_limit_w=700.0, mem_total_mib=143771, max_clock_mhz=1980, idle_clock_mhz=345, mem_clock_mhz=3201,
            pcie_gen_max=5, pcie_gen_idle=5, fan=False, nvlink=True, row_remap=True, retired_pages=False,
            containment=True, idle_w=(76.0, 88.0), idle_mem_mib=615, **_GH100_LOAD, **_GH100_THERMAL,
        ),
        HardwareProfile(
            name="a100-sxm",
            about="NVIDIA A100 SXM4 80GB (spec sheet: 400 W, 80 GB HBM2e at 1593 MHz, 1410 MHz boost, PCIe gen 4, "
            "NVLink 3); idle 210 MHz; row remapping replaced page retirement on A100 (NVIDIA A100 GPU Memory Error "
            "Management), so retired_pages is null; idle power and thermals are assumptions",
            power_limit_w=400.0, mem_total_mib=81920, max_clock_mhz=1410, idle_clock_mhz=210, mem_clock_mhz=1593,
            pcie_gen_max=4, pcie_gen_idle=4, fan=False, nvlink=True, row_remap=True, retired_pages=False,
            containment=True, idle_w=(50.0, 65.0), dyn_w=(330.0, 370.0), intensity=(0.40, 0.90),
            heavy_intensity=(1.12, 1.30), heavy_job_frac=0.35, cap_margin_w=3.0, p_noise_w=(0.3, 2.0),
            idle_mem_mib=4, r_th=(0.065, 0.004), temp_offset_c=14.0, tau_s=(15.0, 40.0), fast_frac=0.8,
            temp_int=True,
        ),
        HardwareProfile(
            name="h100-pcie",
            about="NVIDIA H100 PCIe 80GB (spec sheet: 350 W, 80 GB HBM2e, 1755 MHz boost, PCIe gen 5, passive "
            "card cooled by server fans, so fan_pct null; no NVLink bridge here, so nvlink_* null); the link "
            "dropping to gen 1 at idle, idle power and thermals are assumptions",
            power_limit_w=350.0, mem_total_mib=81559, max_clock_mhz=1755, idle_clock_mhz=345, mem_clock_mhz=1593,
            pcie_gen_max=5, pcie_gen_idle=1, fan=False, nvlink=False, row_remap=True, retired_pages=False,
            containment=True, idle_w=(42.0, 58.0), dyn_w=(290.0, 320.0), intensity=(0.40, 0.90),
            heavy_intensity=(1.12, 1.35), heavy_job_frac=0.5, cap_margin_w=3.0, p_noise_w=(0.3, 2.0),
            idle_mem_mib=4, r_th=(0.10, 0.006), temp_offset_c=12.0, tau_s=(15.0, 40.0), fast_frac=0.8,
            temp_int=True,
        ),
        HardwareProfile(
            name="v100-sxm2",
            about="NVIDIA V100 SXM2 32GB (spec sheet: 300 W, 32 GB HBM2 at 877 MHz, 1530 MHz boost, PCIe gen 3, "
            "NVLink 2); Volta retires pages instead of remapping rows (remapped_rows_* null, retired_pages counted) "
            "and has no error containment (no XID 94/95); idle power and thermals are assumptions",
            power_limit_w=300.0, mem_total_mib=32510, max_clock_mhz=1530, idle_clock_mhz=135, mem_clock_mhz=877,
            pcie_gen_max=3, pcie_gen_idle=1, fan=False, nvlink=True, row_remap=False, retired_pages=True,
            containment=False, idle_w=(38.0, 55.0), dyn_w=(240.0, 270.0), intensity=(0.40, 0.90),
            heavy_intensity=(1.15, 1.30), heavy_job_frac=0.2, cap_margin_w=2.0, p_noise_w=(0.3, 2.0),
            idle_mem_mib=0, r_th=(0.12, 0.008), temp_offset_c=12.0, tau_s=(15.0, 40.0), fast_frac=0.8,
            temp_int=True,
        ),
    )
}  # fmt: skip
LEGACY = "h100-fan"

# A present-day training fleet (an assumption, for FleetConfig.realistic): mostly 700 W Hopper in HGX chassis,
# a fifth A100, some PCIe H100 and a few old V100 nodes; the legacy fan board is fictional and left out.
REALISTIC_MIX: dict[str, float] = {
    "h100-sxm": 0.35, "h200-sxm": 0.25, "a100-sxm": 0.2, "h100-pcie": 0.12, "v100-sxm2": 0.08,
}  # fmt: skip


def profile(name: str) -> HardwareProfile:
    """The profile called `name`; ValueError naming the known profiles otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown hardware profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]
