"""A one-file HTML report of a run: the model's score over time for the GPUs that failed, and the fleet's.

`render_report(data, path)` draws PNG plots with matplotlib (the `report` extra) and embeds them in a
self-contained HTML page. For each failed GPU: its score against time before the failure, the alarm
operating point's threshold, when it was in alarm (what the product acted on), the failure moment and
each remediation; then the distribution of the fleet's latest scores and a table of every remediation
event. Scores, not risks, are drawn: `risk` is stated at the fleet's own failure rate (about 1e-5 for a
healthy GPU), while the operating point compares the model's calibrated score. Only records from before
each failure are shown: after it the GPU is failed, not at risk.
"""

from __future__ import annotations

import base64
import html
import io
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from gpuwatch.apps.fleet.view import LiveRisk, count_text, format_view
from gpuwatch.schemas.records import FleetGpu, Remediation, Risk
from gpuwatch.streams.operating_point import OperatingPoint

INSTALL_HINT = "the report needs matplotlib: pip install 'gpuwatch[report]' (or pip install matplotlib)"
ACTION_COLORS = {"checkpoint": "#1f77b4", "migrate": "#ff7f0e", "reboot": "#9467bd", "repair": "#8c564b"}
EPISODE_GAP_S = 600.0  # alarms closer than this form one episode, as the policy and the evaluation count them


class ReportUnavailable(RuntimeError):
    """matplotlib is not installed; the message says how to install it."""


@dataclass
class FailedGpu:
    """One GPU that failed during the run, with what the pipeline saw and did before."""

    host: str
    gpu_index: int
    mode: str
    fail_ts: float
    risk: Sequence[tuple[float, float, bool]]  # (sample ts, score, in alarm), oldest first, before the failure
    remediation: Sequence[tuple[float, str]] = ()  # (ts, action)
    precursor_ts: float | None = None  # when the (simulated) degradation began, if known

    @property
    def name(self) -> str:
        return f"{self.host}:{self.gpu_index}"


@dataclass
class ReportData:
    """Everything the report shows; `summary` rows appear as a table at the top."""

    failed: list[FailedGpu]
    fleet_risk: Sequence[float]  # the latest score of every GPU that has not failed
    # Remediation events: dicts with ts, host, gpu_index, action and risk.
    events: list[dict[str, Any]] = field(default_factory=list)
    threshold: float = 0.5  # the alarm operating point's score threshold
    op: str = ""  # the alarm operating point's name (model:0.658x2)
    fleet_alarms: int = 0  # GPUs in alarm at their latest record
    summary: list[tuple[str, str]] = field(default_factory=list)
    title: str = "gpuwatch run report"
    fleet: dict[str, Any] | None = None  # a fleet reliability view (gpuwatch.apps.fleet.view.fleet_view), if any


def lead_time_s(gpu: FailedGpu) -> float | None:
    """Seconds from the first alarm of the alarm episode running when the GPU failed (alarms less than
    EPISODE_GAP_S apart) to the failure; None if the GPU was not in such an episode when it failed."""
    alarms = [t for t, _, a in gpu.risk if a and t <= gpu.fail_ts]
    if not alarms or gpu.fail_ts - alarms[-1] >= EPISODE_GAP_S:
        return None
    first = len(alarms) - 1
    while first > 0 and alarms[first] - alarms[first - 1] < EPISODE_GAP_S:
        first -= 1
    return float(gpu.fail_ts - alarms[first])


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise ReportUnavailable(INSTALL_HINT) from exc
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _window(gpu: FailedGpu, minutes: np.ndarray, lead: float | None) -> tuple[float, float]:
    """x range in minutes: the run-up to the failure (what happened long before is flat and uninteresting)."""
    start = -10.0
    for moment in (gpu.precursor_ts, *(t for t, _ in gpu.remediation)):
        if moment is not None:
            start = min(start, (moment - gpu.fail_ts) / 60.0 - 2.0)
    if lead is not None:
        start = min(start, -lead / 60.0 - 2.0)
    lo = max(start, float(minutes.min())) if len(minutes) else start
    hi = max(float(minutes.max()) if len(minutes) else 0.0, 0.0) + 0.5
    return min(lo, -1.0), hi


def _closeup(gpu: FailedGpu, lead: float | None) -> tuple[float, float]:
    """x range in seconds around the failure: at least the last minute, back to the remediations of the
    last 5 minutes and the threshold crossing if it was that recent."""
    start = -60.0
    for ts, _ in gpu.remediation:
        if ts - gpu.fail_ts >= -300.0:
            start = min(start, ts - gpu.fail_ts - 15.0)
    if lead is not None and lead <= 300.0:
        start = min(start, -lead - 15.0)
    return max(start, -315.0), 30.0


def _label_groups(gpu: FailedGpu, unit_s: float, min_gap: float) -> list[tuple[float, list[str]]]:
    """Remediations as (offset from the failure in `unit_s` units, actions), merging those closer than `min_gap`."""
    groups: list[tuple[float, list[str]]] = []
    for ts, action in sorted(gpu.remediation):
        x = (ts - gpu.fail_ts) / unit_s
        if groups and x - groups[-1][0] < min_gap:
            groups[-1][1].append(action)
        else:
            groups.append((x, [action]))
    return groups


def _relative(seconds: float) -> str:
    """A signed offset from the failure, in seconds when short: '-6 s', '-2.5 min'."""
    return f"{seconds:+.0f} s" if abs(seconds) < 90 else f"{seconds / 60:+.1f} min"


def _draw(ax: Any, gpu: FailedGpu, threshold: float, unit_s: float, lo: float, hi: float) -> None:
    """One view of a failed GPU: x is time relative to the failure in units of `unit_s` seconds."""
    t = np.array([p[0] for p in gpu.risk], dtype=np.float64)
    r = np.array([p[1] for p in gpu.risk], dtype=np.float64)
    alarm = np.array([p[2] for p in gpu.risk], dtype=bool)
    if gpu.precursor_ts is not None:
        ax.axvspan((gpu.precursor_ts - gpu.fail_ts) / unit_s, 0, color="#fde0c5", alpha=0.5, lw=0,
                   label="degradation (ground truth)")  # fmt: skip
    ax.plot((t - gpu.fail_ts) / unit_s, r, color="#222222", lw=1.4, marker=".", ms=3, label="model score")
    if alarm.any():
        ax.plot((t[alarm] - gpu.fail_ts) / unit_s, r[alarm], ls="none", marker="o", ms=4, color="#d62728",
                label="in alarm")  # fmt: skip
    ax.axhline(threshold, color="#d62728", ls="--", lw=1, label=f"alarm threshold {threshold:g}")
    ax.axvline(0, color="#d62728", lw=2.2, label="failure")
    for x, actions in _label_groups(gpu, unit_s, (hi - lo) / 40.0):
        if not lo <= x <= hi:
            continue
        for action in actions:
            ax.axvline(x, color=ACTION_COLORS.get(action, "#2ca02c"), lw=1.6, ls=":")
        # Actions seconds apart share one label, so their names do not print over each other.
        ax.text(x, 0.45, " + ".join(actions) + " ", rotation=90, ha="right", va="center", fontsize=8,
                color=ACTION_COLORS.get(actions[0], "#2ca02c"),
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})  # fmt: skip
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(lo, hi)
    ax.set_xlabel(f"{'minutes' if unit_s == 60 else 'seconds'} relative to the failure")
    ax.set_ylabel("model score")
    ax.grid(alpha=0.3)


def _plot_failed(plt: Any, gpus: list[FailedGpu], threshold: float) -> str:
    """One row per failed GPU: the whole recorded run-up (minutes) and a close-up of the failure (seconds)."""
    fig, axes = plt.subplots(len(gpus), 2, figsize=(12.4, 3.3 * len(gpus)), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2]})  # fmt: skip
    for (wide, close), gpu in zip(axes, gpus):
        lead = lead_time_s(gpu)
        minutes = np.array([(p[0] - gpu.fail_ts) / 60.0 for p in gpu.risk])
        _draw(wide, gpu, threshold, 60.0, *_window(gpu, minutes, lead))
        lo, hi = _closeup(gpu, lead)
        _draw(close, gpu, threshold, 1.0, lo, hi)
        verdict = f"in alarm {_relative(lead)[1:]} before failing" if lead is not None else "no alarm"
        wide.set_title(f"{gpu.name} ({gpu.mode}): {verdict}", fontsize=10, loc="left")
        close.set_title(f"{gpu.name}: the last {-lo:.0f} s", fontsize=10, loc="left")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for action, color in ACTION_COLORS.items():
        if any(a == action for g in gpus for _, a in g.remediation):
            handles.append(plt.Line2D([], [], color=color, ls=":", lw=1.6))
            labels.append(f"remediation: {action}")
    fig.tight_layout(rect=(0, 0.9 / (3.3 * len(gpus) + 0.9), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False)
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _plot_fleet(plt: Any, risk: np.ndarray, failed_risk: dict[str, float], threshold: float, alarms: int) -> str:
    fig, ax = plt.subplots(figsize=(12.4, 3.6))
    bins = np.linspace(0.0, 1.0, 41)
    counts, _, patches = ax.hist(risk, bins=bins, color="#4c72b0", edgecolor="white")
    for patch, left in zip(patches, bins[:-1]):
        if left >= threshold:
            patch.set_facecolor("#d62728")
    ax.axvline(threshold, color="#d62728", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_ylim(0.7, max(counts.max(), 1) * 2.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("latest model score")
    ax.set_ylabel("GPUs (log scale)")
    ax.set_title(
        f"{len(risk):,} GPUs: {alarms} in alarm (alarm threshold {threshold:g}), "
        f"median score {np.median(risk) if len(risk) else 0:.3f}",
        fontsize=10,
    )
    by_bin: dict[int, list[str]] = {}
    for name, r in failed_risk.items():
        by_bin.setdefault(
            int(np.clip(np.searchsorted(bins, r, side="right") - 1, 0, len(bins) - 2)), []
        ).append(name)
    for b, names in by_bin.items():  # one label per bar, so failed GPUs with similar risk do not overlap
        ax.annotate(
            "\n".join(names),
            ((bins[b] + bins[b + 1]) / 2, max(counts[b], 1.0)),
            xytext=(0, 14),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="#d62728",
            arrowprops={"arrowstyle": "-|>", "color": "#d62728", "lw": 0.8},
        )
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _time(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%H:%M:%S UTC")


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1320px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
p.note{color:#555;font-size:13px;margin-top:2px} img{max-width:100%}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:3px 9px;text-align:left}
th{background:#f3f3f3} .kv td:first-child{color:#555}
"""


def render_report(data: ReportData, path: str | Path) -> Path:
    """Write the HTML report to `path` (parents created) and return it. Raises ReportUnavailable without
    matplotlib."""
    plt = _pyplot()
    path = Path(path)
    risk = np.asarray(data.fleet_risk, dtype=np.float64)
    parts = [
        f"<h1>{html.escape(data.title)}</h1>",
        f"<p class='note'>Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}.</p>",
    ]
    if data.summary:
        parts.append(
            "<table class='kv'>"
            + "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in data.summary)
            + "</table>"
        )

    parts.append("<h2>GPUs that failed</h2>")
    with_risk = [g for g in data.failed if len(g.risk)]
    if with_risk:
        parts.append(
            "<p class='note'>One row per failed GPU: the model's score over the recorded run-up (left) and in "
            "the moments before the failure (right). Red dots: in alarm at the operating point "
            f"{html.escape(data.op or '?')} (the score threshold, the scorings in a row and the seconds it must hold); dashed: its "
            "threshold; red line: the failure; dotted: each remediation the controller executed. The shaded "
            "span is when the simulated degradation began.</p>"
            f"<img alt='risk of the failed GPUs over time' src='data:image/png;base64,"
            f"{_plot_failed(plt, with_risk, data.threshold)}'>"
        )
        rows = []
        for g in with_risk:
            lead = lead_time_s(g)
            actions = ", ".join(f"{a} at {_relative(t - g.fail_ts)}" for t, a in g.remediation) or "none"
            rows.append(
                (
                    g.name,
                    g.mode,
                    _time(g.fail_ts),
                    f"{max(r for _, r, _ in g.risk):.2f}",
                    "no alarm" if lead is None else _relative(lead)[1:],
                    actions,
                )
            )
        parts.append(
            _table(("GPU", "mode", "failed at", "max score before failing", "alarm before failure", "remediation"),
                   rows)  # fmt: skip
        )
    else:
        parts.append("<p>No GPU failed during the run (or none had been scored yet).</p>")

    parts.append("<h2>Fleet risk</h2>")
    if len(risk):
        final = {g.name: float(g.risk[-1][1]) for g in with_risk}
        parts.append(
            "<p class='note'>Distribution of the latest score of every GPU that has not failed; bars at or above "
            "the alarm threshold are red; arrows mark the failed GPUs' last score before they failed.</p>"
            f"<img alt='fleet score distribution' src='data:image/png;base64,"
            f"{_plot_fleet(plt, risk, final, data.threshold, data.fleet_alarms)}'>"
        )
    else:
        parts.append("<p>No risk was recorded.</p>")

    if data.fleet is not None:
        parts.append(fleet_section(plt, data.fleet))

    parts.append("<h2>Remediation events</h2>")
    failed_names = {g.name for g in data.failed}
    if data.events:
        rows = [
            (
                _time(e["ts"]),
                f"{e['host']}:{e['gpu_index']}",
                e["action"],
                f"{e['risk']:.2g}",
                "yes" if f"{e['host']}:{e['gpu_index']}" in failed_names else "no",
            )
            for e in sorted(data.events, key=lambda e: e["ts"])
        ]
        parts.append(_table(("time", "GPU", "action", "risk", "GPU failed"), rows))
    else:
        parts.append("<p>None.</p>")

    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _plot_reliability(plt: Any, scorers: dict[str, dict[str, Any]]) -> str:
    """Reliability diagram: observed failure rate against mean predicted risk per bin, one line per scorer,
    marker area by the bin's records; the diagonal is perfect calibration."""
    fig, (ax, hist) = plt.subplots(1, 2, figsize=(12.4, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot([0, 1], [0, 1], color="#999999", ls="--", lw=1, label="perfect calibration")
    for name, rep in scorers.items():
        bins = [b for b in rep.get("calibration", []) if b["count"] > 0]
        if not bins:
            continue
        x = np.array([b["mean_risk"] for b in bins])
        y = np.array([b["failure_rate"] for b in bins])
        n = np.array([b["count"] for b in bins], dtype=np.float64)
        line = ax.plot(x, y, marker="o", lw=1.2, ms=3, label=f"{name} (ECE {rep.get('ece', float('nan')):.3f})")
        ax.scatter(x, y, s=12 + 60 * n / n.max(), color=line[0].get_color(), alpha=0.35)
        hist.bar(np.arange(len(n)) + 0.28 * list(scorers).index(name), n, width=0.28, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean predicted risk (bin)")
    ax.set_ylabel("observed share failing within the horizon")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    hist.set_yscale("log")
    hist.set_xlabel("bin (15 equal-width bins of risk, empty ones left out)")
    hist.set_ylabel("records (log scale)")
    hist.legend(fontsize=8)
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def render_eval_report(report: dict[str, Any], path: str | Path, title: str = "gpuwatch eval report") -> Path:
    """The HTML page of a `gpuwatch eval` report (one fleet, or several under `datasets`): per fleet, the
    reliability diagram of every scorer and what each replayed policy did. Raises ReportUnavailable without
    matplotlib."""
    plt = _pyplot()
    path = Path(path)
    parts = [f"<h1>{html.escape(title)}</h1>", f"<p class='note'>Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}.</p>"]
    for rep in report.get("datasets", [report]):
        data = rep.get("data", {})
        parts.append(f"<h2>{html.escape(str(data.get('name', 'fleet')))}</h2>")
        parts.append(f"<p class='note'>{data.get('gpu_days', '?')} GPU-days, {data.get('failures', '?')} failures, "
                     f"model {html.escape(str(data.get('model', '?')))} at operating point "
                     f"{html.escape(str(data.get('operating_point', '?')))}; risk stated at this fleet's failure "
                     f"rate ({data.get('risk_stated_at_failures_per_gpu_day')} per GPU-day).</p>")  # fmt: skip
        parts.append("<h3>Calibration</h3><img alt='reliability diagram' src='data:image/png;base64,"
                     f"{_plot_reliability(plt, rep.get('scorers', {}))}'>")  # fmt: skip
        rows = []
        for name, s in rep.get("scorers", {}).items():
            rows.append((name, f"{s.get('precision', float('nan')):.3f}", f"{s.get('recall', float('nan')):.3f}",
                         f"{s.get('median_lead_min', float('nan')):.1f}", f"{s.get('ece', float('nan')):.3f}",
                         f"{s.get('calibration_max_gap_above_half', float('nan')):.3f}"))  # fmt: skip
        parts.append("<h3>Alarms</h3>" + _table(("scorer", "precision", "recall", "median lead (min)", "ECE",
                                                 "worst bin above 0.5"), rows))  # fmt: skip
        for name, sysrep in rep.get("system", {}).items():
            rows = []
            for action, a in sysrep["actions"].items():
                if action == "repair":
                    rows.append((action, a["events"], "-", "-", "-", "-", f"{a['repairs_of_failures']} of failures"))
                    continue
                rows.append((action, a["events"], f"{a['recall']:.3f}", f"{a['median_lead_min']:.1f}",
                             f"{a['false_healthy_per_1000_gpu_days']:.2f}", a["false_by_cause"]["early"],
                             a["after_failure"]))  # fmt: skip
            v = sysrep["value"]
            parts.append(f"<h3>Policy replay: {html.escape(name)}</h3>" + _table(
                ("action", "events", "recall", "median lead (min)", "false / 1,000 healthy GPU-days", "early",
                 "after failure"), rows) + "<p class='note'>Net GPU-hours per 1,000 GPU-days: "
                f"{v['net_gpu_h_per_1000_gpu_days_fleet']:,.0f} on this fleet (oracle "
                f"{v['oracle_gpu_h_per_1000_gpu_days_fleet']:,.0f}); at the real failure rate "
                f"{v['net_gpu_h_per_1000_gpu_days_real']:,.1f} (oracle {v['oracle_gpu_h_per_1000_gpu_days_real']:,.1f}).</p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def _interval_bars(ax: Any, pmf: Sequence[float], f: dict[str, Any], title: str, color: str) -> None:
    """The pmf of a failure count as bars, its interval's bars dark, the expected count as a line."""
    x = np.arange(len(pmf))
    inside = (x >= f["lower"]) & (x <= f["upper"])
    ax.bar(x, pmf, width=0.85, color=np.where(inside, color, "#c8c8c8"))
    ax.axvline(f["value"], color="#d62728", lw=1.5, label=f"expected {count_text(f['value'])}")
    ax.xaxis.get_major_locator().set_params(integer=True)  # counts of failures
    ax.set_xlabel("failures")
    ax.set_ylabel("probability")
    ax.set_title(f"{title}: {count_text(f['value'])} expected, {f['level']:.0%} interval {f['lower']:.0f} - {f['upper']:.0f}",
                 fontsize=10)  # fmt: skip
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def _plot_fleet_forecast(plt: Any, view: dict[str, Any]) -> str:
    short, long = view["forecast"]["short"], view["forecast"]["long"]
    src = {"risk": "sum of live risk", "history": "observed rate", "setting": "setting's rate"}
    fig, axes = plt.subplots(1, 2, figsize=(12.4, 3.4))
    _interval_bars(axes[0], short["pmf"], short, f"next {short['hours']:g} h ({src[short['source']]})", "#4c72b0")
    _interval_bars(axes[1], long["pmf"], long, f"next {long['days']:g} days ({src[long['source']]})", "#55a868")
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _mtbf_panel(ax: Any, groups: list[tuple[str, dict[str, Any]]], fleet_days: float, title: str) -> None:
    """MTBF per group as a point with its interval (log scale); the fleet's MTBF as a dashed line."""
    shown = [(n, g["mtbf_gpu_days"], g["failures"]) for n, g in groups if "mtbf_gpu_days" in g]
    y = np.arange(len(shown))
    for i, (_, m, _k) in enumerate(shown):
        hi = m["upper"] if np.isfinite(m["upper"]) else m["lower"] * 30.0  # no failure: open to the right
        ax.plot([m["lower"], hi], [i, i], color="#4c72b0", lw=2, alpha=0.6)
        if np.isfinite(m["value"]):
            ax.plot(m["value"], i, "o", color="#4c72b0", ms=5)
        else:
            ax.annotate("no failure", (m["lower"], i), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_yticks(y, [f"{n} ({k})" for n, _, k in shown], fontsize=8)
    ax.invert_yaxis()
    if np.isfinite(fleet_days):
        ax.axvline(fleet_days, color="#d62728", ls="--", lw=1, label="fleet")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("MTBF, GPU-days")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="x")


def _plot_fleet_mtbf(plt: Any, view: dict[str, Any], worst_hosts: int = 15) -> str:
    mt = view["mtbf"]
    rate = view["rate_per_gpu_day"]["value"]
    fleet_days = 1.0 / rate if rate > 0 else float("inf")
    hosts = sorted(mt["host"].items(), key=lambda kv: (-kv[1]["failures"], kv[0]))[:worst_hosts]
    fig, axes = plt.subplots(1, 3, figsize=(12.4, max(3.2, 0.22 * len(hosts) + 1.2)))
    _mtbf_panel(axes[0], list(mt["mode"].items()), fleet_days, "by failure mode (failures)")
    _mtbf_panel(axes[1], list(mt["model"].items()), fleet_days, "by GPU model (failures)")
    _mtbf_panel(axes[2], hosts, fleet_days, f"{len(hosts)} hosts with the most failures")
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def _plot_fleet_capacity(plt: Any, view: dict[str, Any]) -> str:
    job, sp = view["job"], view["spares"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.4, 3.4))
    n = np.array([c["gpus"] for c in job["curve"]], dtype=np.float64)
    ax.fill_between(n, [c["lower"] for c in job["curve"]], [c["upper"] for c in job["curve"]], color="#4c72b0",
                    alpha=0.25, label=f"{view['level']:.0%} interval")  # fmt: skip
    ax.plot(n, [c["value"] for c in job["curve"]], "o-", color="#4c72b0", ms=3)
    ax.axvline(job["gpus"], color="#d62728", ls="--", lw=1,
               label=f"{job['gpus']:,} GPUs: {job['interrupted']['value']:.1%}")  # fmt: skip
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("GPUs in the job")
    ax.set_ylabel("share of checkpoint intervals lost")
    ax.set_title(f"a job checkpointing every {job['checkpoint_interval_s'] / 60:g} min", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    short_of = 1.0 - np.cumsum(sp["pmf"])  # P(more GPUs in repair than s spares)
    bx.step(np.arange(len(short_of)), np.maximum(short_of, 1e-6), where="post", color="#55a868")
    bx.axhline(1.0 - sp["service_level"], color="#999999", ls=":", lw=1,
               label=f"1 - service level ({1.0 - sp['service_level']:.0%})")  # fmt: skip
    bx.axvline(sp["spares"], color="#d62728", ls="--", lw=1, label=f"hold {sp['spares']} spares")
    bx.set_yscale("log")
    bx.set_ylim(1e-4, 1.2)
    bx.set_xlabel("spare GPUs held")
    bx.set_ylabel("chance more GPUs are in repair")
    bx.set_title(f"spares: {count_text(sp['mean_in_repair'])} GPUs in repair on average "
                 f"(turnaround {sp['turnaround_days']:.1f} days)", fontsize=10)  # fmt: skip
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return _png(fig)
    finally:
        plt.close(fig)


def fleet_section(plt: Any, view: dict[str, Any]) -> str:
    """HTML of the fleet reliability view (`gpuwatch.apps.fleet.view.fleet_view`): its plots and what they show."""

    hist = view.get("history")
    parts = [
        "<h2>Fleet reliability</h2>",
        f"<pre>{html.escape(format_view(view, worst_hosts=5))}</pre>",
        "<h3>Failures expected</h3><p class='note'>Probability of each count of failures; dark bars: the interval, "
        "red line: the expected count. The next day sums the live GPUs' calibrated risks when there are any; "
        "the longer window applies the observed rate (with its uncertainty) to the GPU-days ahead.</p>"
        f"<img alt='failures expected' src='data:image/png;base64,{_plot_fleet_forecast(plt, view)}'>",
    ]
    if hist:
        parts.append(
            "<h3>MTBF per GPU</h3><p class='note'>Mean GPU-days between failures with the interval (bar), per "
            f"group; the number of failures beside each name. Dashed: the whole fleet. History: {hist['days']:.1f} "
            f"days, {hist['failures']} failures.</p>"
            f"<img alt='MTBF by group' src='data:image/png;base64,{_plot_fleet_mtbf(plt, view)}'>"
        )
    parts.append(
        "<h3>Jobs and spares</h3><p class='note'>Left: the share of a job's checkpoint intervals that a GPU "
        "failure ends, by job size. Right: the chance that more GPUs are in repair at once than the spares held.</p>"
        f"<img alt='job interruption and spares' src='data:image/png;base64,{_plot_fleet_capacity(plt, view)}'>"
    )
    return "".join(parts)


def render_fleet_report(view: dict[str, Any], path: str | Path, title: str = "gpuwatch fleet report") -> Path:
    """The HTML page of `gpuwatch fleet --report`. Raises ReportUnavailable without matplotlib."""
    plt = _pyplot()
    path = Path(path)
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='note'>Generated {datetime.now(UTC):%Y-%m-%d %H:%M UTC}.</p>{fleet_section(plt, view)}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path


def require_matplotlib() -> None:
    """Raise ReportUnavailable (saying how to install it) now, rather than after a long run."""
    _pyplot()


class RunRecorder:
    """Collects what a report needs while a run goes: a bounded (ts, score, alarm) series per GPU (the GPUs that
    will fail are not known in advance), the latest score and alarm of every GPU that has not failed, and
    remediation events. Not thread-safe: call it from one thread or under the caller's lock."""

    def __init__(self, max_points_per_gpu: int = 240) -> None:
        self.max_points = max_points_per_gpu
        self.series: dict[str, deque[tuple[float, float, bool]]] = {}
        self.latest: dict[str, tuple[float, bool]] = {}
        self.events: list[dict[str, Any]] = []
        self.op = ""
        self.risk_now: dict[tuple[str, int], FleetGpu] = {}  # the newest risk of every GPU, for the fleet view
        self.horizon_s = 3600.0

    def add_risk(self, records: Sequence[Risk]) -> None:
        """Record a batch of decoded risk records (the score, or the risk where a record has none). A failed GPU's
        records are not predictions and are left out."""
        series, latest, cap = self.series, self.latest, self.max_points
        for r in records:
            key = f"{r.host}:{r.gpu_index}"
            self.risk_now[(r.host, r.gpu_index)] = FleetGpu(host=r.host, gpu_index=r.gpu_index, risk=r.risk,
                                                            failed=r.failed, ts=r.ts, stale=False)  # fmt: skip
            self.horizon_s = r.horizon_s
            if r.failed:
                latest.pop(key, None)
                continue
            points = series.get(key)
            if points is None:
                points = series[key] = deque(maxlen=cap)
            score = r.score if isinstance(r.score, float) else r.risk
            points.append((r.ts, score, r.alarm))
            latest[key] = (score, r.alarm)
            self.op = r.op or self.op

    def live_risk(self) -> LiveRisk | None:
        """The newest risk of every GPU seen, as the fleet view takes it (None before any record)."""
        if not self.risk_now:
            return None
        return LiveRisk.from_records(list(self.risk_now.values()), self.horizon_s)

    def add_event(self, event: Remediation) -> None:
        """Record a remediation event (``ts``, ``host``, ``gpu_index``, ``action``, ``risk``)."""
        self.events.append({"ts": event.ts, "host": event.host, "gpu_index": event.gpu_index, "action": event.action,
                            "risk": event.risk})

    def report_data(
        self,
        failures: Sequence[dict[str, Any]],
        *,
        summary: list[tuple[str, str]],
        title: str,
    ) -> ReportData:
        """ReportData for the GPUs in `failures` (simulator labels: host, gpu_index, mode, fail_ts and
        optionally precursor_start_ts); the alarm threshold comes from the records' operating point."""
        failed = []
        for lab in failures:
            key = f"{lab['host']}:{lab['gpu_index']}"
            fail_ts = float(lab["fail_ts"])
            failed.append(
                FailedGpu(
                    host=lab["host"],
                    gpu_index=int(lab["gpu_index"]),
                    mode=lab["mode"],
                    fail_ts=fail_ts,
                    risk=sorted(p for p in self.series.get(key, ()) if p[0] <= fail_ts),
                    remediation=sorted(
                        (e["ts"], e["action"]) for e in self.events if f"{e['host']}:{e['gpu_index']}" == key
                    ),
                    precursor_ts=lab.get("precursor_start_ts"),
                )
            )
        try:
            threshold = OperatingPoint.parse(self.op).threshold
        except ValueError:
            threshold = 0.5
        return ReportData(
            failed=failed,
            fleet_risk=[score for score, _ in self.latest.values()],
            events=list(self.events),
            threshold=threshold,
            op=self.op,
            fleet_alarms=sum(alarm for _, alarm in self.latest.values()),
            summary=summary,
            title=title,
        )
