"""Does the stated reason match the injected precursor? Simulated failures of every mode, explained.

A small simulated fleet (`simulator.fleet.FleetSimulator`) gets failures injected through its API, each mode in
turn, at most a few per host so that every failing GPU has healthy neighbours; its snapshots go through the
stream's own window (`streams.window.WindowStore`), and at chosen points of each precursor (a fraction of the
way from its start to the failure) the explanation (`streams.explain.severities`) ranks the signals. A failure
is a hit when the first signal from its mode's precursor (`explain.SIGNAL_MODE`) ranks first or second.
Sudden failures have no precursor: they are simulated and reported apart, never counted as hits or misses.

Used by tests/test_explain.py (small) and `gpuwatch bench explain` (more failures).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from gpuwatch.schemas.codecs import decode_snapshot
from gpuwatch.simulator import faults
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.explain import SIGNAL_MODE, SIGNALS, severities
from gpuwatch.streams.window import WindowStore

PRECURSOR_MODES: tuple[str, ...] = tuple(m for m in faults.MODES if m != "sudden")
_MODE_OF_SIGNAL = np.array([SIGNAL_MODE[s] or "" for s in SIGNALS])


@dataclass
class Case:
    """One injected failure and, per evaluated fraction of its precursor, the rank (1 = first) of the best
    signal of its mode and the signal that ranked first."""

    host: int
    gpu: int
    mode: str
    precursor_s: float
    strength: float
    fail_ts: float
    ranks: dict[float, int] = field(default_factory=dict)
    top: dict[float, str] = field(default_factory=dict)


@dataclass
class ExplainEval:
    """Hit rates (rank <= 2) per mode and overall, per evaluated fraction, and the cases behind them."""

    cases: list[Case]
    fractions: tuple[float, ...]
    explain_s: float  # CPU time spent in `severities`
    explained: int  # GPU-explanations computed
    gpu_samples: int

    def hit_rate(self, fraction: float, mode: str | None = None, within: int = 2) -> float:
        """Share of the precursor failures (of `mode`, or all) whose mode's signal ranks within `within`."""
        ranks = [c.ranks[fraction] for c in self.cases if c.mode in PRECURSOR_MODES and (mode in (None, c.mode))]
        return float(np.mean([r <= within for r in ranks])) if ranks else float("nan")

    def count(self, mode: str | None = None) -> int:
        return sum(1 for c in self.cases if mode in (None, c.mode) and c.mode in PRECURSOR_MODES)

    def to_dict(self) -> dict:
        per_mode = {
            f"{fr:g}": {m: {"failures": self.count(m), "hit_rate": self.hit_rate(fr, m),
                            "first": self.hit_rate(fr, m, within=1)} for m in PRECURSOR_MODES}
            for fr in self.fractions
        }  # fmt: skip
        return {
            "fractions": list(self.fractions),
            "failures": self.count(),
            "hit_rate": {f"{fr:g}": self.hit_rate(fr) for fr in self.fractions},
            "per_mode": per_mode,
            "sudden": sum(1 for c in self.cases if c.mode == "sudden"),
            "explain_us_per_gpu": 1e6 * self.explain_s / max(self.explained, 1),
            "gpu_samples": self.gpu_samples,
            "cases": [{"host": c.host, "gpu": c.gpu, "mode": c.mode, "precursor_s": round(c.precursor_s, 1),
                       "strength": round(c.strength, 3), "ranks": {f"{k:g}": v for k, v in c.ranks.items()},
                       "top": {f"{k:g}": v for k, v in c.top.items()}} for c in self.cases],
        }  # fmt: skip


def rank_of_mode(sev: np.ndarray, modes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `sev` (len(SIGNALS) columns): the rank (1 = first) of the most severe signal of that row's
    mode, and the index of the signal ranked first. Ties rank the mode's signal last (never flattered)."""
    mine = _MODE_OF_SIGNAL[None, :] == np.asarray(modes)[:, None]
    best = np.where(mine, sev, -np.inf).max(axis=1)
    others = np.where(mine, -np.inf, sev)
    rank = 1 + (others >= best[:, None]).sum(axis=1)
    return rank, np.argmax(sev, axis=1)


def run(
    hosts: int = 8,
    per_host: int = 2,
    seed: int = 0,
    interval_s: float = 10.0,
    warmup_s: float = 3600.0,
    fractions: tuple[float, ...] = (0.5, 1.0),
    strength: tuple[float, float] = (0.25, 1.0),
    sudden_every: int = 5,
    realistic: bool = False,
) -> ExplainEval:
    """Simulate `hosts` x 8 GPUs, `per_host` of each host failing (modes in turn, every `sudden_every`-th sudden),
    precursor lengths and strengths drawn as the simulator draws them, after `warmup_s` of normal running (the
    baselines learn), and explain each failing GPU at `fractions` of its precursor (1.0: the last sample
    before the failure). `realistic`: the realistic hardware mix with every benign look-alike at its stated
    prevalence (`FleetConfig.realistic`). Repairs take minutes here, so a host whose first GPU failed is back
    at work for its second GPU's precursor. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    kw = dict(hosts=hosts, seed=seed, interval_s=interval_s, start_ts=1.7e9, repair_time_scale=1e-5)
    sim = FleetSimulator(FleetConfig.realistic(**kw) if realistic else FleetConfig(**kw))  # type: ignore[arg-type]
    t0 = sim.now
    cases: list[Case] = []
    k = 0
    for h in range(hosts):
        for g in rng.choice(sim.G, size=per_host, replace=False).tolist():
            mode = "sudden" if sudden_every and k % sudden_every == sudden_every - 1 else \
                PRECURSOR_MODES[(k - k // sudden_every if sudden_every else k) % len(PRECURSOR_MODES)]  # fmt: skip
            k += 1
            lo, hi = faults.PRECURSOR_RANGE_S[mode] if mode != "sudden" else (600.0, 600.0)
            prec = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            st = float(rng.uniform(*strength))
            fail_in = warmup_s + prec + float(rng.uniform(0.0, 1800.0))
            sim.schedule_failure(h, g, mode, fail_in, prec, strength=st)
            cases.append(Case(h, g, mode, prec, st, t0 + fail_in))
    # evaluation times: fraction f of the way through the precursor, and no later than the last sample before the
    # failure (the step whose next one reaches the failure time)
    due = [(min(c.fail_ts - (1.0 - f) * c.precursor_s, c.fail_ts - interval_s), i, f)
           for i, c in enumerate(cases) for f in fractions]  # fmt: skip
    due.sort()
    store = WindowStore(capacity=hosts * sim.G)
    end = max(c.fail_ts for c in cases)
    explain_s, explained, samples, pos = 0.0, 0, 0, 0
    while sim.now + interval_s < end + interval_s:
        snaps = [decode_snapshot(raw) for _, raw in sim.step_json()]
        counts = [len(s.uuids) for s in snaps]
        slots = store.slots_for([u for s in snaps for u in s.uuids],
                                [s.host for s, n in zip(snaps, counts) for _ in range(n)],
                                np.concatenate([s.gpu_index for s in snaps]))  # fmt: skip
        store.update(slots, np.repeat([s.ts for s in snaps], counts), np.concatenate([s.numeric for s in snaps]),
                     np.concatenate([s.flags for s in snaps]), np.concatenate([s.throttle for s in snaps]),
                     [x for s in snaps for x in s.xids])  # fmt: skip
        samples += len(slots)
        now = sim.now
        batch = []
        while pos < len(due) and due[pos][0] <= now:
            batch.append(due[pos])
            pos += 1
        if batch:
            picked = [cases[i] for _, i, _ in batch]
            uuids = [sim.uuids[c.host * sim.G + c.gpu] for c in picked]
            idx = np.array([store.slot_of[u] for u in uuids])
            t = time.process_time()
            sev, _, _ = severities(store, idx)
            explain_s += time.process_time() - t
            explained += len(idx)
            ranks, top = rank_of_mode(sev, [c.mode for c in picked])
            for (_, i, f), r, j in zip(batch, ranks.tolist(), top.tolist()):
                cases[i].ranks[f] = int(r)
                cases[i].top[f] = SIGNALS[j]
        if pos >= len(due):
            break
    return ExplainEval(cases, tuple(fractions), explain_s, explained, samples)
