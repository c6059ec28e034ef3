"""Which split a row belongs to, decided by the row alone so that growing the data never moves it.

Each row draws a number in [0, 1) from a seeded hash of its normalized prompt (system prompts
aside): below `test_fraction` it belongs to test, below `test_fraction + val_fraction` to val, else
to train. Adding rows adds draws and changes none. Rows that must stay together (a split group:
shared prompts, near-duplicates, a shared long answer) take one split for the whole group, train
first, then val, then test: a row whose own draw says train is trained on in every run, whatever
joins its group later, so no row that was ever trained on moves into an evaluation split.
"""

from __future__ import annotations

import hashlib
from typing import Any

ORDER = ("train", "val", "test")  # a group takes the first of these that any of its rows draws


def prompt_key(messages: list[dict[str, str]]) -> str:
    """The normalized text of a prompt's user and assistant turns (system prompts aside)."""
    from ftpipe.cleaning import norm_key

    return norm_key("\n".join(m["content"] for m in messages if m["role"] != "system"))


def draw(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(u: float, *, test_fraction: float, val_fraction: float) -> str:
    """The split a draw names."""
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def hashed_split(key: str, *, seed: int, test_fraction: float, val_fraction: float) -> str:
    return split_of(draw(key, seed), test_fraction=test_fraction, val_fraction=val_fraction)


def row_draw(record: dict[str, Any], seed: int) -> float:
    """A row's own draw (its prompt: every turn but the last)."""
    return draw(prompt_key(record["messages"][:-1]), seed)


def group_split(row_splits: list[str]) -> str:
    return next(name for name in ORDER if name in row_splits)


def prompt_digest(messages: list[dict[str, str]]) -> str:
    """A short digest of a conversation's prompt (every turn but the last)."""
    return hashlib.sha256(prompt_key(messages[:-1]).encode()).hexdigest()[:16]


def prompt_digests(rows: list[dict[str, Any]]) -> list[str]:
    """The rows' prompt digests (sorted, unique): what a registered version logs of the rows it
    trained on, so that a later run can leave those rows out when it scores the version again."""
    return sorted({prompt_digest(r["messages"]) for r in rows})
