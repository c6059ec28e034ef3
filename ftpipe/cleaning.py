"""Text cleaning rules and the similarity keys that deduplication and leak checks share.

Normalization for comparison (`norm_key`) is stricter than the cleaning applied to the data:
case, punctuation and whitespace are ignored, so "What's AI?" and "whats  ai" compare equal.
Near-duplicates are found with MinHash LSH (datasketch) over word unigrams + bigrams, then
confirmed with the exact Jaccard similarity, so LSH only proposes candidates.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
from collections.abc import Iterable

_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n\s*\n\s*\n+")
_MARKUP = re.compile(r"<[^<>]{1,200}>")
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# International or local numbers of 8+ digits with the usual separators; not years or small counts.
_PHONE = re.compile(r"(?<![\w+])\+?\d(?:[\s().-]?\d){7,14}(?!\w)")
_WORD = re.compile(r"\w+")
NUM_PERM = 96  # MinHash permutations; LSH only proposes candidates, the exact Jaccard decides
LSH_SLACK = 0.75  # candidate threshold as a fraction of the confirmed one: 0.6 for 0.8
# With 96 permutations and weights (0.3, 0.7), datasketch picks 17 bands of 5 rows: a pair at
# Jaccard 0.8 becomes a candidate with probability 1 - (1 - 0.8**5)**17 = 0.9988.


def normalize_unicode(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def strip_control(text: str) -> str:
    """Remove control and format characters other than newline and tab."""
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


def shingles(text: str) -> set[str]:
    tokens = words(text)
    return set(tokens) | {f"{a} {b}" for a, b in zip(tokens, tokens[1:])}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def ngrams(text: str, n: int) -> set[int]:
    """Hashes of the word n-grams of a text (none when it has fewer than n words)."""
    tokens = words(text)
    return {hash(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


class NearDuplicates:
    """Every text it is given is sketched once (shingles + MinHash) into one LSH index, which
    deduplication, the group split and the leak checks all share. `near` returns, for each text,
    the other indexed texts whose exact Jaccard similarity is >= threshold."""

    def __init__(self, threshold: float):
        from datasketch import MinHashLSH

        self.threshold = threshold
        # Candidates come from a looser LSH tuned against false negatives; the exact Jaccard then
        # confirms them, so recall near the threshold does not hinge on MinHash's estimation error.
        self._lsh = MinHashLSH(threshold=max(0.2, threshold * LSH_SLACK), num_perm=NUM_PERM, weights=(0.3, 0.7))
        self._memo: dict[str, tuple[set[str], object]] = {}

    def index(self, texts: list[str]) -> None:
        """Sketch and index texts not seen before."""
        from datasketch import LeanMinHash, MinHash

        missing = [t for t in dict.fromkeys(texts) if t not in self._memo]
        sets = [shingles(t) for t in missing]
        hashed = MinHash.bulk([[x.encode() for x in s] or [b""] for s in sets], num_perm=NUM_PERM, seed=1,
                              hashfunc=_hash32)
        with self._lsh.insertion_session() as session:
            for text, shingle_set, minhash in zip(missing, sets, hashed):
                signature = LeanMinHash(minhash)
                self._memo[text] = (shingle_set, signature)
                session.insert(text, signature, check_duplication=False)

    def near(self, texts: list[str]) -> list[list[str]]:
        self.index(texts)
        out = []
        for text in texts:
            shingle_set, signature = self._memo[text]
            out.append([k for k in self._lsh.query(signature)
                        if k != text and jaccard(shingle_set, self._memo[k][0]) >= self.threshold])
        return out


def _hash32(data: bytes) -> int:
    # xxhash is several times faster than datasketch's default SHA-1 and just as stable across runs.
    import xxhash

    return xxhash.xxh32_intdigest(data)
