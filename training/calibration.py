"""A monotone calibration map fitted on validation records: isotonic regression, interpolated.

Platt scaling (a sigmoid of the logit) is fitted in training; its two parameters cannot follow the upper
range, where the model's scores and the observed failure rates part (a score of 0.5 failing 0.7 of the time).
`fit_map` pools the records into score bins, runs pool-adjacent-violators on the bins, and returns knots
between which `np.interp` draws straight lines: strictly increasing, so the ranking (and so every operating
point's choice) is unchanged, only what the score means.
"""

from __future__ import annotations

import numpy as np


def _pav(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Pool-adjacent-violators: block means (non-decreasing), block weights, and each block's first bin."""
    means, weights, starts = [], [], []
    for i, (yi, wi) in enumerate(zip(y.tolist(), w.tolist())):
        means.append(yi)
        weights.append(wi)
        starts.append(i)
        while len(means) > 1 and means[-2] >= means[-1]:
            m2, w2 = means.pop(), weights.pop()
            starts.pop()
            total = weights[-1] + w2
            means[-1] = (means[-1] * weights[-1] + m2 * w2) / total
            weights[-1] = total
    return np.asarray(means), np.asarray(weights), starts


def fit_map(score: np.ndarray, y: np.ndarray, bins: int = 400, min_count: int = 200) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(xs, ys) knots of a strictly increasing map from score to observed failure rate. Bins hold equal numbers of
    records (at least `min_count`), so the upper range, where few records are, gets bins of its own."""
    score = np.asarray(score, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if len(score) < 2 * min_count or y.sum() == 0:
        raise ValueError(f"too few records ({len(score)}) or no failures to fit a calibration map on")
    order = np.argsort(score, kind="stable")
    s, t = score[order], y[order]
    n_bins = max(2, min(bins, len(s) // min_count))
    edges = np.linspace(0, len(s), n_bins + 1).astype(np.int64)
    # Finer bins where scores are high: the bulk of records sit near 0 and a quantile grid would spend every bin there.
    high = np.searchsorted(s, 0.05)
    if high < len(s) - 2 * min_count:
        upper = np.linspace(high, len(s), max(2, min(bins // 2, (len(s) - high) // min_count)) + 1).astype(np.int64)
        edges = np.unique(np.r_[edges[edges < high], upper])
    bx = np.array([s[a:b].mean() for a, b in zip(edges[:-1], edges[1:]) if b > a])
    by = np.array([t[a:b].mean() for a, b in zip(edges[:-1], edges[1:]) if b > a])
    bw = np.array([b - a for a, b in zip(edges[:-1], edges[1:]) if b > a], dtype=np.float64)
    means, weights, starts = _pav(by, bw)
    xs = [float(np.average(bx[a:b], weights=bw[a:b])) for a, b in zip(starts, [*starts[1:], len(bx)])]
    ys = means.tolist()
    # Anchor the ends and make both strictly increasing (np.interp needs increasing xs; ties would flatten ranks).
    xs = [0.0, *xs, 1.0]
    ys = [0.0, *ys, 1.0]
    eps = 1e-9
    for i in range(1, len(xs)):
        xs[i] = max(xs[i], xs[i - 1] + eps)
        ys[i] = max(ys[i], ys[i - 1] + eps)
    # ... within [0, 1]: a top block that always failed (rate 1.0) pushed the 1.0 anchor past 1, and a risk record
    # scored above 1 is refused by its codec.
    ys[-1] = 1.0
    for i in range(len(ys) - 2, 0, -1):
        ys[i] = min(ys[i], ys[i + 1] - eps)
    return tuple(xs), tuple(ys)
