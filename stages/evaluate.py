"""Fine-tuned (and DPO) models against the base model's zero-shot and few-shot scores on the test split.

Paired-bootstrap intervals on every metric (the promotion gate's settings), forgetting (general-text perplexity),
overfitting (reports/train.json) and, for a continual fine-tune, the old task (models/parent/). The base scores
come from score_base and are refused if scored with other settings or on another test split.
Reads params.yaml `evaluate`, register.bootstrap_samples/confidence/bootstrap_seed, dpo.enabled, models/,
data/prepared/, reports/{base_scores,train}.json; writes reports/metrics.json, generations.jsonl, comparison.md.
Run: python -m stages.evaluate
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftpipe.comparison import comparison_table
from ftpipe.device import Placement
from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, dumps_jsonl, read_jsonl, write_text
from ftpipe.params import DpoParams, EvaluateParams, RegisterParams, load_section
from ftpipe.paths import (
    ADAPTER_DIR,
    BASE_DIR,
    BASE_SCORES,
    COMPARISON,
    DPO_DIR,
    GENERATIONS,
    METRICS,
    PARENT_DIR,
    PARENT_OLD_TEST,
    PREPARED_DIR,
    REPORTS,
    TRAIN_REPORT,
    split_file,
)
from ftpipe.schemas import MetricsReport, OldTask, TrainReport

CANDIDATES = {"base": "base", "fewshot": "base few-shot", "finetuned": "fine-tuned", "dpo": "DPO"}  # key -> label


def _candidate(model, tokenizer, conversations, params: EvaluateParams, name: str, scorers):
    """(metric block, outputs, per-example scores) of one model on the test conversations."""
    from ftpipe import scoring

    return scoring.score_model(model, tokenizer, conversations, max_new_tokens=params.max_new_tokens,
                               batch_size=params.batch_size, stemmer=params.rouge_stemmer, name=name,
                               metrics=params.metrics, scorers=scorers)


def intervals_over_base(rows: dict[str, list[dict[str, float]]], bootstrap: RegisterParams,
                        candidate: str, keys: list[str]) -> dict[str, Any]:
    """{metric: interval dict} of `candidate` - base (the gain: base - candidate for perplexity)."""
    from ftpipe.significance import paired_gain

    found = {}
    for key in keys:
        interval = paired_gain(key, rows[candidate], rows["base"], samples=bootstrap.bootstrap_samples,
                               confidence=bootstrap.confidence, seed=bootstrap.bootstrap_seed)
        if interval is not None:
            found[key] = interval.as_dict()
    return found


def training_check(train: dict[str, Any], *, margin: float) -> dict[str, Any]:
    """Validation-loss facts of reports/train.json and whether they suggest overfitting."""
    keys = ("train_loss_final", "val_loss_final", "val_loss_best", "best_step", "train_val_gap", "steps")
    facts = {k: train[k] for k in keys if train.get(k) is not None}
    if "val_loss_final" in facts and "val_loss_best" in facts:
        facts["val_loss_above_best"] = facts["val_loss_final"] - facts["val_loss_best"]
        facts["possible_overfitting"] = facts["val_loss_above_best"] > margin * facts["val_loss_best"]
    return facts


def _score_tuned(params: EvaluateParams, tokenizer, conversations: list, text: str, scorers, *,
                 placement: Placement, base_dir: Path, adapter_dir: Path, seen_rows: list,
                 dpo_dir: Path | None = None, parent_dir: Path | None = None,
                 parent_version: str | None = None) -> tuple[dict, dict, dict, dict, OldTask | None]:
    """Fine-tuned and (with `dpo_dir`) DPO, one model load each: (scores, outputs, per-example
    scores, general perplexity, the old-task check of the last of them when a parent champion's
    test split is at hand)."""
    from ftpipe import models
    from ftpipe.evaluation import general_perplexity

    scores, outputs, examples, general = {}, {}, {}, {}
    tuned = {"finetuned": lambda: models.load_finetuned(base_dir, adapter_dir, placement)}
    if dpo_dir:
        tuned["dpo"] = lambda: models.load_model(dpo_dir / models.MERGED, placement=placement)
    for name, load in tuned.items():
        model = load()
        scores[name], outputs[name], examples[name] = _candidate(model, tokenizer, conversations, params,
                                                                 CANDIDATES[name], scorers)
        general[name], _ = general_perplexity(model, tokenizer, text, params, CANDIDATES[name])
    # The old task is checked on the model register registers (the last one scored).
    old_task = (_old_task(params, tokenizer, model, parent_dir, parent_version, seen_rows, placement, scorers)
                if parent_dir and parent_version else None)
    return scores, outputs, examples, general, old_task


def _old_task(params: EvaluateParams, tokenizer, tuned, parent_dir: Path, version: str,
              seen_rows: list, placement: Placement, scorers) -> OldTask | None:
    """Catastrophic forgetting of the previous task: the fine-tuned model and the parent champion
    it started from (v`version`, reports/train.json), both on the test split the parent was
    evaluated on (models/parent/test.jsonl; None when its run did not log one). Old test rows whose
    prompt (normalized) is now in the train or val split (`seen_rows`) are left out: new data holding
    them would flatter the fine-tuned model's score on the old task."""
    from ftpipe import models
    from ftpipe.cleaning import norm_key
    from ftpipe.leaks import prompt_of

    parent = models.read_parent(parent_dir)
    if str(parent.get("version")) != version:
        raise PipelineError(f"{parent_dir}: holds v{parent.get('version')}, but the model was trained from v{version} "
                            "(rerun `dvc repro`)")
    old_file = parent_dir / PARENT_OLD_TEST
    if not old_file.is_file():
        return None
    seen = {norm_key(prompt_of(r)) for r in seen_rows}
    every = read_jsonl(old_file)
    unseen = [r for r in every if norm_key(prompt_of(r)) not in seen]
    rows = unseen[: params.max_examples or None]
    described = f"{parent['model_name']} v{parent['version']}"
    if not rows:  # every old test row is trained on now: nothing left to measure the old task on
        return OldTask(parent=described, examples=0, left_out_seen=len(every), parent_scores={}, finetuned={})
    old = [r["messages"] for r in rows]
    tuned_scores, _, _ = _candidate(tuned, tokenizer, old, params, "fine-tuned, old task", scorers)
    parent_scores, _, _ = _candidate(models.load_model(parent_dir, placement=placement), tokenizer, old, params,
                                     "parent, old task", scorers)
    return OldTask(parent=described, examples=len(rows),
                   left_out_seen=len(every) - len(unseen),
                   parent_scores=parent_scores, finetuned=tuned_scores)


def run(*, params: EvaluateParams, bootstrap: RegisterParams, base_dir: Path, adapter_dir: Path, data_dir: Path,
        train_report: Path, general_text: Path, reports_dir: Path, base_scores_file: Path | None = None,
        parent_dir: Path | None = None, dpo_dir: Path | None = None,
        placement: Placement | None = None) -> MetricsReport:
    """`base_scores_file`: score_base's report (default: reports_dir/base_scores.json). `dpo_dir`: the
    dpo stage's model folder (models/dpo), scored as one more candidate; None: dpo off.
    `placement`: where and in what precision the models run (ftpipe.device); None: the CPU in fp32,
    the same numbers on every machine."""

    from ftpipe import metrics, models
    from ftpipe.chat import prompt_text
    from ftpipe.evaluation import BASE_CANDIDATES, read_base_scores, settings, test_rows
    from ftpipe.evaluation import general_text as read_general

    placement = placement or Placement("cpu", "fp32")
    models.set_threads(params.threads)
    rows = test_rows(params, data_dir)
    found = read_base_scores(base_scores_file or reports_dir / BASE_SCORES.name, params, placement, rows)
    if not models.has_finetuned(adapter_dir):
        raise PipelineError(f"{adapter_dir}: no fine-tuned model found (run the train stage first)")
    text = read_general(params.model_copy(update={"general_text": str(general_text)}))
    scorers = metrics.user_scorers(params.metrics)
    train = TrainReport.read(train_report).model_dump() if train_report.is_file() else {}
    parent_version = train.get("parent_version")
    # What the model trained and was validated on: read only for a continual fine-tune's old-task check.
    seen_rows = (read_jsonl(data_dir / split_file("train")) + read_jsonl(data_dir / split_file("val"))) if parent_version else []
    training = training_check(train, margin=params.overfit_margin)
    tokenizer = models.load_tokenizer(base_dir)
    conversations = [r["messages"] for r in rows]
    scores, outputs, examples, general, old_task = _score_tuned(
        params, tokenizer, conversations, text, scorers, placement=placement, base_dir=base_dir,
        adapter_dir=adapter_dir, seen_rows=seen_rows, dpo_dir=dpo_dir, parent_dir=parent_dir,
        parent_version=parent_version)
    for name in BASE_CANDIDATES:
        candidate = found["candidates"][name]
        scores[name], outputs[name], examples[name] = candidate["scores"], candidate["outputs"], candidate["examples"]
        general[name] = found["general"]["perplexity"]  # the same weights: prompting does not change them
    names = [name for name in CANDIDATES if name in scores]
    for name in names:
        scores[name][metrics.GENERAL_KEY] = general[name]
    keys = [metrics.metric_key(m) for m in params.metrics]

    references = [c[-1]["content"] for c in conversations]
    _, signature = metrics.bleu(outputs["finetuned"], references)
    result = MetricsReport(**{
        "examples": len(rows),
        **{name: scores[name] for name in names},
        "delta": {k: scores["finetuned"][k] - scores["base"][k] for k in [*keys, metrics.GENERAL_KEY]},
        "forgetting": general[names[-1]] / general["base"] - 1,  # of the model register registers
        "training": training,
        "few_shot_ids": found["few_shot_ids"],
        "general_text": {"path": str(general_text), "tokens": found["general"]["tokens"]},
        "bleu_signature": signature,
        # fine-tuned - base with its paired-bootstrap interval per metric (gain: positive is better).
        "intervals": {f"{name}_vs_base": intervals_over_base(examples, bootstrap, name, keys)
                      for name in names if name in ("finetuned", "dpo")},
        # The resolved settings travel with the numbers (and make register rerun when they change);
        # register scores the champion with the same ones.
        "settings": {**settings(params, placement), "overfit_margin": params.overfit_margin},
        "old_task": old_task,
    })
    example_keys = [*keys, "nll", "tokens"]
    generations = [
        {"id": r["id"], "prompt": prompt_text(tokenizer, r["messages"]), "reference": references[i],
         **{name: outputs[name][i] for name in names},
         **{f"{key}_{name}": examples[name][i][key] for key in example_keys for name in names
            if key in examples[name][i]}}
        for i, r in enumerate(rows)
    ]
    with all_or_nothing():  # the three reports describe one evaluation
        write_text(reports_dir / GENERATIONS.name, dumps_jsonl(generations))
        write_text(reports_dir / COMPARISON.name, comparison_table(result.model_dump()))
        result.write(reports_dir / METRICS.name)
    return result


def main() -> None:
    from ftpipe import device, models

    params = load_section("evaluate", EvaluateParams)
    placement = device.inference()
    print(f"evaluate: models on {placement}", flush=True)
    bootstrap = load_section("register", RegisterParams)  # only its bootstrap settings (dvc.yaml lists them)
    dpo_dir = models.dpo_result(DPO_DIR, enabled=load_section("dpo", DpoParams).enabled)
    result = run(params=params, bootstrap=bootstrap, base_dir=BASE_DIR, adapter_dir=ADAPTER_DIR, data_dir=PREPARED_DIR,
                 train_report=TRAIN_REPORT, general_text=Path(params.general_text), reports_dir=REPORTS,
                 base_scores_file=BASE_SCORES, parent_dir=PARENT_DIR, dpo_dir=dpo_dir, placement=placement)
    print(comparison_table(result.model_dump()))


if __name__ == "__main__":
    run_cli(main)
