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
        delta = gain(metric, challenger[metric], other[metric])
        passed = delta >= min_improvement and delta > 0
        ok &= passed
        reasons.append(f"{metric} {challenger[metric]:.4f} vs {name} {other[metric]:.4f} "
                       f"({delta:+.4f}, needs > 0 and >= {min_improvement:g}): {'pass' if passed else 'fail'}")
    if max_forgetting is None:
        reasons.append("forgetting check: off")
    elif GENERAL_KEY not in challenger or GENERAL_KEY not in base:
        ok = False
        reasons.append(f"forgetting check: {GENERAL_KEY} not measured: fail")
    else:
        rise = challenger[GENERAL_KEY] / base[GENERAL_KEY] - 1
        passed = rise <= max_forgetting
        ok &= passed
        reasons.append(f"{GENERAL_KEY} {challenger[GENERAL_KEY]:.4f} vs base {base[GENERAL_KEY]:.4f} "
                       f"({rise:+.1%}, allowed <= {max_forgetting:+.1%}): {'pass' if passed else 'fail'}")
    if leaks:
        ok = False
        reasons.append(f"data leak check found {leaks} leak(s): fail")
    else:
        reasons.append("data leak check: pass")
    return Decision(ok, reasons)
