"""Text metrics by their reference libraries, batched greedy generation and response perplexity.

BLEU: sacrebleu corpus BLEU (0-100). ROUGE: Google's rouge-score F1 (0-1), mean over examples,
no bootstrap; rougeLsum splits sentences on newlines, as rouge-score does. Perplexity: exp of
the token-weighted mean NLL over reference response tokens (the assistant turn and its
end-of-turn marker), given the prompt.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_KEYS = ("bleu", *ROUGE_KEYS, "perplexity")
LOWER_IS_BETTER = {"perplexity"}


def gain(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old` (positive: better), whichever way the metric points."""
    return old - new if metric in LOWER_IS_BETTER else new - old


def bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """(corpus BLEU, sacrebleu signature)."""
    import sacrebleu

    metric = sacrebleu.metrics.BLEU()
    score = metric.corpus_score(predictions, [references])
    return score.score, str(metric.get_signature())


def rouge_per_example(predictions: list[str], references: list[str], *, stemmer: bool) -> list[dict[str, float]]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=stemmer)
    return [{k: s.fmeasure for k, s in scorer.score(ref, pred).items()} for pred, ref in zip(predictions, references)]


def rouge(predictions: list[str], references: list[str], *, stemmer: bool) -> dict[str, float]:
    rows = rouge_per_example(predictions, references, stemmer=stemmer)
    return {k: sum(r[k] for r in rows) / len(rows) for k in ROUGE_KEYS}


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: str | None = None,
) -> list[str]:
    """Greedy completions of chat-formatted prompts, batched with left padding.

    Prompts are sorted by length so each batch pads little; results come back in input order.
    """
    import torch
    from tqdm import tqdm

    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str] = [""] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress, disable=progress is None):
        encoded = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(model.device)
        with torch.inference_mode():
            generated = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = generated[:, encoded["input_ids"].shape[1]:]
        for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            outputs[i] = text.strip()
    return outputs


def response_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    batch_size: int,
) -> float:
    """exp(sum of NLL over assistant tokens / number of assistant tokens)."""
    import torch

    from ftpipe.chat import IGNORE_INDEX, encode

    items = [encode(tokenizer, messages) for messages in conversations]
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        width = max(len(x["input_ids"]) for x in batch)
        pad = tokenizer.pad_token_id
        ids = torch.tensor([x["input_ids"] + [pad] * (width - len(x["input_ids"])) for x in batch])
        labels = torch.tensor([x["labels"] + [IGNORE_INDEX] * (width - len(x["labels"])) for x in batch])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(x["input_ids"]) for x in batch])[:, None]).long()
        with torch.inference_mode():
            logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        # Prompt/p-tuning models return logits for their virtual tokens first: keep the input's.
        logits = logits[:, -width:]
        shift_logits, shift_labels = logits[:, :-1].cpu(), labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += int((shift_labels != IGNORE_INDEX).sum())
    return math.exp(total_nll / total_tokens)


def score(
    predictions: list[str], references: list[str], *, stemmer: bool, perplexity: float
) -> dict[str, Any]:
    bleu_score, _ = bleu(predictions, references)
    return {"bleu": bleu_score, **rouge(predictions, references, stemmer=stemmer), "perplexity": perplexity}
