"""Train/eval leak checks: every evaluation row against the whole training split, by kind, strongest first:
exact_prompt / exact_pair; normalized_prompt / normalized_pair (case, punctuation, whitespace ignored);
near_prompt / near_pair (MinHash-confirmed Jaccard >= threshold); typo_pair (the same response, prompts one
typing slip or inflection apart: ftpipe.typos.typo_close); same_response (the same response of at least
`min_response_words` words, whatever the prompts); ngram (a shared run of `n` words, 13 by default).
A row is reported once, under the strongest kind that matched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftpipe.cleaning import NearDuplicates, ngrams, norm_key
from ftpipe.typos import TYPO_MAX_WORDS, typo_key, typo_pairs

KINDS = ("exact_pair", "exact_prompt", "normalized_pair", "normalized_prompt", "near_pair", "near_prompt",
         "typo_pair", "same_response", "ngram")


def prompt_of(record: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in record["messages"][:-1])


def text_of(record: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in record["messages"])


def response_key(record: dict[str, Any], min_words: int) -> str | None:
    """The normalized response when it has at least `min_words` words: what `same_response` compares."""
    key = norm_key(record["messages"][-1]["content"])
    return key if len(key.split()) >= min_words else None


@dataclass(frozen=True)
class Leak:
    kind: str
    eval_set: str
    eval_id: str
    train_id: str
    eval_text: str
    train_text: str

    def short(self) -> str:
        return f"{self.kind}: {self.eval_set}/{self.eval_id} ~ train/{self.train_id} {self.eval_text[:60]!r}"


def find_leaks(train: list[dict[str, Any]], eval_sets: dict[str, list[dict[str, Any]]], *, threshold: float,
               ngram: int, min_response_words: int = 8, near: NearDuplicates | None = None) -> list[Leak]:
    """Every evaluation row (of each named set) that leaks from `train`, under its strongest kind.

    `near` is the near-duplicate index to share with deduplication and splitting (built here if None).
    """
    if not train:
        return []
    near = near or NearDuplicates(threshold)
    by_id = {r["id"]: r for r in train}
    tables = {
        "exact_pair": {text_of(r): r["id"] for r in train},
        "exact_prompt": {prompt_of(r): r["id"] for r in train},
        "normalized_pair": {norm_key(text_of(r)): r["id"] for r in train},
        "normalized_prompt": {norm_key(prompt_of(r)): r["id"] for r in train},
        "same_response": {key: r["id"] for r in train if (key := response_key(r, min_response_words))},
    }
    grams: dict[int, str] = {}
    for r in train:
        for g in ngrams(text_of(r), ngram):
            grams.setdefault(g, r["id"])

    # All evaluation sets in one near-duplicate search: each search costs a pass over all of train.
    named = [(name, r) for name, rows in eval_sets.items() for r in rows]
    texts, prompts = [text_of(r) for _, r in named], [prompt_of(r) for _, r in named]
    near_texts = _near_ids(near, texts, tables["exact_pair"])
    near_prompts = _near_ids(near, prompts, tables["exact_prompt"])
    typos = _typo_ids(train, [r for _, r in named])
    leaks = []
    for (name, record), text, prompt, hits_text, hits_prompt, typo in zip(named, texts, prompts, near_texts,
                                                                          near_prompts, typos):
        found = _strongest(tables, grams, ngram, text, prompt, response_key(record, min_response_words), hits_text,
                           hits_prompt, typo)
        if found:
            kind, train_id = found
            leaks.append(Leak(kind, name, record["id"], train_id, text, text_of(by_id[train_id])))
    return leaks


def _near_ids(near: NearDuplicates, queries: list[str], table: dict[str, str]) -> list[list[str]]:
    """Per query, the train ids whose text (the table's keys) is a near-duplicate of it."""
    ids = list(table.values())
    return [[ids[j] for j in hits] for hits in near.matches(queries, list(table))]


def _typo_ids(train: list[dict[str, Any]], queries: list[dict[str, Any]]) -> list[str | None]:
    """Per query row, the smallest id of the training rows it is a `typo_pair` of (None if none)."""
    owners: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for r in train:
        owners.setdefault(typo_key(r), []).append(r["id"])
    asked = [typo_key(r) for r in queries]
    responses = {key[0] for key in asked}
    # Only responses on both sides can pair; a query equal to a training prompt is normalized_prompt.
    items = [key for key in owners if key[0] in responses and len(key[1]) <= TYPO_MAX_WORDS]
    is_train = len(items)
    known = {key[0] for key in items}
    items += dict.fromkeys(k for k in asked if k[0] in known and k not in owners and len(k[1]) <= TYPO_MAX_WORDS)
    best: dict[tuple[str, tuple[str, ...]], str] = {}
    for a, b in typo_pairs(items, lambda a, b: a < is_train <= b):
        train_id = min(owners[items[a]])
        best[items[b]] = min(best.get(items[b], train_id), train_id)
    return [best.get(key) for key in asked]


def _strongest(tables, grams, ngram, text, prompt, response, hits_text, hits_prompt, typo) -> tuple[str, str] | None:
    for kind, key in (("exact_pair", text), ("exact_prompt", prompt),
                      ("normalized_pair", norm_key(text)), ("normalized_prompt", norm_key(prompt))):
        if key in tables[kind]:
            return kind, tables[kind][key]
    for kind, hits in (("near_pair", hits_text), ("near_prompt", hits_prompt)):
        if hits:
            return kind, min(hits)
    if typo is not None:
        return "typo_pair", typo
    if response in tables["same_response"]:
        return "same_response", tables["same_response"][response]
    for g in ngrams(text, ngram):
        if g in grams:
            return "ngram", grams[g]
    return None


def count_by_kind(leaks: list[Leak]) -> dict[str, int]:
    return {kind: sum(1 for leak in leaks if leak.kind == kind) for kind in KINDS}
