"""Packing of a batch of tokenized rows into sequences, the prefix the rows share computed once.

A packed sequence is [shared prefix][row 1 after it][row 2 after it]...; position ids and a 4-D attention
mask give each row exactly the context and positions it has alone, so loss and gradients equal a padded
batch's (tests/test_packing.py), without the padding. Packing is per batch, in the collator: batches,
optimizer steps and curves are those of unpacked training.
"""

from __future__ import annotations

import bisect
import os
from typing import TYPE_CHECKING, Any

from ftpipe.chat import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

PREFIX, PADDING = 0, -1  # segment ids: the shared prefix, padding; rows are 1, 2, ...


def shared_prefix(rows: list[dict[str, Any]]) -> list[int]:
    """The longest run of token ids every row starts with, ending before the token ahead of any
    row's first label: a row's first own token is predicted from the previous row's last token in
    a packed sequence, so it must carry no loss."""
    if not rows:
        return []
    common = os.path.commonprefix([row["input_ids"] for row in rows])
    first_labels = (next((i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX), len(row["labels"]))
                    for row in rows)
    return list(common[: max(0, min(len(common), min(first_labels) - 1))])


def pack_rows(rows: list[dict[str, Any]], max_length: int, prefix: list[int] | None = None) -> list[dict[str, Any]]:
    """Rows (input_ids, labels, all starting with `prefix`) packed best-fit, longest first, into
    sequences of at most max_length tokens, each opening with the prefix once.

    Every packed sequence carries input_ids, labels, position_ids, segments (PREFIX, then 1, 2, ...
    per row) and real_tokens, the number of tokens its rows have unpacked (prefix included).
    """
    prefix = list(prefix or [])
    return [_packed(prefix, rows_in) for rows_in in _best_fit(rows, max_length, prefix)]


def _best_fit(rows: list[dict[str, Any]], max_length: int, prefix: list[int]) -> list[list[dict[str, Any]]]:
    """The rows of each sequence of pack_rows, without building the sequences."""
    size = len(prefix)
    room = max_length - size
    bins: list[list[dict[str, Any]]] = []
    free: list[tuple[int, int]] = []  # (tokens left, bin index), sorted
    for row in sorted(rows, key=lambda r: -len(r["input_ids"])):
        if row["input_ids"][:size] != prefix:
            raise ValueError("a row does not start with the shared prefix")
        need = len(row["input_ids"]) - size
        if need > room:
            raise ValueError(f"a row of {len(row['input_ids'])} tokens is longer than the packing length {max_length}")
        at = bisect.bisect_left(free, (need, -1))  # the fullest sequence that still fits the row
        if at < len(free):
            left, index = free.pop(at)
        else:
            left, index = room, len(bins)
            bins.append([])
        bins[index].append(row)
        bisect.insort(free, (left - need, index))
    return bins


def _packed(prefix: list[int], rows: list[dict[str, Any]]) -> dict[str, Any]:
    size = len(prefix)
    item = {"input_ids": list(prefix), "labels": [IGNORE_INDEX] * size, "position_ids": list(range(size)),
            "segments": [PREFIX] * size, "real_tokens": 0}
    for number, row in enumerate(rows, start=1):
        own = len(row["input_ids"]) - size
        item["input_ids"] += row["input_ids"][size:]
        item["labels"] += [IGNORE_INDEX] + row["labels"][size + 1:]
        item["position_ids"] += range(size, size + own)
        item["segments"] += [number] * own
        item["real_tokens"] += len(row["input_ids"])
    return item


def tightest_packing(rows: list[dict[str, Any]], max_length: int, prefix: list[int] | None = None,
                     step: int = 8) -> list[dict[str, Any]]:
    """pack_rows at the packing length, from the longest row up to max_length, whose sequences
    padded to the longest take the fewest positions (ties: the narrower). A padded position costs
    about what a real one does, and one wide sequence of a few long rows would pad its neighbours:
    a batch of short rows packs into one sequence, a batch of long ones into sequences about as
    long as its longest row."""
    prefix = list(prefix or [])
    longest = max((len(row["input_ids"]) for row in rows), default=0)
    lengths = sorted({*range(min(longest, max_length), max_length, step), max_length})

    def positions(bins: list[list[dict[str, Any]]]) -> tuple[int, int]:
        width = len(prefix) + max(sum(len(row["input_ids"]) - len(prefix) for row in rows_in) for rows_in in bins)
        return len(bins) * width, width

    best = min((_best_fit(rows, length, prefix) for length in lengths), key=positions)
    return [_packed(prefix, rows_in) for rows_in in best]


class PackedCollator:
    """Packs each batch's rows (tightest_packing, sequences of at most pack_length tokens) with the
    prefix they share once per sequence, pads the sequences to the longest (padding a segment of its
    own, with no labels), and counts the rows' own tokens as real_tokens."""

    def __init__(self, tokenizer, pack_length: int) -> None:
        self.pad_id, self.pack_length = tokenizer.pad_token_id, pack_length

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        return padded(tightest_packing(features, self.pack_length, shared_prefix(features)), self.pad_id)


def packed_group(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`rows` as one packed sequence behind the prefix they share (a preference pair: its prompt
    once, then each reply seeing the prompt and itself)."""
    return _packed(shared_prefix(rows), rows)


def padded(sequences: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Packed sequences as one batch of tensors, padded to the longest (padding: a segment of its own,
    no labels); real_tokens: the rows' own tokens, all sequences together."""
    import torch

    width = max(len(s["input_ids"]) for s in sequences)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "segments": PADDING}
    batch = {key: torch.tensor([s[key] + [value] * (width - len(s[key])) for s in sequences])
             for key, value in fill.items()}
    batch["position_ids"] = torch.tensor([s["position_ids"] + list(range(width - len(s["position_ids"])))
                                          for s in sequences])
    batch["real_tokens"] = torch.tensor(sum(s["real_tokens"] for s in sequences))
    return batch


def attention_mask(segments: torch.Tensor, *, kernel: str) -> torch.Tensor:
    """The (batch, 1, length, length) mask of packed sequences: causal, and within a row's own
    tokens and the shared prefix. Boolean for sdpa; additive float (0 or the float minimum) for
    eager attention, which adds the mask to its scores."""
    import torch

    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    allowed = (causal & ((key == query) | (key == PREFIX)))[:, None]
    if kernel == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, device=segments.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def row_blocks(segments: torch.Tensor) -> dict[str, Any] | None:
    """The packed batch cut into blocks for attention computed per row (ftpipe.kernels), so that a
    row's scores cover the pairs it may see, not the (length x length) square of its sequence.

    Each block has R query slots and P + R key slots (P the longest prefix, R the longest row): a
    row's block queries its own tokens against the sequence's prefix (all visible) and its own
    tokens (causal); the prefix's own queries go in blocks of R tokens against the prefix slots
    (causal). Returns the flat positions (sequence * length + position) that each query and key
    slot reads, the slots a query may not see (`hidden`, [blocks, R, P + R]), the query slots that
    are real tokens and the positions their outputs go to; padding tokens get no block and a zero
    output. None where the blocks hold more (query, key) pairs than the sequences' squares (a few
    long rows beside many short ones): there the dense mask costs less.
    """
    import torch

    batch, length = segments.shape
    prefixes, rows = [], []  # flat positions: each sequence's prefix; (prefix, row) per row
    for number, sequence in enumerate(segments.tolist()):
        own: dict[int, list[int]] = {}
        for position, segment in enumerate(sequence):
            own.setdefault(segment, []).append(number * length + position)
        prefix = own.pop(PREFIX, [])
        own.pop(PADDING, None)
        prefixes.append(prefix)
        rows += [(prefix, own[segment]) for segment in sorted(own)]
    width_prefix = max(map(len, prefixes))
    width_own = max((len(tokens) for _, tokens in rows), default=width_prefix)
    if not width_own:
        return None
    chunks = [(prefix, start) for prefix in prefixes for start in range(0, len(prefix), width_own)]
    blocks, width = len(chunks) + len(rows), width_prefix + width_own
    if blocks * width_own * width >= batch * length * length:
        return None
    query = torch.zeros(blocks, width_own, dtype=torch.long)
    key = torch.zeros(blocks, width, dtype=torch.long)
    allowed = torch.zeros(blocks, width_own, width, dtype=torch.bool)
    real = torch.zeros(blocks, width_own, dtype=torch.bool)
    causal = torch.ones(max(width_own, width_prefix), max(width_own, width_prefix), dtype=torch.bool).tril()
    for index, (prefix, start) in enumerate(chunks):  # the prefix's queries: causal within the prefix
        size = min(width_own, len(prefix) - start)
        query[index, :size] = torch.tensor(prefix[start: start + size])
        key[index, : len(prefix)] = torch.tensor(prefix)
        allowed[index, :size, : len(prefix)] = causal[start: start + size, : len(prefix)]
        real[index, :size] = True
    for index, (prefix, tokens) in enumerate(rows, start=len(chunks)):
        size = len(tokens)
        query[index, :size] = torch.tensor(tokens)
        key[index, : len(prefix)] = torch.tensor(prefix, dtype=torch.long)
        key[index, width_prefix: width_prefix + size] = torch.tensor(tokens)
        allowed[index, :size, : len(prefix)] = True
        allowed[index, :size, width_prefix: width_prefix + size] = causal[:size, :size]
        real[index, :size] = True
    allowed[:, :, -1] |= ~real  # a padded query slot sees one key: no row of its scores is all hidden
    slots = real.view(-1).nonzero().view(-1)
    blocks = {"query": query.view(-1), "key": key.view(-1), "hidden": ~allowed, "slots": slots,
              "positions": query.view(-1)[slots]}
    return {name: tensor.to(segments.device) for name, tensor in blocks.items()}
