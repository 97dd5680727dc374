"""What the shipped model and its alarm make of one failure mode's precursors, by strength and length (issue 14
diagnostic).

    python scripts/precursor-sweep.py MODE [OUT.json]

Simulates 12 hosts at 5 s (no random failures) and makes one GPU of each fail with MODE (memory, thermal, power
or interconnect) after 3 hours, its precursor at strength 0.25, 0.5, 0.75 or 1.0 (the simulator draws 0.25 to 1
times the fleet's `precursor_strength` per failure) and 10, 30 or 90 minutes long; scores the fleet with the
shipped model through the stream's `RiskProcessor`. Per failure it prints the highest calibrated score in the
last 60 and 10 minutes before failing, the longest the score stayed at or above the alarm's threshold (the
alarm also needs `for_s` of it), and the alarm's lead. OUT.json, if given, gets the same as JSON.
"""

from __future__ import annotations

import sys

import orjson
import torch

from gpuwatch.schemas.codecs import decode_risk
from gpuwatch.simulator.fleet import FleetConfig, FleetSimulator
from gpuwatch.streams.model import Scorer, load_artifact
from gpuwatch.streams.processor import Inbound, RiskProcessor

MODES = ("memory", "thermal", "power", "interconnect")
STRENGTHS = (0.25, 0.5, 0.75, 1.0)
PRECURSORS_S = (600.0, 1800.0, 5400.0)
FAIL_AFTER_S, INTERVAL_S = 3 * 3600.0, 5.0


def main(mode: str, out: str | None) -> None:
    torch.set_num_threads(1)
    hosts = len(STRENGTHS) * len(PRECURSORS_S)
    sim = FleetSimulator(FleetConfig(hosts=hosts, seed=77, interval_s=INTERVAL_S, start_ts=1_700_000_000.0,
                                     rate_scale=1e-9))  # fmt: skip
    spec = {}
    for h in range(hosts):
        strength, precursor_s = STRENGTHS[h % len(STRENGTHS)], PRECURSORS_S[h // len(STRENGTHS)]
        sim.schedule_failure(h, h % 8, mode, FAIL_AFTER_S, precursor_s, strength=strength)
        spec[sim.hosts[h]] = (h % 8, strength, precursor_s)
    processor = RiskProcessor(Scorer(load_artifact(), "cpu"), rescore_interval_s=5.0)
    op = processor.alarm_op
    scorings: dict[str, list[tuple[float, float, bool]]] = {host: [] for host in spec}
    for _ in range(int((FAIL_AFTER_S + 600.0) / INTERVAL_S)):
        for _, value in processor.process([Inbound(v) for _, v in sim.step_json()]).risk:
            rec = decode_risk(value)
            if rec.gpu_index == spec[rec.host][0] and not rec.failed:
                scorings[rec.host].append((rec.ts, float(rec.score), rec.alarm))
    rows = []
    for label in sim.drain_labels():
        host, fail_ts = label["host"], label["fail_ts"]
        before = [s for s in scorings[host] if fail_ts - 3600.0 <= s[0] < fail_ts]
        held, start = 0.0, None  # the longest run of scorings at or above the threshold, in seconds of sample time
        for ts, score, _ in before:
            start = (start if start is not None else ts) if score >= op.threshold else None
            held = max(held, ts - start) if start is not None else held
        alarms = [ts for ts, _, alarm in before if alarm]
        rows.append({"host": host, "strength": spec[host][1], "precursor_min": spec[host][2] / 60.0,
                     "max_score_60_min": max((s for _, s, _ in before), default=0.0),
                     "max_score_10_min": max((s for ts, s, _ in before if ts >= fail_ts - 600.0), default=0.0),
                     "longest_at_threshold_s": held,
                     "alarm_lead_min": (fail_ts - alarms[0]) / 60.0 if alarms else None})  # fmt: skip
    print(f"{mode}: alarm {op.name} (threshold {op.threshold:g}, held {op.for_s:g} s)")
    print(f"{'strength':>8} {'precursor':>9} {'max 60 min':>10} {'max 10 min':>10} {'held s':>7} {'alarm lead':>10}")
    for r in rows:
        lead = f"{r['alarm_lead_min']:.1f} min" if r["alarm_lead_min"] is not None else "none"
        print(f"{r['strength']:>8.2f} {r['precursor_min']:>7.0f} m {r['max_score_60_min']:>10.3f} "
              f"{r['max_score_10_min']:>10.3f} {r['longest_at_threshold_s']:>7.0f} {lead:>10}")  # fmt: skip
    if out:
        with open(out, "wb") as fh:
            fh.write(orjson.dumps({"mode": mode, "operating_point": op.name, "failures": rows},
                                  option=orjson.OPT_INDENT_2))  # fmt: skip
        print(f"wrote {out}")


if __name__ == "__main__":
    usage = f"usage: python scripts/precursor-sweep.py MODE [OUT.json], MODE one of {', '.join(MODES)}"
    if not 2 <= len(sys.argv) <= 3:
        sys.exit(usage)
    if sys.argv[1] not in MODES:
        sys.exit(f"precursor-sweep: unknown mode {sys.argv[1]!r}; {usage}")
    target = sys.argv[2] if len(sys.argv) == 3 else None
    if target:
        try:
            open(target, "ab").close()  # now, not after the run: a folder that is not there fails here
        except OSError as exc:
            sys.exit(f"precursor-sweep: cannot write {target} ({exc.strerror}); give a path in a folder that exists")
    main(sys.argv[1], target)
