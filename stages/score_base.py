"""The base model's two candidates, zero-shot and few-shot, scored on the test split once.

A stage of its own so that a change of a training param (every trial of a search) reruns evaluate, not this.
Scoring is ftpipe.scoring.score_model's, as for every candidate, plus the forgetting check's base reference.
Reads params.yaml `evaluate` (all but overfit_margin) and `inference`, models/base/, data/prepared/{train,test}.jsonl,
the general text; writes reports/base_scores.json (settings, test ids, scores), which evaluate checks first.
Run: python -m stages.score_base
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.device import Placement
from ftpipe.errors import run_cli
from ftpipe.evaluation import (
    BASE_CANDIDATES,
    general_perplexity,
    general_text,
    pick_shots,
    rows_digest,
    settings,
    test_rows,
    with_shots,
)
from ftpipe.io import read_jsonl, write_json
from ftpipe.params import EvaluateParams, load_section
from ftpipe.paths import BASE_DIR, BASE_SCORES, PREPARED_DIR, split_file


def run(*, params: EvaluateParams, base_dir: Path, data_dir: Path, out: Path,
        placement: Placement | None = None) -> dict[str, Any]:
    """Score the base model zero-shot and few-shot; write and return the base scores."""
    from ftpipe import metrics, models, scoring

    placement = placement or Placement("cpu", "fp32")
    models.set_threads(params.threads)
    rows, text = test_rows(params, data_dir), general_text(params)
    shots = pick_shots(read_jsonl(data_dir / split_file("train")), k=params.few_shot_k, seed=params.few_shot_seed)
    scorers = metrics.user_scorers(params.metrics)  # a broken scorer stops before the model loads
    tokenizer = models.load_tokenizer(base_dir)
    model = models.load_model(base_dir, placement=placement)
    conversations = {"base": [r["messages"] for r in rows],
                     "fewshot": [with_shots(r["messages"], shots) for r in rows]}
    candidates = {}
    for name, label in zip(BASE_CANDIDATES, ("base", "base few-shot")):
        block, outputs, examples = scoring.score_model(
            model, tokenizer, conversations[name], max_new_tokens=params.max_new_tokens,
            batch_size=params.batch_size, stemmer=params.rouge_stemmer, name=label, metrics=params.metrics,
            scorers=scorers)
        candidates[name] = {"scores": block, "outputs": outputs, "examples": examples}
    perplexity, tokens = general_perplexity(model, tokenizer, text, params, "base")
    result = {"settings": settings(params, placement), "test_ids": [r["id"] for r in rows],
              "test_rows_sha256": rows_digest(rows),
              "few_shot_ids": [s["id"] for s in shots], "general": {"perplexity": perplexity, "tokens": tokens},
              "candidates": candidates}
    write_json(out, result)
    return result


def main() -> None:
    from ftpipe import device

    params = load_section("evaluate", EvaluateParams)
    placement = device.inference()
    print(f"score_base: the base model on {placement}", flush=True)
    result = run(params=params, base_dir=BASE_DIR, data_dir=PREPARED_DIR, out=BASE_SCORES, placement=placement)
    for name in BASE_CANDIDATES:
        scores = result["candidates"][name]["scores"]
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))


if __name__ == "__main__":
    run_cli(main)
