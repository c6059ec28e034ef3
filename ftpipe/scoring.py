"""One pass per batch for a candidate's greedy replies and its references' NLL.

The prompts' shared prefix (system prompt, few-shot examples) runs once; then forwards over each row's [rest
of prompt | reference], rows of like length together, score the references and leave each prompt's KV cache,
which seeds greedy decoding in buffers with room for the replies (ftpipe.kvcache); rows that ended leave the
batch. On the CPU (llama, qwen) the prefix stays out of the rows' caches, read once per layer for all rows.
Replies equal `model.generate(do_sample=False)`'s (tests compare them in fp32). Models this loop cannot drive
(peft prompt learning, caches that are not plain per-layer KV) take generate, then a forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftpipe.choices import BUILTIN_METRICS

# Positions (rows x width) per prompt-and-reference forward: wide enough for the matmuls to run near
# their peak, narrow enough that its logits (positions x vocabulary) stay a few hundred MB. Past
# SMALL_FORWARD positions a group's positions are at most PADDING times its real tokens: padding costs
# a forward's work at every position, and the references' vocabulary projection runs to the group's
# widest (1,024 and a quarter computed a third more positions than real on the default test split,
# and projected three quarters more). Below SMALL_FORWARD a forward's fixed cost outweighs its
# padding. PREFILL_CACHE caps the forward's KV cache, where (unless the prefix is read apart) each row
# holds its own copy of the shared prefix: a long few-shot prefix and short rows would otherwise put
# the whole batch in one forward, a second decode cache's worth.
PREFILL_POSITIONS = 4096
SMALL_FORWARD = 256
PADDING = 1.1
PREFILL_CACHE = 4 * PREFILL_POSITIONS

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Scored:
    outputs: list[str]  # greedy replies, stripped
    nll: list[tuple[float, int]]  # (summed NLL, token count) of each reference
    capped: list[bool]  # the reply ran to max_new_tokens without ending
    new_tokens: int  # tokens generated, over all rows
    prompt_tokens: int  # prompt tokens encoded, over all rows


def score(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict[str, str]]], *,
          max_new_tokens: int, batch_size: int, progress: str | None = None,
          prefill_positions: int = PREFILL_POSITIONS) -> Scored:
    """Greedy replies and reference NLLs of `conversations` (each ending in its reference reply), in
    decoding batches of `batch_size` rows."""
    from tqdm import tqdm

    items = [prompt_and_reference(tokenizer, c) for c in conversations]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths share a batch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    one_pass = _one_pass_ok(model)
    result = Scored([""] * len(items), [(0.0, 0)] * len(items), [False] * len(items), 0, 0)
    for batch in tqdm(batches, desc=progress, disable=progress is None):
        chosen = [items[i] for i in batch]
        if one_pass:
            tokens, nll = _one_pass(model, tokenizer, chosen, max_new_tokens, prefill_positions)
        else:
            tokens, nll = two_pass(model, tokenizer, chosen, max_new_tokens)
        texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for i, ids, text, row_nll in zip(batch, tokens, texts, nll):
            result.outputs[i] = text.strip()
            result.nll[i] = row_nll
            result.capped[i] = len(ids) >= max_new_tokens and tokenizer.eos_token_id not in ids
            result.new_tokens += len(ids)
            result.prompt_tokens += len(items[i][0])
    return result


def score_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int,
    batch_size: int,
    stemmer: bool,
    name: str,
    metrics: Sequence[str] = BUILTIN_METRICS,
    scorers: dict[str, Callable[[str, str], float]] | None = None,
) -> tuple[dict[str, float], list[str], list[dict[str, float]]]:
    """(metric block, outputs, per_example rows) of one model on test conversations (each ending in
    its reference), by greedy batched generation (`score`: one pass gives the replies and the
    references' NLL). The score_base and evaluate stages score their candidates with it and the
    register stage the champion, with the settings evaluate recorded, so all score alike.
    `scorers`: the user metrics of `metrics` (metrics.user_scorers), loaded once by the caller; None
    loads them. The block also holds capped_share."""
    from ftpipe.metrics import CAPPED_KEY, aggregate, per_example, user_scorers

    scored = score(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size,
                   progress=f"score ({name})")
    references = [c[-1]["content"] for c in conversations]
    if scorers is None:
        scorers = user_scorers(metrics)
    rows = per_example(scored.outputs, references, stemmer=stemmer, nll=scored.nll, metrics=metrics, scorers=scorers)
    block = aggregate(scored.outputs, references, rows, metrics)
    block[CAPPED_KEY] = sum(scored.capped) / len(scored.capped)
    return block, scored.outputs, rows


def prompt_and_reference(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids): the prompt as generation sees it (the chat template's text up to
    the assistant's turn), the reference as the NLL scores it (its tokens and end-of-turn marker)."""
    from ftpipe.chat import IGNORE_INDEX, prompt_text
    from ftpipe.metrics import reference_labels

    prompt = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    labelled = reference_labels(tokenizer, messages)
    reference = [t for t, label in zip(labelled["input_ids"], labelled["labels"]) if label != IGNORE_INDEX]
    return prompt, reference


def _one_pass_ok(model) -> bool:
    import inspect
    import sys

    # Not imported here: peft costs about a second of imports, and a model can only be a PeftModel
    # if whoever loaded it has imported peft already.
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _one_pass(model, tokenizer, items: list[tuple[list[int], list[int]]], max_new_tokens: int,
              positions: int = PREFILL_POSITIONS):
    """(generated ids per row, (NLL, tokens) per row): the prompts' shared prefix once, then each row's
    [rest of prompt | reference] in forwards of rows of like length, whose prompt caches, gathered
    left-padded behind the prefix, seed greedy decoding."""
    import torch

    from ftpipe import kvcache

    shared = _shared_prefix([p for p, _ in items])
    with torch.inference_mode():
        prefix = None
        if shared:
            prefix = model(input_ids=torch.tensor([items[0][0][:shared]], device=model.device), use_cache=True,
                           logits_to_keep=1).past_key_values
            if not _plain_cache(prefix):  # a sliding-window or recurrent cache cannot be cut or joined
                return two_pass(model, tokenizer, items, max_new_tokens)
        # Each row's cache holds a copy of the prefix, or, where it is read apart, only what follows it
        # (one copy for all rows: most of a few-shot row's cache).
        apart = prefix is not None and kvcache.reads_prefix_apart(model)
        with (kvcache.prefix_attention(model, [(layer.keys, layer.values) for layer in prefix.layers]) if apart
              else contextlib.nullcontext()):
            scored = _prefill_and_decode(model, tokenizer, items, max_new_tokens, positions, shared,
                                         None if apart else prefix)
    return scored if scored is not None else two_pass(model, tokenizer, items, max_new_tokens)


def _prefill_and_decode(model, tokenizer, items, max_new_tokens: int, positions: int, shared: int, joined):
    """_one_pass's forwards and decoding after the prefix; `joined`: the prefix's cache where the rows'
    caches hold a copy of it, None where there is none or it is read apart (then the decode cache
    starts at position `shared`). None where a forward's cache is not plain."""
    import torch

    from ftpipe import kvcache

    start, end = (0 if joined is not None else shared), max(len(p) for p, _ in items)  # the decode cache's span
    cache: list[list] = []
    first = torch.zeros(len(items), dtype=torch.long)
    nll: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    for rows in _chunks(items, shared, positions):
        chunk = [items[i] for i in rows]
        out, labels = _prefill(model, tokenizer, chunk, shared, joined)
        if not _plain_cache(out.past_key_values):
            return None
        for i, row_nll in zip(rows, _reference_nll_rows(out.logits, labels, chunk)):
            nll[i] = row_nll
        # Right-aligned rows: logits[:, j] predicts labels[:, j]; a reference of r tokens starts at
        # j = width - r, where the prediction is also the reply's first token.
        width = labels.shape[1]
        starts = torch.tensor([width - len(r) for _, r in chunk], device=out.logits.device)
        first[rows] = out.logits[torch.arange(len(rows), device=starts.device), starts].max(-1).indices.cpu()
        filled = out.past_key_values.get_seq_length()
        for layer, found in enumerate(out.past_key_values.layers):
            if len(cache) <= layer:  # zeros where a row's prompt is shorter (masked), room for the reply
                shape = (len(items), found.keys.shape[1], end - start + max_new_tokens, found.keys.shape[3])
                cache.append([found.keys.new_empty(shape), found.values.new_empty(shape)])
                for buffer in cache[layer]:  # the reply's room is written before it is read
                    buffer[:, :, :end - start].zero_()
                if joined is not None:
                    cache[layer][0][:, :, :shared] = joined.layers[layer].keys
                    cache[layer][1][:, :, :shared] = joined.layers[layer].values
            for k, (i, (prompt, reference)) in enumerate(zip(rows, chunk)):
                rest, stop = len(prompt) - shared, filled - len(reference)
                cache[layer][0][i, :, end - start - rest:end - start] = found.keys[k, :, stop - rest:stop]
                cache[layer][1][i, :, end - start - rest:end - start] = found.values[k, :, stop - rest:stop]
        del out
    mask = torch.zeros((len(items), end - start), dtype=torch.long)
    mask[:, :shared - start] = 1
    for row, (prompt, _) in enumerate(items):
        mask[row, end - start - (len(prompt) - shared):] = 1
    device = model.device
    tokens = _decode(model, kvcache.roomy_cache(cache, end - start), first.to(device), mask.to(device),
                     tokenizer.eos_token_id, max_new_tokens, offset=start)
    return tokens, nll


def _shared_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with (a system prompt, few-shot examples), leaving each prompt one
    of its own: its last position predicts the reply's first token."""
    shared = min(len(p) for p in prompts) - 1
    for i in range(shared):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(shared, 0)


def _chunks(items, shared: int, positions: int) -> list[list[int]]:
    """Row indices in groups of like length (rest of prompt + reference): rows x longest at most
    `positions` (with the shared prefix, PREFILL_CACHE), and padding at most PADDING times the real
    tokens once a group is past SMALL_FORWARD positions."""
    sizes = [len(p) - shared + len(r) for p, r in items]
    chunks: list[list[int]] = []
    real = 0
    for i in sorted(range(len(items)), key=sizes.__getitem__):
        rows = len(chunks[-1]) + 1 if chunks else 1
        area = rows * sizes[i]  # ascending: row i is the group's longest
        if (chunks and area <= positions and rows * (shared + sizes[i]) <= PREFILL_CACHE
                and (area <= SMALL_FORWARD or area <= PADDING * (real + sizes[i]))):
            chunks[-1].append(i)
            real += sizes[i]
        else:
            chunks.append([i])
            real = sizes[i]
    return chunks


def _prefill(model, tokenizer, items, shared: int, prefix):
    """One forward over each row's [rest of prompt | reference], left-padded to the longest, behind the
    shared prefix's cache, or with no prefix where it is read apart (prefix None: positions still count
    from `shared`): (output with logits for the last reference width + 1 positions, the references as
    labels there, right-aligned)."""
    import torch

    from ftpipe.chat import IGNORE_INDEX

    held = shared if prefix is not None else 0  # prefix positions in the forward's cache and mask
    width = max(len(p) - shared + len(r) for p, r in items)
    ref_width = max(len(r) for _, r in items)
    ids = torch.full((len(items), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), held + width), dtype=torch.long)
    mask[:, :held] = 1
    labels = torch.full((len(items), ref_width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, reference) in enumerate(items):
        tokens = prompt[shared:] + reference
        ids[row, width - len(tokens):] = torch.tensor(tokens)
        mask[row, held + width - len(tokens):] = 1
        labels[row, ref_width - len(reference):] = torch.tensor(reference)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, held:] + (shared - held)
    cache = None
    if prefix is not None:  # every row reads the one prefix: views, copied once by the forward's cache update
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(layer.keys, layer.values) for layer in prefix.layers])
        for layer in cache.layers:
            layer.keys = layer.keys.expand(len(items), -1, -1, -1)
            layer.values = layer.values.expand(len(items), -1, -1, -1)
    device = model.device
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                past_key_values=cache, use_cache=True, logits_to_keep=ref_width + 1)
    return out, labels.to(device)


def _reference_nll_rows(logits, labels, items) -> list[tuple[float, int]]:
    """(summed NLL, tokens) per row from logits[:, j] predicting labels[:, j]. A few rows at a time,
    each as contiguous (position, vocabulary) rows in fp32: cross_entropy over a transposed view is
    many times slower on the CPU, and the whole batch in fp32 would hold batch x reference x
    vocabulary floats three times over."""
    import torch

    from ftpipe.chat import IGNORE_INDEX

    rows = []
    step = max(1, 2**26 // max(1, logits.shape[1] * logits.shape[2]))  # about 256 MB of fp32 logits a chunk
    for start in range(0, len(items), step):
        part = logits[start:start + step, :-1]
        nll = torch.nn.functional.cross_entropy(part.reshape(-1, part.shape[-1]).float(),
                                                labels[start:start + step].reshape(-1), ignore_index=IGNORE_INDEX,
                                                reduction="none").view(len(part), -1).double().sum(dim=1)
        rows += [(float(n), len(r)) for n, (_, r) in zip(nll.cpu(), items[start:start + step])]
    return rows


def _plain_cache(cache) -> bool:
    from transformers.cache_utils import DynamicLayer

    return cache is not None and all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None]))


def _decode(model, cache, current, mask, eos: int, max_new_tokens: int, offset: int = 0) -> list[list[int]]:
    """Greedy tokens per row from the prompt's cache, which `mask` covers from position `offset` on (a
    prefix read apart comes before it). Rows that emitted `eos` leave the batch once they are an eighth
    of it: each leaving copies the whole cache, more than a few ended rows cost."""
    import torch

    tokens: list[list[int]] = [[] for _ in range(len(current))]
    alive = list(range(len(current)))  # the row of each batch position
    ended = [False] * len(current)
    position = mask.sum(dim=1) + offset  # the next position of each row: its real prompt tokens
    for step in range(max_new_tokens):
        for k, token in enumerate(current.tolist()):
            if not ended[k]:
                tokens[alive[k]].append(token)
                ended[k] = token == eos
        if step == max_new_tokens - 1 or all(ended):
            break
        if 8 * sum(ended) >= len(ended):
            kept = [k for k, done in enumerate(ended) if not done]
            keep = torch.tensor(kept, device=current.device)
            cache.batch_select_indices(keep)
            alive, ended = [alive[k] for k in kept], [False] * len(kept)
            mask, position, current = mask[keep], position[keep], current[keep]
        mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
        out = model(input_ids=current[:, None], attention_mask=mask, position_ids=position[:, None],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        # max's indices are argmax's (the first of equal values), and several times faster on bf16 CPU logits.
        cache, current, position = out.past_key_values, out.logits[:, -1].max(-1).indices, position + 1
    return tokens


def two_pass(model, tokenizer, items, max_new_tokens: int):
    """transformers' generate, then a forward for the NLL: for models the one-pass loop cannot drive."""
    return _generate(model, tokenizer, items, max_new_tokens), _reference_nll(model, tokenizer, items)


def _generate(model, tokenizer, items, max_new_tokens: int) -> list[list[int]]:
    import torch

    width = max(len(p) for p, _ in items)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in items])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in items])
    from transformers import GenerationConfig

    # A bare config: the model's own generation_config (a repetition penalty, more end tokens) would
    # decode these models otherwise than the one-pass loop decodes every other candidate.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    with torch.inference_mode():
        generated = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                                   generation_config=config)
    rows = []
    for row in generated[:, width:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)  # what follows the end is padding
        rows.append(row[:cut])
    return rows


def _reference_nll(model, tokenizer, items) -> list[tuple[float, int]]:
    import torch

    from ftpipe.chat import IGNORE_INDEX
    from ftpipe.metrics import nll_rows

    width = max(len(p) + len(r) for p, r in items)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([p + r + [pad] * (width - len(p) - len(r)) for p, r in items])
    labels = torch.tensor([[IGNORE_INDEX] * len(p) + r + [IGNORE_INDEX] * (width - len(p) - len(r)) for p, r in items])
    mask = (labels != IGNORE_INDEX) | (torch.arange(width)[None, :] < torch.tensor([len(p) for p, _ in items])[:, None])
    with torch.inference_mode():
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.long().to(model.device)).logits.float()
    return nll_rows(logits[:, -width:].cpu(), labels)  # prompt-learning models put virtual tokens first
