"""Paired bootstrap confidence intervals of one model's gain over another on the same test examples.

Both models answer the same test prompts, so the examples are resampled in pairs
(`scipy.stats.bootstrap(..., paired=True)`): every resample draws n row indices with replacement and
recomputes the statistic on those rows of both sides. An example that is hard for both models then
moves both means together and does not widen the interval of their difference.

The statistic is the gain (positive: the challenger is better, ftpipe.metrics.gain): the mean of the
per-example scores for BLEU (sentence-level) and ROUGE, and for perplexity, where lower is better,
other - challenger, each side exp(summed NLL / summed tokens) of the resampled rows, the same ratio of
sums as the reported perplexity (a mean of per-example perplexities would weigh a 2-token reference
like a 40-token one).

Method: BCa (bias-corrected and accelerated, scipy's default) rather than percentile: ROUGE
differences are bounded and skewed (many rows score 0 for both models) and the perplexity gain is a
nonlinear ratio statistic, whose bootstrap distributions are biased and skewed; BCa corrects both
(second-order accurate, the percentile interval is first-order) at the cost of a jackknife of n
statistic evaluations, nothing at a few hundred rows. BCa is undefined when the bootstrap
distribution is degenerate (every example differs by the same amount: the same model scored twice):
then every resample gives the estimate, and so does the interval. Where it is undefined otherwise
(an infinite bias correction) the interval is the percentile one of the same resamples.
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
