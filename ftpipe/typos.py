"""Typo-level copies: two rows with the same normalized answer whose prompts differ by one typing
slip or inflection ("doess", "nouns"), which word-bigram Jaccard misses on short prompts. What the
leak check's `typo_pair` kind (ftpipe.leaks) and the split's groups (stages/prepare_data.py) compare.
"""

from __future__ import annotations

import unicodedata
from array import array
from typing import Any

import numpy as np

from ftpipe.cleaning import norm_key, words


def _prompt(record: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in record["messages"][:-1])


# A one-character edit that makes another real word ("cat"/"bat", "he"/"she", "mole"/"mule") cannot be
# told from a typing slip without a dictionary, and templates differ exactly in such slot words, so
# `typo_close` accepts only the edits that look like slips or inflections and rejects the rest.
# Longer prompts are left to near_*: a text with one word edited keeps Jaccard >= 0.8 from ~14 words,
# >= 0.9 from ~29 and >= 0.95 from ~59; the cap bounds the cost on data whose rows share a few answers.
TYPO_MAX_WORDS = 64
TYPO_MIN_LETTERS = 4  # a slip inside a shorter word too often makes another word (the/then, car/cat)
TYPO_ANY_LETTERS = 6  # from this length any one-letter edit counts; below it, only slips (see word_slip)
# Plural and third-person endings (suffix, replacement), with a stem of 3+ letters: noun/nouns, box/boxes,
# city/cities. Other inflections (walk/walked/walking) change more than a slip and are common slot fills.
INFLECTIONS = (("s", ""), ("es", ""), ("ies", "y"))
_BUCKET = 16  # a bucket with more prompts than this is searched by deletion variants, not pair by pair
_KEYS = {c: (x + shift, r)  # QWERTY positions, rows staggered as on a keyboard
         for r, (line, shift) in enumerate(zip(("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm"), (0, .5, .75, 1.25)))
         for x, c in enumerate(line)}


def typo_key(record: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(normalized response, prompt words): what `typo_pair` compares."""
    return norm_key(record["messages"][-1]["content"]), words(_prompt(record))


def typo_close(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two different prompts (`words` tuples) differ by one typing slip or inflection only.

    Past their common first and last words, what is left must be one word against one word that
    `word_slip` accepts; or one word against two that spell it ("dont" / "don t", "cannot" /
    "can not"); or a dropped one-letter word ("a", "i").
    """
    if a == b:
        return False
    m = min(len(a), len(b))
    p = 0
    while p < m and a[p] == b[p]:
        p += 1
    s = 0
    while s < m - p and a[-1 - s] == b[-1 - s]:
        s += 1
    x, y = sorted((a[p:len(a) - s], b[p:len(b) - s]), key=len)
    if len(x) == len(y) == 1:
        return word_slip(x[0], y[0])
    if (len(x), len(y)) == (1, 2):
        return x[0] == "".join(y)
    return (len(x), len(y)) == (0, 1) and len(y[0]) == 1 and y[0].isalpha()


def word_slip(x: str, y: str) -> bool:
    """Whether two different words are one inflection apart (noun/nouns, box/boxes, study/studies)
    or one typing slip apart past the first letter. Between words of 4+ letters a slip is a letter
    doubled or dropped (doess, helo), a letter of a neighbouring key added or put in place of another
    (whsat, whst), an accent (café/cafe) or two neighbours swapped (waht); from 6 letters (the longer
    word) any one letter added, dropped or replaced (becuse, animsls). Edits that make another word
    (he/she, cat/bat, mole/mule, were/where) are what template slots differ by, so the first letter
    must match, short words must match but for an inflection, and a replacement or addition in a word
    of 4-5 letters must look like a slip. Words with digits never match: numbers are slot values.
    """
    if x == y or x[:1] != y[:1] or not (x + y).isalpha():
        return False
    if _stems(x) & _stems(y):
        return True
    x, y = sorted((x, y), key=len)
    if len(x) < TYPO_MIN_LETTERS or len(y) - len(x) > 1:
        return False
    k = next((i for i, (c, d) in enumerate(zip(x, y)) if c != d), len(x))
    if len(x) < len(y):  # y[k] added (or dropped from y): a double, a neighbouring key, or in a long word
        return x[k:] == y[k + 1:] and (len(y) >= TYPO_ANY_LETTERS or any(
            y[k] == c or _neighbours(y[k], c) for c in y[k - 1:k] + y[k + 1:k + 2]))
    if x[k + 1:] == y[k + 1:]:  # one letter replaced
        return len(y) >= TYPO_ANY_LETTERS or _neighbours(x[k], y[k])
    return x[k + 2:] == y[k + 2:] and x[k] == y[k + 1] and x[k + 1] == y[k]  # two neighbours swapped


def _stems(word: str) -> set[str]:
    return {word} | {word[:-len(suffix)] + base for suffix, base in INFLECTIONS
                     if word.endswith(suffix) and len(word) - len(suffix) >= 3}


def _variants(cut: tuple[str, ...]) -> set[str]:
    """Strings that the words cut out of two prompts share whenever `typo_close` accepts the pair with
    its differing words cut out at the same place: one word against one (a letter dropped from either,
    or a common stem), two words against the one they spell, a one-letter word against none."""
    seg = "".join(cut)
    if len(cut) != 1:
        return {seg}
    dropped = {seg[:i] + seg[i + 1:] for i in range(len(seg))} if len(seg) >= TYPO_MIN_LETTERS or len(seg) == 1 else ()
    return {seg, *_stems(seg), *dropped}


def _neighbours(c: str, d: str) -> bool:
    base = lambda ch: unicodedata.normalize("NFD", ch)[0]  # noqa: E731
    if base(c) == base(d):
        return True
    (x1, r1), (x2, r2) = _KEYS.get(c, (-9, -9)), _KEYS.get(d, (9, 9))
    return abs(r1 - r2) <= 1 and abs(x1 - x2) <= 1


def typo_links(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Pairs (i, j) of `records` that `typo_pair` would flag if one were in train and the other in an
    evaluation split: the same normalized response, and prompts that `typo_close` accepts (one pair per
    two distinct prompts, by the first row of each; rows with equal prompts are linked by the prompt key)."""
    first: dict[tuple[str, tuple[str, ...]], int] = {}
    prompts: dict[str, int] = {}
    for i, record in enumerate(records):
        key = typo_key(record)
        if len(key[1]) <= TYPO_MAX_WORDS and first.setdefault(key, i) == i:
            prompts[key[0]] = prompts.get(key[0], 0) + 1
    items = [key for key in first if prompts[key[0]] > 1]
    return [(first[items[a]], first[items[b]]) for a, b in typo_pairs(items, lambda a, b: True)]


def typo_pairs(items: list[tuple[str, tuple[str, ...]]], wanted) -> list[tuple[int, int]]:
    """Places (a, b), a < b, of the distinct (response, prompt words) `items` with the same response
    whose prompts are `typo_close`, among the pairs that `wanted(a, b)` keeps.

    Two such prompts are equal but for at most two words at the same place, so each prompt is keyed
    by its response and its words with 0, 1 or 2 words cut out at each place (rolling hashes: O(words)
    per prompt); prompts that share a key are candidates, confirmed with `typo_close`. A bucket that
    holds many prompts (a template's slot) pairs only those whose cut-out words share a `_variants`
    string, as every accepted pair does where its differing words are cut out.
    """
    pre, suf = array("q"), array("q")  # per item and place i in 0..n: the hashes of seq[:i] and seq[i:]
    for response, seq in items:
        h, back = hash(response), [0]
        pre.append(h)
        for word in seq:
            h = hash((h, word))
            pre.append(h)
        for word in reversed(seq):
            back.append(hash((word, back[-1])))
        suf.extend(reversed(back))
    sizes = np.fromiter((len(seq) + 1 for _, seq in items), np.int64, len(items))
    item = np.repeat(np.arange(len(items)), sizes)
    place = np.arange(len(item)) - (np.cumsum(sizes) - sizes)[item]
    last = (sizes - 1)[item]
    pre_np = np.frombuffer(pre, np.int64).astype(np.uint64) if pre else np.empty(0, np.uint64)
    suf_np = np.frombuffer(suf, np.int64).astype(np.uint64) if suf else np.empty(0, np.uint64)
    keys, entries = [], []  # one key per item, place i and width w: the words but seq[i:i + w]
    for w in (0, 1, 2):
        at = np.flatnonzero(place + w <= last)
        with np.errstate(over="ignore"):  # wrapping modulo 2**64 is the point
            keys.append(pre_np[at] * np.uint64(0x9E3779B97F4A7C15) ^ suf_np[at + w])
        entries.append(np.stack([item[at], place[at], np.full(len(at), w)], axis=1))
    key, entry = np.concatenate(keys), np.concatenate(entries)
    order = np.argsort(key, kind="stable")
    ordered = key[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    runs = np.diff(np.r_[starts, len(order)])
    candidates: set[tuple[int, int]] = set()
    for start, size in zip(starts[runs > 1].tolist(), runs[runs > 1].tolist()):
        members = entry[order[start:start + size]].tolist()
        if len(members) <= _BUCKET:
            groups = [[k for k, _, _ in members]]
        else:
            by_variant: dict[str, list[int]] = {}
            for k, i, w in members:
                for v in _variants(items[k][1][i:i + w]):
                    by_variant.setdefault(v, []).append(k)
            groups = [g for g in by_variant.values() if len(g) > 1]
        for group in groups:
            group = sorted(set(group))
            candidates.update((a, b) for i, a in enumerate(group) for b in group[i + 1:])
    return sorted((a, b) for a, b in candidates if wanted(a, b) and typo_close(items[a][1], items[b][1]))
