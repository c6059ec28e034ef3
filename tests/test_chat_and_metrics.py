"""Chat tokenization masks everything but assistant turns; metrics equal their reference libraries."""

from __future__ import annotations

import math

import pytest

from ftpipe import metrics, models
from ftpipe.chat import IGNORE_INDEX, encode, prompt_text, render

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "say red"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "say blue"},
    {"role": "assistant", "content": "blue dog"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return models.load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return models.load_model(tiny_model_dir)


def test_encode_labels_only_assistant_turns(tokenizer):
    item = encode(tokenizer, CONVERSATION)
    full = tokenizer(render(tokenizer, CONVERSATION, generation_prompt=False), add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(item["input_ids"]) == tokenizer.decode(full)
    learned = tokenizer.decode([t for t, lab in zip(item["input_ids"], item["labels"]) if lab != IGNORE_INDEX])
    assert learned == "red<|im_end|>\nblue dog<|im_end|>\n"
    assert all(lab in (IGNORE_INDEX, tok) for tok, lab in zip(item["input_ids"], item["labels"]))


def test_prompt_tokens_are_the_prefix_that_training_sees(tokenizer):
    messages = CONVERSATION[:3]
    item = encode(tokenizer, messages)
    prompt_ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
    assert item["input_ids"][: len(prompt_ids)] == prompt_ids
    assert item["labels"][len(prompt_ids)] != IGNORE_INDEX and item["labels"][len(prompt_ids) - 1] == IGNORE_INDEX


def test_bleu_equals_sacrebleu():
    import sacrebleu

    preds, refs = ["the cat sat on the mat", "a dog"], ["the cat is on the mat", "a big dog"]
    score, signature = metrics.bleu(preds, refs)
    assert score == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")


@pytest.mark.parametrize("stemmer", [True, False])
def test_rouge_equals_rouge_score_mean_f1(stemmer):
    from rouge_score import rouge_scorer

    preds = ["the cats were running\nfast", "hello there", ""]
    refs = ["the cat runs fast", "hello\nthere friend", "something"]
    got = metrics.rouge(preds, refs, stemmer=stemmer)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=stemmer)
    for key in metrics.ROUGE_KEYS:
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs)) / len(preds)
        assert got[key] == pytest.approx(expected), key
    assert metrics.rouge(preds, refs, stemmer=True)["rouge1"] != metrics.rouge(preds, refs, stemmer=False)["rouge1"]


def test_response_perplexity_is_token_weighted_over_responses(model, tokenizer):
    import torch

    conversations = [CONVERSATION[1:3], CONVERSATION]
    nll, count = 0.0, 0
    for messages in conversations:  # one at a time through the model's own loss (a mean over labels)
        item = encode(tokenizer, messages)
        n = sum(lab != IGNORE_INDEX for lab in item["labels"][1:])
        with torch.no_grad():
            loss = model(input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]])).loss
        nll, count = nll + loss.item() * n, count + n
    got = metrics.response_perplexity(model, tokenizer, conversations, batch_size=2)
    assert got == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_batched_generation_equals_one_at_a_time(model, tokenizer):
    prompts = [prompt_text(tokenizer, [{"role": "user", "content": c}, {"role": "assistant", "content": ""}])
               for c in ("say red", "say blue dog number seven", "hi")]
    batched = metrics.generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = [metrics.generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) for text in batched)
