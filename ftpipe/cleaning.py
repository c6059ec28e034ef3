"""Text cleaning rules and the similarity keys that deduplication and leak checks share.

Normalization for comparison (`norm_key`) is stricter than the cleaning applied to the data:
case, punctuation and whitespace are ignored, so "What's AI?" and "whats  ai" compare equal.
Near-duplicates are found with MinHash LSH over word unigrams + bigrams (datasketch sketches, banding
with numpy), then confirmed with the exact Jaccard similarity, so LSH only proposes candidates.
"""

from __future__ import annotations

import functools
import html
import itertools
import re
import unicodedata
from collections import defaultdict

import numpy as np

_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")
_MARKUP = re.compile(r"<[^<>]{1,200}>")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# International or local numbers of 8+ digits with the usual separators; not years or small counts.
_PHONE = re.compile(r"(?<![\w+])\+?\d(?:[\s().-]?\d){7,14}(?!\w)")
_WORD = re.compile(r"\w+")
# The text rules prepare_data applies (each when its param is on), in this order; preference pairs
# are cleaned with the same.
TEXT_RULES = ("normalize_unicode", "strip_control", "strip_markup", "collapse_whitespace")
NUM_PERM = 96  # MinHash permutations; LSH only proposes candidates, the exact Jaccard decides
LSH_SLACK = 0.75  # candidate threshold as a fraction of the confirmed one: 0.6 for 0.8
# With 96 permutations and weights (0.3, 0.7), datasketch picks 17 bands of 5 rows: a pair at
# Jaccard 0.8 becomes a candidate with probability 1 - (1 - 0.8**5)**17 = 0.9988.


def normalize_unicode(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def strip_control(text: str) -> str:
    """Remove control and format characters other than newline and tab."""
    # isprintable() is False for every Cc and Cf character, so most texts skip the per-character
    # check, which cost ~10% of prepare_data on 100k rows.
    if text.isprintable() or text.replace("\n", "").replace("\t", "").isprintable():
        return text
    return "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf"))


def collapse_whitespace(text: str) -> str:
    text = _SPACES.sub(" ", text)
    text = _BLANK_LINES.sub("\n\n", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def strip_markup(text: str) -> str:
    return html.unescape(_MARKUP.sub(" ", text))


def scrub_pii(text: str) -> tuple[str, int, int]:
    """(text with e-mails and phone numbers replaced, e-mails found, phones found)."""
    text, emails = _EMAIL.subn("<EMAIL>", text)
    text, phones = _PHONE.subn("<PHONE>", text)
    return text, emails, phones


@functools.lru_cache(maxsize=1 << 20)
def words(text: str) -> tuple[str, ...]:
    """Case-folded word tokens, punctuation dropped: the unit of every similarity check.

    Cached: deduplication, splitting and leak checks each look at the same texts again.
    """
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def norm_key(text: str) -> str:
    return " ".join(words(text))


def shingles(tokens: tuple[str, ...]) -> set[str]:
    """Word unigrams and bigrams of a `words` tuple: what near-duplicate similarity compares."""
    return set(tokens).union(map(" ".join, zip(tokens, tokens[1:])))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def ngrams(text: str, n: int) -> set[int]:
    """Hashes of the word n-grams of a text (none when it has fewer than n words)."""
    tokens = words(text)
    return set(map(hash, zip(*(tokens[i:] for i in range(n)))))  # no Python bytecode per n-gram


class NearDuplicates:
    """Near-duplicate search shared by deduplication, the group split and the leak checks.

    Texts with the same words (`words`) have the same shingles, so each distinct word sequence is
    sketched once and cut into LSH bands. A search sorts its rows by each band's key with numpy and
    takes candidate pairs inside equal-key runs, instead of a Python insert and query per text and
    band (~80% of prepare_data's time on 100k rows); each candidate is then confirmed with the
    exact Jaccard similarity, so LSH only proposes.
    """

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        # Candidates come from a looser LSH tuned against false negatives; the exact Jaccard then
        # confirms them, so recall near the threshold does not hinge on MinHash's estimation error.
        # datasketch only chooses the bands and rows here; the index itself is the arrays below.
        lsh = MinHashLSH(threshold=max(0.2, threshold * LSH_SLACK), num_perm=NUM_PERM, weights=(0.3, 0.7))
        self.bands, self.band_size = lsh.b, lsh.r
        self._row: dict[tuple[str, ...], int] = {}  # word sequence -> its row in the arrays below
        self._seqs: list[tuple[str, ...]] = []
        self._keys = np.empty((0, self.bands), np.uint64)  # one key per row and band
        self._sizes = np.empty(0, np.int64)  # shingles per row

    def pairs(self, texts: list[str]) -> list[tuple[int, int]]:
        """Pairs (i, j), i < j, that connect every near-duplicate cluster of `texts`: each confirmed
        pair of distinct word sequences, and each text to the first with the same words (chained
        rather than all-to-all, so a thousand copies cost a thousand pairs, not half a million)."""
        rows = self._sketch(texts)
        first: dict[int, int] = {}
        out = [(first[r], i) for i, r in enumerate(rows) if first.setdefault(r, i) != i]
        uniq = list(first)
        for a, b in self._confirmed(np.array(uniq, np.int64)):
            i, j = first[uniq[a]], first[uniq[b]]
            out.append((min(i, j), max(i, j)))
        return out

    def matches(self, queries: list[str], targets: list[str]) -> list[list[int]]:
        """For each query, the indices of the targets whose Jaccard similarity with it is >= threshold."""
        q_rows, t_rows = self._sketch(queries), self._sketch(targets)
        at_q, at_t = defaultdict(list), defaultdict(list)
        for i, r in enumerate(q_rows):
            at_q[r].append(i)
        for j, r in enumerate(t_rows):
            at_t[r].append(j)
        hits = [(r, r) for r in at_q if r in at_t]  # the same words on both sides: Jaccard 1
        uniq = sorted(at_q.keys() | at_t.keys())
        is_q, is_t = np.isin(uniq, list(at_q)), np.isin(uniq, list(at_t))
        across = lambda a, b: (is_q[a] & is_t[b]) | (is_q[b] & is_t[a])  # noqa: E731 (query-target pairs only)
        for a, b in self._confirmed(np.array(uniq, np.int64), across):
            ra, rb = uniq[a], uniq[b]
            hits += [(x, y) for x, y in ((ra, rb), (rb, ra)) if x in at_q and y in at_t]
        out: list[list[int]] = [[] for _ in queries]
        for qr, tr in hits:
            for i in at_q[qr]:
                out[i].extend(at_t[tr])
        return out

    def _sketch(self, texts: list[str]) -> list[int]:
        """Row of each text, sketching the word sequences not seen before."""
        seqs = [words(t) for t in texts]
        missing = [s for s in dict.fromkeys(seqs) if s not in self._row]
        if missing:
            sets = [shingles(s) or {""} for s in missing]  # an empty text still gets a signature
            signatures = minhash_signatures(sets)[:, :self.bands * self.band_size]
            keys = _band_keys(signatures.reshape(len(missing), self.bands, self.band_size))
            self._keys = np.concatenate([self._keys, keys])
            self._sizes = np.concatenate([self._sizes, [len(x) for x in sets]])
            self._row.update((s, len(self._seqs) + k) for k, s in enumerate(missing))
            self._seqs += missing
        return [self._row[s] for s in seqs]

    def _confirmed(self, rows: np.ndarray, wanted=None) -> list[tuple[int, int]]:
        """Places (a, b) in `rows` of the candidate pairs that `wanted` (arrays of places -> mask)
        keeps and the exact Jaccard similarity confirms."""
        pairs = bucket_pairs(self._keys[rows])
        size_a, size_b = self._sizes[rows[pairs[:, 0]]], self._sizes[rows[pairs[:, 1]]]
        # Jaccard <= min size / max size, so pairs of very different sizes cannot reach the threshold
        # (computed as the same float division, so no true pair is lost to rounding).
        keep = np.minimum(size_a, size_b) / np.maximum(size_a, size_b) >= self.threshold
        if wanted is not None:
            keep &= wanted(pairs[:, 0], pairs[:, 1])
        seqs = [self._seqs[r] for r in rows.tolist()]
        return [(a, b) for a, b in pairs[keep].tolist()
                if jaccard(shingles(seqs[a]), shingles(seqs[b])) >= self.threshold]


def minhash_signatures(sets: list[set[str]]) -> np.ndarray:
    """(len(sets), NUM_PERM) MinHash signatures: the values of datasketch's MinHash.bulk (seed 1,
    xxh32, its default affine32 scheme), computed for all sets at once: a MinHash object per set
    cost more than the banding, here only the hashing of each shingle is Python. xxhash is several
    times faster than datasketch's default SHA-1 and just as stable across runs."""
    import xxhash
    from datasketch import MinHash

    a, b = MinHash(num_perm=NUM_PERM, seed=1).permutations
    sizes = np.fromiter(map(len, sets), np.int64, len(sets))
    # map over C functions: no Python bytecode runs per shingle
    hashed = map(xxhash.xxh32_intdigest, map(str.encode, itertools.chain.from_iterable(sets)))
    hashed = _fmix32(np.fromiter(hashed, np.uint32, sizes.sum()))
    starts = np.cumsum(sizes) - sizes
    out = np.empty((NUM_PERM, len(sets)), np.uint32)
    for lo in range(0, len(sets), 4096):  # ~60 MB of permuted hashes at a time
        hi = min(lo + 4096, len(sets))
        first, last = starts[lo], starts[hi - 1] + sizes[hi - 1]
        with np.errstate(over="ignore"):  # the affine permutation wraps modulo 2**32 by design
            permuted = a[:, None] * hashed[None, first:last] + b[:, None]
        out[:, lo:hi] = np.minimum.reduceat(permuted, starts[lo:hi] - first, axis=1)
    return out.T


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, which datasketch applies to each hash before permuting it."""
    with np.errstate(over="ignore"):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x85EBCA6B)
        h = h ^ (h >> np.uint32(13))
        h = h * np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))


def _band_keys(bands: np.ndarray) -> np.ndarray:
    """One 64-bit key per (row, band) from the band's MinHash values. A collision only adds a
    candidate that the exact Jaccard then rejects, so a fast multiplicative hash is enough."""
    keys = np.zeros(bands.shape[:2], np.uint64)
    with np.errstate(over="ignore"):  # wrapping modulo 2**64 is the point
        for column in np.moveaxis(bands, 2, 0).astype(np.uint64):
            keys = (keys ^ column) * np.uint64(0x9E3779B97F4A7C15)
    return keys


def bucket_pairs(keys: np.ndarray) -> np.ndarray:
    """Distinct row pairs (a, b), a < b, that share a key in at least one column of `keys`.

    One stable sort per column puts rows with equal keys next to each other; a run of s rows gives
    its s*(s-1)/2 pairs, all generated with array arithmetic.
    """
    n = len(keys)
    found = [np.empty(0, np.int64)]
    for column in keys.T:
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        start = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        size = np.diff(np.r_[start, n])
        # The row at place p of a run of size s pairs with the s-1-p rows after it.
        later = np.repeat(size, size) - 1 - (np.arange(n) - np.repeat(start, size))
        left = np.repeat(np.arange(n), later)
        step = np.arange(len(left)) - np.repeat(np.cumsum(later) - later, later) + 1
        a, b = order[left], order[left + step]
        found.append(np.minimum(a, b) * n + np.maximum(a, b))
    codes = np.unique(np.concatenate(found))
    return np.stack([codes // max(n, 1), codes % max(n, 1)], axis=1)
