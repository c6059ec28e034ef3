"""Near-duplicate search: datasketch's signatures, numpy banding, exact-Jaccard confirmation."""

from __future__ import annotations

import random

import numpy as np
import xxhash
from datasketch import MinHash

from ftpipe.cleaning import NUM_PERM, NearDuplicates, bucket_pairs, minhash_signatures, shingles, strip_control, words

BASE = "how do i reset my password on the company laptop when it is locked out"


def test_signatures_equal_datasketch_minhash():
    rng = random.Random(0)
    texts = ["", "a", BASE] + [" ".join(rng.choices("ab cd ef gh ij".split(), k=rng.randint(1, 30))) for _ in range(300)]
    sets = [shingles(words(t)) or {""} for t in texts]
    expected = [m.hashvalues for m in MinHash.bulk([[x.encode() for x in s] for s in sets], num_perm=NUM_PERM,
                                                   seed=1, hashfunc=xxhash.xxh32_intdigest)]
    assert np.array_equal(minhash_signatures(sets), np.stack(expected))


def test_bucket_pairs_are_the_rows_sharing_a_key_in_some_band():
    keys = np.array([[1, 7], [2, 7], [1, 8], [3, 9], [1, 9], [4, 5]], np.uint64)
    # band 0: rows 0, 2, 4 share key 1; band 1: rows 0, 1 share 7 and rows 3, 4 share 9
    assert bucket_pairs(keys).tolist() == [[0, 1], [0, 2], [0, 4], [2, 4], [3, 4]]
    assert bucket_pairs(np.empty((0, 3), np.uint64)).shape == (0, 2)


def test_pairs_finds_near_duplicates_and_not_the_control():
    rng = random.Random(1)
    filler = [" ".join(rng.choices([f"w{i}" for i in range(500)], k=15)) for _ in range(300)]
    edited = BASE.replace("company", "office")  # one word changed: Jaccard 26/32 = 0.81
    control = "what is the tallest mountain in the whole wide world today and why"  # shares a few words
    texts = [BASE, *filler, edited, control, BASE.upper() + "!"]
    n = len(texts)
    assert set(NearDuplicates(0.8).pairs(texts)) == {(0, n - 3), (0, n - 1)}
    # above 0.81 only the copy that differs in case and punctuation remains, chained to the first
    assert NearDuplicates(0.85).pairs(texts) == [(0, n - 1)]


def test_matches_maps_each_query_to_its_near_targets():
    near = NearDuplicates(0.8)
    targets = ["an unrelated sentence about cooking pasta at home tonight", BASE, BASE + "."]
    queries = [BASE.replace("company", "office"), "nothing like any of them at all", BASE.title()]
    assert near.matches(queries, targets) == [[1, 2], [], [1, 2]]


def test_strip_control_keeps_newlines_and_tabs():
    assert strip_control("a\x07b\u200bc\n\td") == "abc\n\td"
    assert strip_control("plain text") == "plain text"
