"""The promotion gate: does a newly registered challenger replace the champion?

A challenger is promoted when, on the primary metric, it beats the base model and the current
champion (if any) by at least `min_improvement`, it did not forget general language (its
general-text perplexity is at most `max_forgetting` above the base model's), and the data passed
the leak check. Every check's reason is kept, pass or fail, so the decision explains itself in MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftpipe.metrics import GENERAL_KEY, gain


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return ("promoted to champion: " if self.promote else "kept as challenger: ") + "; ".join(self.reasons)


def decide(
    *,
    metric: str,
    min_improvement: float,
    challenger: dict[str, float],
    base: dict[str, float],
    champion: dict[str, float] | None,
    champion_version: str | None,
    leaks: int,
    max_forgetting: float | None = None,
) -> Decision:
    ok, reasons = True, []
    for name, other in (("base", base), (f"champion v{champion_version}", champion)):
        if other is None:
            reasons.append("no champion yet")
            continue
        passed, reason = _beats(metric, min_improvement, challenger, name, other)
        ok &= passed
        reasons.append(reason)
    ok &= _forgetting(reasons, challenger, base, max_forgetting)
    if leaks:
        ok = False
        reasons.append(f"data leak check found {leaks} leak(s): fail")
    else:
        reasons.append("data leak check: pass")
    return Decision(ok, reasons)


def _beats(metric: str, min_improvement: float, challenger: dict[str, float], name: str,
           other: dict[str, float]) -> tuple[bool, str]:
    """Whether the challenger beats `other` on `metric`, and why. A side without the metric (a
    champion logged before the metric existed) cannot be compared, so no promotion on trust."""
    for side, values in (("challenger", challenger), (name, other)):
        if metric not in values:
            return False, f"{side} has no {metric} logged: cannot compare"
    delta = gain(metric, challenger[metric], other[metric])
    passed = delta >= min_improvement and delta > 0
    return passed, (f"{metric} {challenger[metric]:.4f} vs {name} {other[metric]:.4f} "
                    f"({delta:+.4f}, needs > 0 and >= {min_improvement:g}): {'pass' if passed else 'fail'}")


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
