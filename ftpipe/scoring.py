"""One pass per batch for a candidate's greedy replies and its references' NLL.

Each batch runs one forward over [left-padded prompt | right-padded reference], which scores the reference and
leaves the prompt's KV cache; cut back to the prompt, the cache seeds greedy decoding, and finished rows leave
the batch. Replies equal `model.generate(do_sample=False)`'s (tests compare them in fp32). Models this loop
cannot drive (peft prompt learning, caches that are not plain per-layer KV) take generate, then a forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftpipe.choices import BUILTIN_METRICS

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
          max_new_tokens: int, batch_size: int, progress: str | None = None) -> Scored:
    """Greedy replies and reference NLLs of `conversations` (each ending in its reference reply)."""
    from tqdm import tqdm

    items = [prompt_and_reference(tokenizer, c) for c in conversations]
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))  # similar lengths share a batch
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    one_pass = _one_pass_ok(model)
    result = Scored([""] * len(items), [(0.0, 0)] * len(items), [False] * len(items), 0, 0)
    for batch in tqdm(batches, desc=progress, disable=progress is None):
        chosen = [items[i] for i in batch]
        run = _one_pass if one_pass else two_pass
        tokens, nll = run(model, tokenizer, chosen, max_new_tokens)
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


def _one_pass(model, tokenizer, items: list[tuple[list[int], list[int]]], max_new_tokens: int):
    """(generated ids per row, (NLL, tokens) per row) from one prompt+reference forward and a decode
    loop on the prompt's cache."""
    import torch

    from ftpipe.chat import IGNORE_INDEX

    device, pad, eos = model.device, tokenizer.pad_token_id, tokenizer.eos_token_id
    width = max(len(p) for p, _ in items)
    ref_width = max(len(r) for _, r in items)
    ids = torch.full((len(items), width + ref_width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(items), ref_width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, reference) in enumerate(items):
        ids[row, width - len(prompt):width], mask[row, width - len(prompt):width] = torch.tensor(prompt), 1
        ids[row, width:width + len(reference)], mask[row, width:width + len(reference)] = torch.tensor(reference), 1
        labels[row, :len(reference)] = torch.tensor(reference)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                    use_cache=True, logits_to_keep=ref_width + 1)
        # logits[:, j] predicts position width + j: j < ref_width scores the reference, j = 0 is also
        # the first generated token.
        logits = out.logits
        rows_nll = _reference_nll_rows(logits, labels.to(device), items)
        cache = out.past_key_values
        if not _plain_cache(cache):  # a sliding-window or recurrent cache cannot be cut back: generate apart
            return _generate(model, tokenizer, items, max_new_tokens), rows_nll
        cache.crop(-ref_width)
        first = logits[:, 0].float().argmax(-1)
        del out, logits
        return _decode(model, cache, first, mask[:, :width].to(device), eos, max_new_tokens), rows_nll


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


def _decode(model, cache, current, mask, eos: int, max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens per row from the prompt's cache; a row that emits `eos` leaves the batch."""
    import torch

    tokens: list[list[int]] = [[] for _ in range(len(current))]
    alive = torch.arange(len(current))
    position = mask.sum(dim=1)  # the next position of each row: its real prompt tokens
    for step in range(max_new_tokens):
        for row, token in zip(alive.tolist(), current.tolist()):
            tokens[row].append(token)
        going = current != eos
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            alive, mask, position, current = alive[keep.cpu()], mask[keep], position[keep], current[keep]
        mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
        out = model(input_ids=current[:, None], attention_mask=mask, position_ids=position[:, None],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache, current, position = out.past_key_values, out.logits[:, -1].float().argmax(-1), position + 1
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
