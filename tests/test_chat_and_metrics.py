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

    preds = ["the cats were running\nfast", "hello there", "", "fast runs\nthe cat"]
    refs = ["the cat runs fast", "hello\nthere friend", "something", "the cat runs fast"]
    got = metrics.rouge(preds, refs, stemmer=stemmer)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=stemmer)
    for key in metrics.ROUGE_KEYS:
        expected = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(preds, refs)) / len(preds)
        assert got[key] == pytest.approx(expected), key
    assert metrics.rouge(preds, refs, stemmer=True)["rouge1"] != metrics.rouge(preds, refs, stemmer=False)["rouge1"]
    # Lsum splits sentences on newlines (so it differs from L here), and the mean is deterministic.
    assert got["rougeLsum"] != got["rougeL"]
    assert metrics.rouge(preds, refs, stemmer=stemmer) == got


def test_response_perplexity_scores_only_the_final_turn_token_weighted(model, tokenizer):
    import torch

    from ftpipe.evaluation import with_shots

    def reference(conversations):  # one at a time: prompt and reference tokenized apart, the model's own loss
        nll, count = 0.0, 0
        for messages in conversations:
            prompt = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
            full = render(tokenizer, messages, generation_prompt=False)
            answer = tokenizer(full[len(prompt_text(tokenizer, messages)):], add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                loss = model(input_ids=torch.tensor([prompt + answer]),
                             labels=torch.tensor([[IGNORE_INDEX] * len(prompt) + answer])).loss
            nll, count = nll + loss.item() * len(answer), count + len(answer)
        return math.exp(nll / count)

    conversations = [CONVERSATION[1:3], CONVERSATION]
    got = metrics.response_perplexity(model, tokenizer, conversations, batch_size=2)
    assert got == pytest.approx(reference(conversations), rel=1e-4)
    # Few-shot turns are context: only each conversation's own final answer is scored.
    shots = [{"messages": [{"role": "user", "content": "say one"}, {"role": "assistant", "content": "one"}]}]
    shot = [with_shots(c, shots) for c in conversations]
    assert metrics.response_perplexity(model, tokenizer, shot, batch_size=1) == pytest.approx(reference(shot), rel=1e-4)


def test_per_example_scores_add_up_to_the_reported_metrics(model, tokenizer):
    import sacrebleu

    conversations = [CONVERSATION[1:3], CONVERSATION, CONVERSATION[1:3]]
    nll = metrics.response_nll(model, tokenizer, conversations, batch_size=2)
    # Batched (with padding) as one at a time, and the ratio of their sums is the perplexity.
    alone = [metrics.response_nll(model, tokenizer, [c], batch_size=1)[0] for c in conversations]
    assert [t for _, t in nll] == [t for _, t in alone] and all(t > 0 for _, t in nll)
    assert [n for n, _ in nll] == pytest.approx([n for n, _ in alone], rel=1e-4)
    assert metrics.perplexity_of(nll) == pytest.approx(
        metrics.response_perplexity(model, tokenizer, conversations, batch_size=2), rel=1e-6)
    preds, refs = ["the cat runs fast", "hello", ""], ["the cat runs fast", "hello there friend", "something"]
    rows = metrics.per_example(preds, refs, stemmer=True, nll=nll)
    assert [r["bleu"] for r in rows] == [sacrebleu.sentence_bleu(p, [r]).score for p, r in zip(preds, refs)]
    assert rows[0]["bleu"] == pytest.approx(100) and rows[2]["bleu"] == 0
    assert [(r["nll"], r["tokens"]) for r in rows] == nll
    assert [r["chrf"] for r in rows] == [sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(preds, refs)]
    assert [r["exact_match"] for r in rows] == [1.0, 0.0, 0.0]
    block = metrics.aggregate(preds, refs, rows)
    assert block == {"bleu": metrics.bleu(preds, refs)[0], "chrf": sacrebleu.corpus_chrf(preds, [refs]).score,
                     **metrics.rouge(preds, refs, stemmer=True), "exact_match": 1 / 3,
                     "perplexity": metrics.perplexity_of(nll)}
    # Only the metrics asked for, a user scorer among them (its key: the function's name).
    rows = metrics.per_example(preds, refs, stemmer=True, nll=nll, metrics=["rougeL", "m:length"],
                               scorers={"length": lambda reply, reference: float(len(reply))})
    assert [set(r) for r in rows] == [{"rougeL", "length", "nll", "tokens"}] * 3
    assert metrics.aggregate(preds, refs, rows, ["rougeL", "m:length"])["length"] == pytest.approx(
        sum(map(len, preds)) / 3)


def documented_sliding_window_ppl(model, tokenizer, text, max_length, stride):
    """The loop of the transformers guide "Perplexity of fixed-length models", as written there,
    except the token count: it counts the labels the loss really averaged over (the guide's
    `num_valid_tokens - batch_size` undercounts every window after the first by one)."""
    import torch

    encodings = tokenizer(text, return_tensors="pt")
    seq_len = encodings.input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return torch.exp(nll_sum / n_tokens).item()


@pytest.mark.parametrize(("max_length", "stride"), [(32, 16), (32, 31), (40, 7), (500, 100)])
def test_sliding_window_perplexity_equals_the_documented_loop(model, tokenizer, max_length, stride):
    import torch

    text = " ".join(f"say {w} number {i}" for i, w in enumerate("red green blue cat dog bird hello world".split() * 4))
    got, tokens = metrics.sliding_window_perplexity(model, tokenizer, text, max_length=max_length, stride=stride)
    assert tokens == len(tokenizer(text)["input_ids"]) > 100
    assert got == pytest.approx(documented_sliding_window_ppl(model, tokenizer, text, max_length, stride), rel=1e-4)
    if max_length >= tokens:  # one window: the plain definition over the whole text
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            assert got == pytest.approx(math.exp(model(ids, labels=ids).loss.item()), rel=1e-4)


def test_sliding_window_rejects_a_stride_that_skips_tokens(model, tokenizer):
    for stride in (8, 9):  # at 8 each window's first token would have no prediction
        with pytest.raises(ValueError, match=f"stride {stride} must be in 1..max_length - 1"):
            metrics.sliding_window_perplexity(model, tokenizer, "say red blue", max_length=8, stride=stride)


def test_batched_generation_equals_one_at_a_time(talking_model):
    """On a model that answers in words (the random tiny one prints newlines only, which padding
    mistakes would leave unchanged): prompts of different lengths, left-padded in one batch."""
    from conftest import qa_rows

    model, tokenizer = models.load_model(talking_model / "merged"), models.load_tokenizer(talking_model / "merged")
    rows = qa_rows(3) + [{"prompt": "say red", "response": ""}]
    prompts = [prompt_text(tokenizer, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": ""}])
               for r in rows]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # the batch needs padding
    batched = metrics.generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=4)
    single = [metrics.generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert all(text.strip() for text in batched), batched  # words, not whitespace
    # The talking model learned the rows: its reply to a training prompt holds the reply's words.
    assert set(rows[0]["response"].split()) & set(batched[0].split()), (rows[0], batched[0])
