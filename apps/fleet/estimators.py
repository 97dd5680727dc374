"""Fleet reliability estimators: pure functions of counts, exposures and risks, no I/O.

Rates are failures per GPU-day; exposure is GPU-days a GPU was up (a GPU in repair cannot fail). Intervals are
two-sided at `level` (0.90: the 5th and 95th percentiles). The distributions are computed exactly, without
scipy: Poisson and negative binomial probabilities by their recurrences in log space, the Poisson-binomial by
convolution.

- `rate_interval` / `mtbf`: the exact (Garwood, chi-square) interval of a Poisson rate from k failures in an
  exposure, and the mean time between failures it implies.
- `window_failure_probability`: a GPU's chance to fail within a window from its calibrated risk over the model's
  horizon (the model's knowledge for the horizon, the fleet's base rate beyond it).
- `poisson_binomial_interval`: the number of failures among GPUs with known, different probabilities.
- `predictive_count_interval`: failures in a future exposure at a rate learned from k failures in a past one
  (negative binomial: Poisson with the rate's uncertainty folded in).
- `job_interruption`: the chance that a job on N GPUs loses a GPU within one checkpoint interval.
- `in_repair_pmf` / `spares_needed`: GPUs in repair at once (each GPU in repair a share rate x turnaround /
  (1 + rate x turnaround) of the time), and the smallest stock of spares that covers them with the asked-for
  probability.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DAY_S = 86400.0
LEVEL = 0.90
SMALL_P = 0.01  # probabilities below this go into the Poisson part of a Poisson-binomial (Le Cam's bound)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided interval at `level`."""

    value: float
    lower: float
    upper: float
    level: float = LEVEL

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "lower": self.lower, "upper": self.upper, "level": self.level}


def _check_level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"interval level {level!r} is not between 0 and 1 (e.g. 0.9)")
    return float(level)


def _log_poisson_pmf(mu: float, kmax: int) -> np.ndarray:
    """log P(X = x) for x = 0..kmax, X ~ Poisson(mu), mu > 0."""
    x = np.arange(1, kmax + 1, dtype=np.float64)
    return np.concatenate(([-mu], -mu + np.cumsum(math.log(mu) - np.log(x))))


def poisson_cdf(k: int, mu: float) -> float:
    """P(X <= k) for X ~ Poisson(mu)."""
    if k < 0:
        return 0.0
    if mu <= 0.0:
        return 1.0
    logp = _log_poisson_pmf(mu, int(k))
    top = float(logp.max())
    return min(1.0, math.exp(top) * float(np.exp(logp - top).sum()))


def _tail_bound(mean: float, var: float) -> int:
    """A count above which a distribution of this mean and variance has no mass worth summing (< 1e-12)."""
    return int(math.ceil(mean + 12.0 * math.sqrt(max(var, 0.0)) + 30.0))


def _quantiles(pmf: np.ndarray, qs: Sequence[float]) -> list[int]:
    """Smallest x with P(X <= x) >= q, for each q, from a pmf over 0..len-1."""
    cdf = np.cumsum(pmf)
    return [min(int(np.searchsorted(cdf, q - 1e-12)), len(pmf) - 1) for q in qs]


def poisson_pmf(mu: float) -> np.ndarray:
    """P(X = x) for x = 0.. up to where the tail is negligible, X ~ Poisson(mu)."""
    if mu <= 0.0:
        return np.ones(1)
    return np.exp(_log_poisson_pmf(mu, _tail_bound(mu, mu)))


def poisson_interval(mu: float, level: float = LEVEL) -> tuple[int, int]:
    """The central interval of a Poisson(mu) count: its (1-level)/2 and (1+level)/2 quantiles."""
    a = (1.0 - _check_level(level)) / 2.0
    lo, hi = _quantiles(poisson_pmf(mu), (a, 1.0 - a))
    return lo, hi


def _solve_mu(target: float, k: int, upper: bool) -> float:
    """mu with P(X <= k; mu) = target (upper: the interval's top) or P(X >= k; mu) = target (its bottom)."""

    def f(mu: float) -> float:  # decreasing in mu for the upper bound, increasing for the lower one
        return poisson_cdf(k, mu) - target if upper else (1.0 - poisson_cdf(k - 1, mu)) - target

    lo, hi = 0.0, max(10.0, 2.0 * k + 10.0)
    while (f(hi) > 0) if upper else (f(hi) < 0):
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (f(mid) > 0) if upper else (f(mid) < 0):
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(hi, 1e-300):
            break
    return 0.5 * (lo + hi)


def count_mean_interval(k: int, level: float = LEVEL) -> tuple[float, float]:
    """The exact (Garwood) interval of a Poisson mean from one observed count k: equal to the chi-square form
    chi2((1-level)/2, 2k)/2 .. chi2((1+level)/2, 2k+2)/2; the lower bound is 0 for k = 0."""
    if k < 0:
        raise ValueError(f"a count of failures cannot be negative ({k})")
    a = (1.0 - _check_level(level)) / 2.0
    lower = 0.0 if k == 0 else _solve_mu(a, k, upper=False)
    return lower, _solve_mu(a, k, upper=True)


def rate_interval(failures: int, exposure_gpu_days: float, level: float = LEVEL) -> Estimate:
    """Failures per GPU-day from `failures` in `exposure_gpu_days` (> 0), with its exact interval."""
    if exposure_gpu_days <= 0:
        raise ValueError(f"exposure must be positive GPU-days, not {exposure_gpu_days!r}")
    lo, hi = count_mean_interval(failures, level)
    return Estimate(failures / exposure_gpu_days, lo / exposure_gpu_days, hi / exposure_gpu_days, level)


def mtbf(failures: int, exposure_gpu_days: float, level: float = LEVEL) -> Estimate:
    """Mean GPU-days between failures (exposure / failures), with the interval the rate's interval implies;
    infinite (value and upper bound) when nothing failed."""
    rate = rate_interval(failures, exposure_gpu_days, level)
    inv = lambda r: math.inf if r <= 0 else 1.0 / r  # noqa: E731
    return Estimate(inv(rate.value), inv(rate.upper), inv(rate.lower), level)


def window_failure_probability(
    risk: np.ndarray, horizon_s: float, window_s: float, base_rate_per_gpu_day: float
) -> np.ndarray:
    """Per GPU, the probability of failing within `window_s`, from `risk` (probability within `horizon_s`).

    Within the horizon the risk holds at a constant hazard (1 - (1 - risk)^(window / horizon)). Beyond it the
    model knows nothing more, so the rest of the window runs at the fleet's base rate: compounding an alarm's
    risk over a day would count a precursor that ends in one failure as many.
    """
    r = np.clip(np.asarray(risk, dtype=np.float64), 0.0, 1.0)
    if horizon_s <= 0 or window_s < 0:
        raise ValueError(f"horizon {horizon_s!r} s must be positive and window {window_s!r} s not negative")
    if window_s <= horizon_s:
        return 1.0 - (1.0 - r) ** (window_s / horizon_s)
    survive_rest = math.exp(-base_rate_per_gpu_day * (window_s - horizon_s) / DAY_S)
    return 1.0 - (1.0 - r) * survive_rest


def poisson_binomial_pmf(p: np.ndarray) -> np.ndarray:
    """pmf of the number of successes among independent trials with probabilities `p`.

    Trials with p < SMALL_P are summed into one Poisson (Le Cam: the error in total variation is at most
    2 * sum(p^2) over them, 2e-4 for 1,000,000 GPUs at a risk of 1e-5); the rest are convolved exactly.
    """
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    small, big = p[p < SMALL_P], p[p >= SMALL_P]
    pmf = poisson_pmf(float(small.sum()))
    if big.size:
        exact = np.zeros(big.size + 1)
        exact[0] = 1.0
        for i, q in enumerate(big.tolist(), start=1):  # a few GPUs in alarm, not the fleet
            exact[1 : i + 1] = exact[1 : i + 1] * (1.0 - q) + exact[:i] * q
            exact[0] *= 1.0 - q
        pmf = np.convolve(pmf, exact)
    return pmf / pmf.sum()


def poisson_binomial_interval(p: np.ndarray, level: float = LEVEL) -> Estimate:
    """Expected number of failures (sum of p) and the central interval of the count."""
    a = (1.0 - _check_level(level)) / 2.0
    pmf = poisson_binomial_pmf(p)
    lo, hi = _quantiles(pmf, (a, 1.0 - a))
    return Estimate(float(np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0).sum()), lo, hi, level)


def predictive_pmf(failures: int, exposure_gpu_days: float, future_gpu_days: float) -> np.ndarray:
    """pmf of failures in `future_gpu_days` at a rate known from `failures` in `exposure_gpu_days`.

    The rate's uncertainty is its posterior under Jeffreys' prior, Gamma(failures + 1/2, exposure); a Poisson
    count over that is negative binomial with shape failures + 1/2 and success probability
    exposure / (exposure + future).
    """
    if exposure_gpu_days <= 0 or future_gpu_days < 0:
        raise ValueError(
            f"exposure {exposure_gpu_days!r} must be positive, future {future_gpu_days!r} not negative"
        )
    if future_gpu_days == 0:
        return np.ones(1)
    shape = failures + 0.5
    p = exposure_gpu_days / (exposure_gpu_days + future_gpu_days)
    mean = shape * (1.0 - p) / p
    x = np.arange(1, _tail_bound(mean, mean / p) + 1, dtype=np.float64)
    logpmf = np.concatenate(([shape * math.log(p)], shape * math.log(p) + np.cumsum(
        np.log((shape + x - 1.0) / x) + math.log1p(-p)
    )))  # fmt: skip
    pmf = np.exp(logpmf)
    return pmf / pmf.sum()


def predictive_count_interval(
    failures: int, exposure_gpu_days: float, future_gpu_days: float, level: float = LEVEL
) -> Estimate:
    """Failures expected in `future_gpu_days` at the observed rate (failures / exposure x future), with the
    central interval of the predictive (negative binomial) count, which includes the rate's uncertainty."""
    a = (1.0 - _check_level(level)) / 2.0
    lo, hi = _quantiles(predictive_pmf(failures, exposure_gpu_days, future_gpu_days), (a, 1.0 - a))
    return Estimate(failures / exposure_gpu_days * future_gpu_days, lo, hi, level)


def job_interruption(job_gpus: int, interval_s: float, rate: Estimate) -> Estimate:
    """Probability that a job on `job_gpus` GPUs loses one within one checkpoint interval of `interval_s`, at
    `rate` (failures per GPU-day, with its interval): the share of its checkpoint intervals that end in a
    failure instead of a checkpoint."""
    if job_gpus < 1 or interval_s <= 0:
        raise ValueError(
            f"a job needs at least 1 GPU ({job_gpus}) and a positive checkpoint interval ({interval_s})"
        )
    f = lambda r: -math.expm1(-job_gpus * r * interval_s / DAY_S)  # noqa: E731
    return Estimate(f(rate.value), f(rate.lower), f(rate.upper), rate.level)


def in_repair_pmf(
    gpus: int, turnaround_days: float, failures: int | None, exposure_gpu_days: float,
    rate_per_gpu_day: float | None = None,
) -> tuple[float, np.ndarray]:  # fmt: skip
    """(mean, pmf) of the GPUs in repair at once among `gpus` whose repairs take `turnaround_days` on average.

    Each GPU alternates between up (failing at the rate) and in repair, so in the long run it is in repair a share
    rate x turnaround / (1 + rate x turnaround) of the time, whatever the repair-time distribution. The count is
    taken as Poisson with that mean (the binomial's variance is smaller by that share: the stock errs on the safe
    side). With `failures` in `exposure_gpu_days` observed the rate is uncertain and the count is the negative
    binomial of `predictive_pmf`; with `failures` None, `rate_per_gpu_day` is taken as known.
    """
    if gpus < 0 or turnaround_days < 0:
        raise ValueError(f"GPUs ({gpus}) and turnaround ({turnaround_days} days) cannot be negative")
    rate = float(rate_per_gpu_day or 0.0) if failures is None else failures / exposure_gpu_days
    busy = gpus * turnaround_days / (1.0 + rate * turnaround_days)  # GPU-days at risk per turnaround
    if failures is None:
        return rate * busy, poisson_pmf(rate * busy)
    return rate * busy, predictive_pmf(failures, exposure_gpu_days, busy)


def spares_needed(pmf: np.ndarray, service_level: float) -> int:
    """The smallest stock of spare GPUs that covers every GPU in repair with probability `service_level`, from
    the pmf of the GPUs in repair at once (`in_repair_pmf`)."""
    if not 0.0 < service_level < 1.0:
        raise ValueError(f"service level {service_level!r} is not between 0 and 1 (e.g. 0.95)")
    return _quantiles(pmf, (service_level,))[0]
