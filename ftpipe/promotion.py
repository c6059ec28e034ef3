"""The promotion gate: does a newly registered challenger replace the champion?

A challenger is promoted when, on the primary metric, it beats the base model and the current
champion (if any) by at least `min_improvement`, and the data passed the leak check. Every
reason for a refusal is kept, so the decision explains itself in MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftpipe.metrics import gain


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
    if leaks:
        ok = False
        reasons.append(f"data leak check found {leaks} leak(s): fail")
    else:
        reasons.append("data leak check: pass")
    return Decision(ok, reasons)
