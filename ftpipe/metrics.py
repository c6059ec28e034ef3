"""Text metrics by their reference libraries, batched greedy generation and perplexities.

BLEU, chrF: sacrebleu corpus scores (0-100). ROUGE: rouge-score F1 (0-1), mean over examples. Exact match.
Perplexity: exp of the token-weighted mean NLL of the reference reply given the prompt. User scorers
`module:function(reply, reference)`, higher is better, mean over examples. General perplexity: strided
sliding-window perplexity of a long text (the forgetting check). `per_example`: the per-row scores, with
summed NLL and token counts, that the paired bootstrap (ftpipe/significance.py) resamples.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ftpipe.errors import PipelineError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ftpipe.choices import BUILTIN_METRICS as METRIC_KEYS
from ftpipe.choices import load_scorer, metric_key

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# The forgetting check: perplexity on general text the model was not fine-tuned on.
GENERAL_KEY = "general_perplexity"
# Share of replies that ran to max_new_tokens without ending (reported beside the metrics, not gated).
CAPPED_KEY = "capped_share"
CANDIDATE_KEYS = (*METRIC_KEYS, GENERAL_KEY)
LOWER_IS_BETTER = {"perplexity", GENERAL_KEY}
# Each test example's scores (per_example), kept per candidate in reports/generations.jsonl as
# `<key>_<candidate>`: what the promotion gate resamples (user metrics add their own keys).
EXAMPLE_KEYS = ("bleu", "chrf", *ROUGE_KEYS, "exact_match", "nll", "tokens")


def user_scorers(specs: Sequence[str]) -> dict[str, Callable[[str, str], float]]:
    return {metric_key(spec): load_scorer(spec) for spec in specs if spec not in METRIC_KEYS}


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


def sentence_bleu(predictions: list[str], references: list[str]) -> list[float]:
    """sacrebleu's sentence-level BLEU (0-100, its default exp smoothing) of each prediction.
    Corpus BLEU is no mean of these: the gate's bleu is their mean, the reported one stays corpus BLEU."""
    import sacrebleu

    return [sacrebleu.sentence_bleu(pred, [ref]).score for pred, ref in zip(predictions, references)]


def sentence_chrf(predictions: list[str], references: list[str]) -> list[float]:
    import sacrebleu

    metric = sacrebleu.metrics.CHRF()
    return [metric.sentence_score(pred, [ref]).score for pred, ref in zip(predictions, references)]


def exact_matches(predictions: list[str], references: list[str]) -> list[float]:
    """1.0 where the reply is its reference (whitespace runs collapsed, case kept), else 0.0."""
    same = lambda a, b: " ".join(a.split()) == " ".join(b.split())  # noqa: E731
    return [float(same(pred, ref)) for pred, ref in zip(predictions, references)]


def per_example(predictions: list[str], references: list[str], *, stemmer: bool,
                nll: list[tuple[float, int]], metrics: Sequence[str] = METRIC_KEYS,
                scorers: dict[str, Callable[[str, str], float]] | None = None) -> list[dict[str, float]]:
    """Each example's score on every metric of `metrics` (BLEU and chrF sentence-level, the user
    `scorers` by their key), and its reference's summed NLL (`nll`) and token count (`tokens`)."""
    keys = [metric_key(m) for m in metrics]
    columns: dict[str, list[float]] = {}
    if "bleu" in keys:
        columns["bleu"] = sentence_bleu(predictions, references)
    if "chrf" in keys:
        columns["chrf"] = sentence_chrf(predictions, references)
    if any(k in ROUGE_KEYS for k in keys):
        rouges = rouge_per_example(predictions, references, stemmer=stemmer)
        columns.update({k: [r[k] for r in rouges] for k in ROUGE_KEYS if k in keys})
    if "exact_match" in keys:
        columns["exact_match"] = exact_matches(predictions, references)
    for key, scorer in (scorers or {}).items():
        columns[key] = [_user_score(key, scorer, pred, ref, i) for i, (pred, ref) in enumerate(zip(predictions,
                                                                                                  references))]
    return [{**{k: column[i] for k, column in columns.items()}, "nll": n, "tokens": t}
            for i, (n, t) in enumerate(nll)]


def _user_score(key: str, scorer, reply: str, reference: str, index: int) -> float:
    try:
        value = scorer(reply, reference)
    except Exception as exc:
        raise PipelineError(f"evaluate.metrics: {key} failed on test example {index} "
                            f"({type(exc).__name__}: {exc})") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PipelineError(f"evaluate.metrics: {key} returned {value!r} for test example {index}: "
                            "a scorer returns a finite number")
    return float(value)


def agreement(tokenizer, reference: list[str], outputs: list[str]) -> tuple[float, float]:
    """(share of outputs identical to the reference's, share of token positions that agree).

    Token agreement compares position by position over the longer of the two outputs, pooled over
    prompts, so an early divergence costs every later token.
    """
    exact = sum(a == b for a, b in zip(reference, outputs)) / len(reference)
    matched = total = 0
    for a, b in zip(reference, outputs):
        ids_a, ids_b = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (a, b))
        matched += sum(x == y for x, y in zip(ids_a, ids_b))
        total += max(len(ids_a), len(ids_b))
    return exact, matched / total if total else 1.0


def perplexity_of(nll: list[tuple[float, int]]) -> float:
    """exp(summed NLL / summed tokens) over (NLL sum, token count) pairs."""
    return math.exp(sum(n for n, _ in nll) / sum(t for _, t in nll))


def aggregate(predictions: list[str], references: list[str], rows: list[dict[str, float]],
              metrics: Sequence[str] = METRIC_KEYS) -> dict[str, float]:
    """The candidate's metric block from its outputs and per_example rows: corpus BLEU and chrF,
    perplexity as the ratio of sums, the mean of every other metric."""
    import sacrebleu

    block = {}
    for key in (metric_key(m) for m in metrics):
        if key == "bleu":
            block[key] = bleu(predictions, references)[0]
        elif key == "chrf":
            block[key] = sacrebleu.metrics.CHRF().corpus_score(predictions, [references]).score
        elif key == "perplexity":
            block[key] = perplexity_of([(r["nll"], r["tokens"]) for r in rows])
        else:
            block[key] = sum(r[key] for r in rows) / len(rows)
    return block


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
    """exp(sum of NLL over reference tokens / number of reference tokens).

    The reference is each conversation's final assistant turn; earlier assistant turns (of the
    conversation itself or of few-shot examples) are context, so every candidate scores the same tokens.
    """
    return perplexity_of(response_nll(model, tokenizer, conversations, batch_size=batch_size))


def response_nll(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: list[list[dict[str, str]]],
    *,
    batch_size: int,
) -> list[tuple[float, int]]:
    """(summed NLL, token count) of each conversation's reference (its final assistant turn)."""
    import torch

    from ftpipe.chat import IGNORE_INDEX

    items = [reference_labels(tokenizer, messages) for messages in conversations]
    rows: list[tuple[float, int]] = []
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
        rows += nll_rows(logits.cpu(), labels)
    return rows


def reference_labels(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> dict[str, list[int]]:
    """chat.encode's input_ids, with labels kept only on the final assistant turn."""
    from ftpipe.chat import IGNORE_INDEX, encode, render

    item = encode(tokenizer, messages)
    # encode tokenizes turn by turn, so the final turn's tokens are the last `n` of input_ids.
    answer = render(tokenizer, messages, generation_prompt=False)[len(render(tokenizer, messages[:-1],
                                                                            generation_prompt=True)):]
    n = len(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return {"input_ids": item["input_ids"], "labels": [IGNORE_INDEX] * (len(item["labels"]) - n) + item["labels"][-n:]}


def _nll_sum(logits, labels) -> tuple[float, int]:
    """(summed NLL, number of scored tokens) of next-token predictions; labels not shifted yet."""
    import torch

    from ftpipe.chat import IGNORE_INDEX

    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return nll.item(), int((shift_labels != IGNORE_INDEX).sum())


def nll_rows(logits, labels) -> list[tuple[float, int]]:
    """_nll_sum per row of the batch (padding carries IGNORE_INDEX labels, so it adds nothing)."""
    import torch

    from ftpipe.chat import IGNORE_INDEX

    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX, reduction="none",
    )
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return [(float(n), int(c)) for n, c in zip(nll.double().sum(dim=1), counts)]


def sliding_window_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    *,
    max_length: int,
    stride: int,
    progress: str | None = None,
) -> tuple[float, int]:
    """(perplexity, number of tokens) of a long text under a fixed context window.

    The strided loop of the transformers guide "Perplexity of fixed-length models": a window of
    `max_length` tokens starts every `stride` tokens and scores only the tokens no earlier window
    scored, so each token is predicted once, with at least `max_length - stride` tokens of context
    once past the first window. The mean is over the tokens actually scored (the guide's
    `num_valid_tokens - batch_size` count is exact only for the first window).
    """
    import torch
    from tqdm import tqdm

    from ftpipe.chat import IGNORE_INDEX

    if not 0 < stride < max_length:
        # stride == max_length leaves each window's first token without a prediction.
        raise ValueError(f"stride {stride} must be in 1..max_length - 1 ({max_length - 1}), or tokens go unscored")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    seq_len = ids.shape[1]
    if seq_len < 2:
        raise ValueError("general text: needs at least two tokens")
    total_nll, total_tokens, scored_until = 0.0, 0, 0
    starts = range(0, seq_len, stride)
    for begin in tqdm(starts, desc=progress, disable=progress is None):
        end = min(begin + max_length, seq_len)
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, : scored_until - begin] = IGNORE_INDEX  # already scored by an earlier window
        with torch.inference_mode():
            # [-width:] drops the logits of prompt/p-tuning virtual tokens, if any.
            logits = model(input_ids=window.to(model.device)).logits[:, -window.shape[1]:].float().cpu()
        nll, count = _nll_sum(logits, labels)
        total_nll, total_tokens, scored_until = total_nll + nll, total_tokens + count, end
        if end == seq_len:
            break
    return math.exp(total_nll / total_tokens), seq_len

