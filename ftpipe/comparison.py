"""The base vs fine-tuned comparison table of reports/metrics.json (evaluate writes it to
reports/comparison.md; the flows print it and publish it as a Prefect artifact)."""

from __future__ import annotations

from typing import Any


def metric_keys(result: dict[str, Any]) -> list[str]:
    """The report's metrics in order: evaluate.metrics' (user scorers by their key), then general_perplexity."""
    from ftpipe.metrics import CANDIDATE_KEYS, GENERAL_KEY, metric_key

    listed = (result.get("settings") or {}).get("metrics")
    if listed:
        return [*(metric_key(m) for m in listed), GENERAL_KEY]
    # A report from before evaluate.metrics: the built-in metrics it holds.
    return [k for k in CANDIDATE_KEYS if k in (result.get("base") or {})]


def comparison_rows(result: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(metric, base, fine-tuned, fine-tuned is better) per metric; perplexities are better when lower."""
    from ftpipe.metrics import gain

    rows = []
    for key in metric_keys(result):
        if key in result["base"] and key in result["finetuned"]:
            b, t = result["base"][key], result["finetuned"][key]
            rows.append((key, b, t, gain(key, t, b) > 0))
    return rows


def difference_interval(key: str, interval: dict[str, Any]) -> tuple[float, float]:
    """The gain's interval turned into one of fine-tuned - base, the comparison table's direction."""
    from ftpipe.metrics import LOWER_IS_BETTER

    return (-interval["high"], -interval["low"]) if key in LOWER_IS_BETTER else (interval["low"], interval["high"])


def _difference(key: str, new: float, base: float, intervals: dict[str, Any]) -> list[str]:
    """The two cells of a candidate vs base: the difference in words, and its interval."""
    from ftpipe.metrics import gain

    better = gain(key, new, base) > 0
    ci = ""
    if key in intervals:
        low, high = difference_interval(key, intervals[key])
        ci = f"[{low:+.4g}, {high:+.4g}]"
        if key == "bleu":  # its interval is of another statistic than the corpus BLEU beside it
            ci = f"mean sentence BLEU {intervals[key]['estimate']:+.4g} {ci}"
    return [f"{new - base:+.4g} {'better' if better else 'same' if new == base else 'worse'}", ci]


def comparison_table(result: dict[str, Any]) -> str:
    """Markdown: the candidates side by side with the interval of fine-tuned - base (and DPO - base),
    then the forgetting and overfitting checks."""
    intervals = result.get("intervals", {}).get("finetuned_vs_base", {})
    dpo, dpo_intervals = result.get("dpo"), result.get("intervals", {}).get("dpo_vs_base", {})
    any_interval = next(iter(intervals.values()), None)
    ci_label = f"{any_interval['confidence'] * 100:g} % CI" if any_interval else "CI"
    header = ["metric", "base", "base few-shot", "fine-tuned", *(["DPO"] if dpo else []), "fine-tuned vs base",
              ci_label, *(["DPO vs base", ci_label] if dpo else [])]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, b, t, _ in comparison_rows(result):
        fewshot = result.get("fewshot", {}).get(key)
        cells = [key, f"{b:.4g}", "" if fewshot is None else f"{fewshot:.4g}", f"{t:.4g}"]
        if dpo:
            cells.append(f"{dpo[key]:.4g}" if key in dpo else "")
        cells += _difference(key, t, b, intervals)
        if dpo:
            cells += _difference(key, dpo[key], b, dpo_intervals) if key in dpo else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + f"\n\n{result['examples']} test examples; BLEU {result['bleu_signature']}\n"
    text += _capped(result)
    if any_interval:
        text += (f"\n{ci_label}: paired bootstrap of fine-tuned - base over the {any_interval['examples']} test "
                 f"examples ({any_interval['method']}, {any_interval['samples']} resamples); bleu's is of the mean "
                 "sentence-level BLEU (corpus BLEU is no mean over examples). An interval that holds 0 is a "
                 "difference these examples cannot tell from noise. The promotion gate (register) reads the "
                 "gain (the difference, or base - fine-tuned for perplexities): the lower bound of its interval "
                 "on register.primary_metric must be above register.min_improvement, over the base and over "
                 "the champion.\n")
    if "forgetting" in result:
        text += (f"\nForgetting: general-text perplexity {result['forgetting']:+.1%} after fine-tuning"
                 f"{' and DPO' if dpo else ''} "
                 f"({result['general_text']['tokens']} tokens of {result['general_text']['path']}; "
                 "the few-shot baseline shares the base weights).\n")
    if result.get("old_task") and not result["old_task"]["examples"]:
        old = result["old_task"]
        text += (f"\nOld task: all {old['left_out_seen']} rows of the parent {old['parent']}'s test split are in "
                 "the current train or val split: not measured.\n")
    elif result.get("old_task"):
        old = result["old_task"]
        text += (f"\nOld task: the parent {old['parent']} and the {'DPO' if dpo else 'fine-tuned'} model on the "
                 "parent's own test split "
                 f"({old['examples']} examples"
                 + (f"; {old['left_out_seen']} left out, now in train or val" if old.get("left_out_seen") else "")
                 + "): "
                 + ", ".join(f"{k} {old['parent_scores'][k]:.4g} -> {old['finetuned'][k]:.4g}"
                             for k in old["finetuned"] if k in old["parent_scores"]) + ".\n")
    if result.get("few_shot_ids"):
        text += f"\nFew-shot examples (training rows): {', '.join(map(str, result['few_shot_ids']))}\n"
    training = result.get("training") or {}
    if "val_loss_final" in training:
        gap = training.get("train_val_gap")
        text += (f"\nTraining: final validation loss {training['val_loss_final']:.4g}, best "
                 f"{training['val_loss_best']:.4g} at step {training.get('best_step', '?')} of "
                 f"{training.get('steps', '?')}; train-validation gap {'?' if gap is None else f'{gap:.4g}'}.")
        margin = result.get("settings", {}).get("overfit_margin")
        text += (" **Possible overfitting**: the final validation loss is above its best by "
                 f"{training['val_loss_above_best']:.4g}"
                 + (f" (more than {margin:.0%} of it).\n" if margin is not None else ".\n")
                 if training["possible_overfitting"] else " No sign of overfitting.\n")
    return text


def _capped(result: dict[str, Any]) -> str:
    """The share of replies cut at max_new_tokens per candidate: a capped reply scores low on a long
    reference whatever its quality, so a gap here explains part of a gap in the metrics."""
    from ftpipe.metrics import CAPPED_KEY

    labels = {"base": "base", "fewshot": "base few-shot", "finetuned": "fine-tuned", "dpo": "DPO"}
    shares = [f"{label} {result[name][CAPPED_KEY]:.0%}" for name, label in labels.items()
              if (result.get(name) or {}).get(CAPPED_KEY) is not None]
    if not shares:
        return ""
    limit = (result.get("settings") or {}).get("max_new_tokens", "max_new_tokens")
    return f"\nReplies cut at {limit} new tokens (evaluate.max_new_tokens): {', '.join(shares)}.\n"
