"""Base vs fine-tuned on the test split: BLEU, ROUGE-1/2/L/Lsum and perplexity of the references.

Both models get the same chat-formatted prompts and the same greedy generation settings.
Reads params.yaml `evaluate`, models/base/, models/adapter/, data/prepared/test.jsonl; writes
reports/metrics.json (DVC metrics, base and fine-tuned side by side), reports/generations.jsonl
(prompt, reference and both outputs per example) and reports/comparison.md.
Run: python -m stages.evaluate
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import dumps_jsonl, read_jsonl, write_json, write_text
from ftpipe.params import EvaluateParams, load_section

BASE_DIR = Path("models/base")
ADAPTER_DIR = Path("models/adapter")
TEST_FILE = Path("data/prepared/test.jsonl")
REPORTS = Path("reports")


def _evaluate_model(model, tokenizer, rows, params: EvaluateParams, name: str) -> tuple[dict[str, Any], list[str]]:
    from ftpipe import metrics
    from ftpipe.chat import prompt_text, reference_of

    prompts = [prompt_text(tokenizer, r["messages"]) for r in rows]
    references = [reference_of(r) for r in rows]
    outputs = metrics.generate(model, tokenizer, prompts, max_new_tokens=params.max_new_tokens,
                               batch_size=params.batch_size, progress=f"generate ({name})")
    ppl = metrics.response_perplexity(model, tokenizer, [r["messages"] for r in rows], batch_size=params.batch_size)
    return metrics.score(outputs, references, stemmer=params.rouge_stemmer, perplexity=ppl), outputs


def run(*, params: EvaluateParams, base_dir: Path, adapter_dir: Path, test_file: Path, reports_dir: Path) -> dict[str, Any]:
    from ftpipe import metrics, models
    from ftpipe.chat import prompt_text, reference_of

    models.set_threads(params.threads)
    rows = read_jsonl(test_file)
    if params.max_examples:
        rows = rows[: params.max_examples]
    if not rows:
        raise PipelineError(f"{test_file}: no test rows to evaluate")
    if not models.has_finetuned(adapter_dir):
        raise PipelineError(f"{adapter_dir}: no fine-tuned model found (run the train stage first)")
    tokenizer = models.load_tokenizer(base_dir)

    base = models.load_model(base_dir)
    base_scores, base_out = _evaluate_model(base, tokenizer, rows, params, "base")
    del base
    tuned = models.load_finetuned(base_dir, adapter_dir)
    tuned_scores, tuned_out = _evaluate_model(tuned, tokenizer, rows, params, "fine-tuned")

    references = [reference_of(r) for r in rows]
    _, signature = metrics.bleu(tuned_out, references)
    per_base = metrics.rouge_per_example(base_out, references, stemmer=params.rouge_stemmer)
    per_tuned = metrics.rouge_per_example(tuned_out, references, stemmer=params.rouge_stemmer)
    result = {
        "examples": len(rows),
        "base": base_scores,
        "finetuned": tuned_scores,
        "delta": {k: tuned_scores[k] - base_scores[k] for k in metrics.METRIC_KEYS},
        "bleu_signature": signature,
        # The resolved settings travel with the numbers (and make register rerun when they change).
        "settings": {"decoding": "greedy", **params.model_dump(exclude={"threads"})},
    }
    generations = [
        {"id": r["id"], "prompt": prompt_text(tokenizer, r["messages"]), "reference": ref, "base": b, "finetuned": t,
         "rougeL_base": pb["rougeL"], "rougeL_finetuned": pt["rougeL"]}
        for r, ref, b, t, pb, pt in zip(rows, references, base_out, tuned_out, per_base, per_tuned)
    ]
    write_text(reports_dir / "generations.jsonl", dumps_jsonl(generations))
    write_text(reports_dir / "comparison.md", comparison_table(result))
    write_json(reports_dir / "metrics.json", result)
    return result


def comparison_rows(result: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(metric, base, fine-tuned, fine-tuned is better) per metric; perplexity is better when lower."""
    from ftpipe.metrics import METRIC_KEYS, gain

    rows = []
    for key in METRIC_KEYS:
        b, t = result["base"][key], result["finetuned"][key]
        rows.append((key, b, t, gain(key, t, b) > 0))
    return rows


def comparison_table(result: dict[str, Any]) -> str:
    """Markdown table of base vs fine-tuned."""
    lines = ["| metric | base | fine-tuned | change |", "|---|---:|---:|---:|"]
    for key, b, t, better in comparison_rows(result):
        lines.append(f"| {key} | {b:.4g} | {t:.4g} | {t - b:+.4g} {'better' if better else 'worse'} |")
    return "\n".join(lines) + f"\n\n{result['examples']} test examples; BLEU {result['bleu_signature']}\n"


def main() -> None:
    params = load_section("evaluate", EvaluateParams)
    result = run(params=params, base_dir=BASE_DIR, adapter_dir=ADAPTER_DIR, test_file=TEST_FILE, reports_dir=REPORTS)
    print(comparison_table(result))


if __name__ == "__main__":
    run_cli(main)
