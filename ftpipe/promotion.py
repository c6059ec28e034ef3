"""The promotion gate: does a newly registered challenger replace the champion?

Promoted when, on the primary metric, the lower bound of the paired-bootstrap interval (ftpipe/significance.py)
of its gain over the base model and over the champion (scored again on the same test rows) is above
`min_improvement`; its general-text perplexity is at most `max_forgetting` above the base's; the leak check
passed; and a continual fine-tune is at most `max_old_task_drop` worse than its parent on the parent's test
split. Every check keeps its reason, pass or fail, so the decision explains itself in MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ftpipe.metrics import GENERAL_KEY
from ftpipe.significance import Interval, columns, paired_gain

if TYPE_CHECKING:
    from ftpipe.schemas import OldTask, RegistrationReport

ROUNDING = 1e-6  # a gain whose lower bound is within this share of the metric's size is not counted


@dataclass(frozen=True)
class Scores:
    """One candidate on the test split: ftpipe.metrics.per_example rows (the same examples, in the
    same order, for every candidate) and its metric block (general_perplexity for the forgetting check)."""

    examples: list[dict[str, float]]
    metrics: dict[str, float] = field(default_factory=dict)
    # The challenger's examples these ones pair with (their indices); None: all of them. The champion
    # is scored again without the test rows it trained on.
    rows: tuple[int, ...] | None = None


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    # "base" and, when there is a champion, "champion": the gain's interval, None where it could not be formed.
    intervals: dict[str, Interval | None] = field(default_factory=dict)

    def summary(self) -> str:
        return ("promoted to champion: " if self.promote else "kept as challenger: ") + "; ".join(self.reasons)


def decide(
    *,
    metric: str,
    min_improvement: float,
    challenger: Scores,
    base: Scores,
    champion: Scores | None,
    champion_version: str | None,
    leaks: int,
    max_forgetting: float | None = None,
    old_task: OldTask | None = None,
    max_old_task_drop: float | None = None,
    parent_version: str | None = None,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    champion_note: str = "",
) -> Decision:
    """`champion_note` qualifies the champion's name in its reason (how it was scored again)."""
    ok, reasons, intervals = True, [], {}
    for key, name, other in (("base", "base", base), ("champion", f"champion v{champion_version}{champion_note}",
                                                       champion)):
        if other is None:
            reasons.append("no champion yet")
            continue
        passed, reason, intervals[key] = _beats(metric, min_improvement, challenger, name, other,
                                                samples=samples, confidence=confidence, seed=seed)
        ok &= passed
        reasons.append(reason)
    ok &= _forgetting(reasons, challenger.metrics, base.metrics, max_forgetting)
    if old_task is not None:
        ok &= _old_task(reasons, metric, old_task, max_old_task_drop)
    elif parent_version is not None:  # trained from a champion whose run logged no test split
        reasons.append(f"old-task check: parent v{parent_version}'s run holds no test split: not checked")
    if leaks:
        ok = False
        reasons.append(f"data leak check: {leaks} leak(s) left in the training data: fail")
    else:
        reasons.append("data leak check: pass")
    return Decision(ok, reasons, intervals)


def _beats(metric: str, min_improvement: float, challenger: Scores, name: str, other: Scores, *,
           samples: int, confidence: float, seed: int) -> tuple[bool, str, Interval | None]:
    """Whether the challenger's gain over `other` on `metric` is surely above `min_improvement`,
    and why. A side without per-example scores of the metric (reports of an older evaluate) cannot
    be compared, so no promotion on trust."""
    if other.rows is not None:
        challenger = Scores([challenger.examples[i] for i in other.rows], challenger.metrics)
    for side, scores in (("challenger", challenger), (name, other)):
        if not scores.examples or any(k not in row for row in scores.examples for k in columns(metric)):
            return False, f"{side} has no per-example {metric} scores: cannot compare", None
    if len(challenger.examples) != len(other.examples):
        return False, (f"{name} scored on {len(other.examples)} test examples, the challenger on "
                       f"{len(challenger.examples)}: cannot compare"), None
    interval = paired_gain(metric, challenger.examples, other.examples, samples=samples, confidence=confidence,
                           seed=seed)
    if interval is None:
        return False, f"{metric} over {name}: one test example gives no interval: cannot compare", None
    passed = interval.low > min_improvement and interval.low > 0
    # A gain within rounding of the metric's own size is no gain: the champion fine-tuned at a learning
    # rate too small to move it scores a few fp32 ulps better on every example, an interval above 0.
    size = max(abs(other.metrics.get(metric) or 0.0), abs(challenger.metrics.get(metric) or 0.0))
    rounding = passed and interval.low <= ROUNDING * size
    note = f" (a gain within {ROUNDING:g} of the metric's size is rounding)" if rounding else ""
    passed = passed and not rounding
    return passed, (f"{interval.describe()} over {name} (paired bootstrap, {interval.examples} examples; "
                    f"lower bound must be > {min_improvement:g}): {'pass' if passed else 'fail'}{note}"), interval


def _forgetting(reasons: list[str], challenger: dict[str, float], base: dict[str, float],
                max_forgetting: float | None) -> bool:
    """Append the forgetting check's reason; whether it passed (or is off)."""
    if max_forgetting is None:
        reasons.append("forgetting check: off")
        return True
    if GENERAL_KEY not in challenger or GENERAL_KEY not in base:
        reasons.append(f"forgetting check: {GENERAL_KEY} not measured: fail")
        return False
    rise = challenger[GENERAL_KEY] / base[GENERAL_KEY] - 1
    passed = rise <= max_forgetting
    reasons.append(f"{GENERAL_KEY} {challenger[GENERAL_KEY]:.4f} vs base {base[GENERAL_KEY]:.4f} "
                   f"({rise:+.1%}, allowed <= {max_forgetting:+.1%}): {'pass' if passed else 'fail'}")
    return passed


def old_task_drop(metric: str, parent: float, challenger: float) -> float:
    """Relative loss on the old task: how much worse the challenger is than the parent (perplexity:
    its relative rise; a score: its relative fall, 0 when the parent scored 0, as nothing can fall)."""
    if metric == "perplexity":
        return challenger / parent - 1
    return (parent - challenger) / parent if parent > 0 else 0.0


def _old_task(reasons: list[str], metric: str, old: OldTask, max_drop: float | None) -> bool:
    """Append the old-task check's reason (continual fine-tuning); whether it passed (or is off)."""
    if max_drop is None:
        reasons.append("old-task check: off")
        return True
    if not old.examples:
        reasons.append(f"old-task check: all {old.left_out_seen} rows of {old.parent}'s test split are in the "
                       "current train or val split: not checked")
        return True
    if metric not in old.parent_scores or metric not in old.finetuned:
        reasons.append(f"old-task check: {metric} not measured on {old.parent}'s test split: fail")
        return False
    drop = old_task_drop(metric, old.parent_scores[metric], old.finetuned[metric])
    passed = drop <= max_drop
    reasons.append(f"old task ({old.parent}'s test split, {old.examples} examples): {metric} "
                   f"{old.finetuned[metric]:.4f} vs parent {old.parent_scores[metric]:.4f} ({drop:+.1%} worse, "
                   f"allowed <= {max_drop:+.1%}): {'pass' if passed else 'fail'}")
    return passed


def gate_line(registration: RegistrationReport) -> str:
    """reports/registration.json's gate in one line, e.g.
    `+0.0777 rougeL, 95 % CI [+0.0610, +0.0940] over base; no champion yet: promoted`."""
    promotion, champion = registration.promotion, registration.champion
    parts = []
    for name, interval in promotion.intervals.items():
        label = f"champion v{champion.version}" if name == "champion" and champion else name
        parts.append(f"{Interval.from_dict(interval).describe() if interval else 'no interval'} over {label}")
    if parts and champion is None:
        parts.append("no champion yet")
    verdict = "promoted" if promotion.promote else "kept as challenger"
    return f"{'; '.join(parts)}: {verdict}" if parts else verdict
