"""Paired bootstrap confidence intervals of one model's gain over another on the same test examples.

Rows are resampled in pairs (`scipy.stats.bootstrap(..., paired=True)`), so an example hard for both models
does not widen the interval. The gain (ftpipe.metrics.gain) is a mean of per-example scores, for perplexity a
ratio of sums (summed NLL / summed tokens) as reported. The interval is BCa (the distributions are skewed);
the estimate itself when every example differs alike, the percentile one where BCa is otherwise undefined.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ftpipe.metrics import LOWER_IS_BETTER

METHOD = "BCa"


@dataclass(frozen=True)
class Interval:
    """A gain (positive: the challenger is better) and its confidence interval."""

    metric: str
    estimate: float
    low: float
    high: float
    confidence: float
    examples: int
    samples: int
    method: str = METHOD

    def describe(self) -> str:
        """e.g. `+0.0777 rougeL, 95 % CI [+0.0610, +0.0940]`; `perplexity drop` where lower is better."""
        label = f"{self.metric} drop" if self.metric in LOWER_IS_BETTER else self.metric
        return (f"{self.estimate:+.4f} {label}, {self.confidence * 100:g} % CI "
                f"[{self.low:+.4f}, {self.high:+.4f}]")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Interval:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def columns(metric: str) -> tuple[str, ...]:
    """The per-example values the gain of `metric` is computed from."""
    return ("nll", "tokens") if metric == "perplexity" else (metric,)


def _mean_gain(challenger, other, axis=-1):
    import numpy as np

    return np.mean(challenger, axis=axis) - np.mean(other, axis=axis)


def _perplexity_gain(challenger_nll, challenger_tokens, other_nll, other_tokens, axis=-1):
    import numpy as np

    def perplexity(nll, tokens):
        return np.exp(np.sum(nll, axis=axis) / np.sum(tokens, axis=axis))

    return perplexity(other_nll, other_tokens) - perplexity(challenger_nll, challenger_tokens)


def paired_gain(metric: str, challenger: list[dict[str, float]], other: list[dict[str, float]], *,
                samples: int, confidence: float, seed: int) -> Interval | None:
    """The challenger's gain over `other` on `metric` with its paired-bootstrap interval; rows are
    ftpipe.metrics.per_example dicts of the same examples in the same order. None for fewer than two
    examples, where no interval exists."""
    import warnings

    import numpy as np
    from scipy import stats

    if len(challenger) != len(other):
        raise ValueError(f"paired bootstrap: {len(challenger)} challenger rows vs {len(other)} other rows")
    if len(challenger) < 2:
        return None
    keys = columns(metric)
    data = tuple(np.array([row[k] for row in side], dtype=float) for side in (challenger, other) for k in keys)
    statistic = _perplexity_gain if metric in LOWER_IS_BETTER else _mean_gain
    estimate = float(statistic(*data))

    def bootstrap(method: str):
        with warnings.catch_warnings():
            # Degenerate distributions are handled below; scipy warns about them on the way.
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            # The same seed for every call: the same resamples, whichever method reads them.
            return stats.bootstrap(data, statistic, n_resamples=samples, paired=True, vectorized=True,
                                   confidence_level=confidence, method=method, rng=np.random.default_rng(seed))

    result, method = bootstrap(METHOD), METHOD
    if np.ptp(result.bootstrap_distribution) == 0:
        low = high = estimate
    else:
        if np.isnan(result.confidence_interval).any():  # BCa undefined (an infinite bias correction)
            result, method = bootstrap("percentile"), "percentile"
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    return Interval(metric=metric, estimate=estimate, low=low, high=high, confidence=confidence,
                    examples=len(challenger), samples=samples, method=method)
