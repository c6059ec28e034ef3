"""The evaluate stage's pieces: few-shot prompts, the overfitting check, the report, the general text."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from ftpipe.comparison import comparison_table
from ftpipe.errors import PipelineError
from ftpipe.evaluation import pick_shots, with_shots
from ftpipe.params import EvaluateParams
from stages.evaluate import training_check

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
         for i in range(20)]


def test_few_shot_examples_are_a_seeded_draw_shown_as_earlier_turns():
    shots = pick_shots(TRAIN, k=3, seed=7)
    assert shots == pick_shots(TRAIN, k=3, seed=7) and len({s["id"] for s in shots}) == 3
    assert shots != pick_shots(TRAIN, k=3, seed=8)
    test = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q?"},
            {"role": "assistant", "content": "ref"}]
    prompt = with_shots(test, shots)
    assert prompt[0] == test[0] and prompt[-2:] == test[1:]
    assert [m["role"] for m in prompt[1:-2]] == ["user", "assistant"] * 3
    assert [m["content"] for m in prompt[1:-2:2]] == [s["messages"][0]["content"] for s in shots]
    with pytest.raises(PipelineError, match="evaluate.few_shot_k: 21 exceeds the 20 training rows"):
        pick_shots(TRAIN, k=21, seed=0)


def test_overfitting_verdict_uses_the_margin():
    train = {"train_loss_final": 0.5, "val_loss_final": 1.10, "val_loss_best": 1.0, "best_step": 40,
             "train_val_gap": 0.6, "steps": 100}
    assert training_check(train, margin=0.05)["possible_overfitting"]
    assert not training_check(train, margin=0.2)["possible_overfitting"]
    assert training_check({}, margin=0.05) == {}


def test_report_lines_up_three_candidates_and_says_overfitting():
    block = {"bleu": 1.0, "rouge1": 0.1, "rouge2": 0.0, "rougeL": 0.1, "rougeLsum": 0.1, "perplexity": 30.0,
             "general_perplexity": 20.0}
    result = {"examples": 5, "base": block, "fewshot": {**block, "rougeL": 0.15},
              "finetuned": {**block, "rougeL": 0.3, "general_perplexity": 22.0}, "forgetting": 0.1,
              "general_text": {"path": "g.txt", "tokens": 900}, "few_shot_ids": ["t1", "t2"], "bleu_signature": "sig",
              "training": training_check({"val_loss_final": 1.2, "val_loss_best": 1.0, "best_step": 40, "steps": 60,
                                          "train_val_gap": 0.4}, margin=0.05)}
    table = comparison_table(result)
    assert "| metric | base | base few-shot | fine-tuned | fine-tuned vs base |" in table
    assert "| rougeL | 0.1 | 0.15 | 0.3 | +0.2 better |" in table
    assert "| general_perplexity | 20 | 20 | 22 | +2 worse |" in table
    # With the intervals of fine-tuned - base (perplexity's gain turned back into the column's direction).
    interval = {"confidence": 0.95, "examples": 5, "samples": 2000, "method": "BCa"}
    result["intervals"] = {"finetuned_vs_base": {
        "rougeL": {**interval, "metric": "rougeL", "estimate": 0.2, "low": 0.15, "high": 0.25},
        "perplexity": {**interval, "metric": "perplexity", "estimate": 0.0, "low": -1.5, "high": 2.0}}}
    table = comparison_table(result)
    assert "| metric | base | base few-shot | fine-tuned | fine-tuned vs base | 95 % CI |" in table
    assert "| rougeL | 0.1 | 0.15 | 0.3 | +0.2 better | [+0.15, +0.25] |" in table
    assert "| perplexity | 30 | 30 | 30 | +0 same | [-2, +1.5] |" in table
    assert "| general_perplexity | 20 | 20 | 22 | +2 worse |  |" in table
    assert "95 % CI: paired bootstrap of fine-tuned - base over the 5 test examples (BCa, 2000 resamples)" in table
    assert "general-text perplexity +10.0% after fine-tuning (900 tokens of g.txt" in table
    assert "best 1 at step 40 of 60" in table and "**Possible overfitting**" in table


def test_shipped_general_text_is_the_default_and_not_in_the_training_corpus():
    from ftpipe.cleaning import ngrams

    path = ROOT / EvaluateParams().general_text
    text = path.read_text(encoding="utf-8")
    assert 5_000 <= len(text.encode()) <= 15_000
    corpus = Path(importlib.util.find_spec("chatterbot_corpus").submodule_search_locations[0]) / "data" / "english"
    training = "\n".join(p.read_text(encoding="utf-8") for p in sorted(corpus.glob("*.yml")))
    assert not ngrams(text, 8) & ngrams(training, 8)
    # setuptools ships it with the package.
    assert re.search(r'ftpipe = \[[^\]]*"assets/\*\.txt"', (ROOT / "pyproject.toml").read_text())


def test_a_stride_as_long_as_the_window_is_refused_naming_its_line(tmp_path):
    from ftpipe.params import load_stage_params

    path = tmp_path / "params.yaml"
    path.write_text("evaluate:\n  general_max_length: 64\n  general_stride: 64\n")
    with pytest.raises(PipelineError, match=r":3: evaluate.general_stride: must be < general_max_length \(64\)"):
        load_stage_params("evaluate", path)
