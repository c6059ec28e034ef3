"""An example scorer (add `scorers.examples:keyword_recall` to evaluate.metrics to use it)."""

from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9']{3,}")


def keyword_recall(reply: str, reference: str) -> float:
    """Share of the reference's distinct words (3+ letters, case folded) that the reply uses: whether
    a reply carries the facts of its reference, whatever its wording around them."""
    wanted = set(_WORD.findall(reference.lower()))
    if not wanted:
        return 1.0  # nothing to recall
    return len(wanted & set(_WORD.findall(reply.lower()))) / len(wanted)
