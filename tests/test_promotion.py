"""The promotion gate: a challenger better by a clear margin is promoted, one that differs only by
noise is not, the interval is scipy's paired bootstrap, and every check says why."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ftpipe.promotion import Scores, decide, gate_line
from ftpipe.schemas import RegistrationReport
from ftpipe.significance import paired_gain

N = 117  # the README's test split


def rows(values, **extra) -> list[dict[str, float]]:
    return [{"rougeL": v, **extra} for v in values]


def scores(values, **metrics) -> Scores:
    return Scores(rows(values), metrics)


def spread(n: int = N, seed: int = 1) -> list[float]:
    """Per-example ROUGE-L as a small model scores: many zeros, the rest spread over (0, 0.6)."""
    rng = random.Random(seed)
    return [0.0 if rng.random() < 0.4 else rng.uniform(0.02, 0.6) for _ in range(n)]


BASE = scores(spread(seed=1))


def shifted(values, by: float) -> list[float]:
    return [min(1.0, v + by) for v in values]


def test_first_challenger_better_by_a_clear_margin_is_promoted():
    challenger = scores(shifted(spread(seed=1), 0.08))
    decision = decide(metric="rougeL", min_improvement=0.01, challenger=challenger, base=BASE,
                      champion=None, champion_version=None, leaks=0)
    assert decision.promote and "no champion yet" in decision.reasons
    interval = decision.intervals["base"]
    assert 0.07 < interval.estimate <= 0.08 and 0.01 < interval.low < interval.estimate < interval.high
    assert decision.reasons[0] == (f"{interval.describe()} over base (paired bootstrap, 117 examples; "
                                   "lower bound must be > 0.01): pass")
    assert interval.describe().startswith(f"{interval.estimate:+.4f} rougeL, 95 % CI [")


def test_a_challenger_that_differs_from_the_champion_only_by_noise_is_not_promoted():
    champion = spread(seed=2)
    # The champion's own per-example scores with a few swapped between examples, and a 0.003 edge
    # on a few rows: a higher mean, which the old gate (challenger mean > champion mean) promoted.
    noisy = list(champion)
    for i, j in ((3, 50), (10, 90), (20, 33), (41, 77)):
        noisy[i], noisy[j] = noisy[j], noisy[i]
    noisy = [v + 0.003 * 117 / 10 if i < 10 else v for i, v in enumerate(noisy)]
    assert 0 < sum(noisy) / N - sum(champion) / N < 0.01
    decision = decide(metric="rougeL", min_improvement=0.0, challenger=scores(noisy), base=scores([0.0] * N),
                      champion=scores(champion), champion_version="3", leaks=0)
    assert not decision.promote
    interval = decision.intervals["champion"]
    assert interval.low < 0 < interval.estimate < interval.high
    assert f"{interval.describe()} over champion v3 (paired bootstrap, 117 examples; lower bound must be > 0): fail" \
        in decision.reasons
    assert decision.reasons[0].endswith(": pass")  # the base comparison still stands
    assert decision.summary().startswith("kept as challenger: ")


def test_the_same_model_scored_twice_is_not_promoted_over_itself():
    same = spread(seed=3)
    decision = decide(metric="rougeL", min_improvement=0.0, challenger=scores(same), base=scores([0.0] * N),
                      champion=scores(same), champion_version="1", leaks=0,
                      champion_note=" (the same model as this challenger)")
    interval = decision.intervals["champion"]
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0) and not decision.promote
    assert ("+0.0000 rougeL, 95 % CI [+0.0000, +0.0000] over champion v1 (the same model as this challenger) "
            "(paired bootstrap, 117 examples; lower bound must be > 0): fail") in decision.reasons


def test_a_gain_of_a_few_rounding_errors_on_every_example_is_not_promoted():
    """The champion fine-tuned at a learning rate too small to move it: every example's perplexity
    lower by a few fp32 ulps, an interval above 0 that is rounding, not a better model."""
    champion = [{"nll": 20.0 + i % 7, "tokens": 4.0} for i in range(N)]
    nudged = [{"nll": row["nll"] * (1 - 3e-8), "tokens": 4.0} for row in champion]
    base = Scores([{"nll": row["nll"] * 1.2, "tokens": 4.0} for row in champion], {"perplexity": 1100.0})
    kwargs = {"metric": "perplexity", "min_improvement": 0.0, "base": base, "champion_version": "2", "leaks": 0}
    decision = decide(challenger=Scores(nudged, {"perplexity": 346.0}),
                      champion=Scores(champion, {"perplexity": 346.00002}), **kwargs)
    interval = decision.intervals["champion"]
    assert 0 < interval.low and not decision.promote
    assert decision.reasons[1].endswith("): fail (a gain within 1e-06 of the metric's size is rounding)")
    clear = [{"nll": row["nll"] * 0.999, "tokens": 4.0} for row in champion]  # 0.1 % lower NLL: a gain
    assert decide(challenger=Scores(clear, {"perplexity": 344.0}), champion=Scores(champion, {"perplexity": 346.0}),
                  **kwargs).promote


def test_the_lower_bound_must_clear_min_improvement_strictly():
    challenger = scores([v + 0.05 for v in spread(seed=1)])  # every row +0.05: [0.05, 0.05]
    kwargs = {"metric": "rougeL", "challenger": challenger, "base": BASE, "champion": None,
              "champion_version": None, "leaks": 0}
    assert decide(min_improvement=0.049, **kwargs).promote
    assert not decide(min_improvement=0.05, **kwargs).promote  # equal to it is not above it


def test_perplexity_is_lower_is_better_and_resampled_as_a_ratio_of_sums():
    import math

    rng = random.Random(4)
    tokens = [rng.randint(2, 30) for _ in range(N)]
    base_nll = [t * rng.uniform(2.0, 3.5) for t in tokens]

    def nll_scores(nll):
        return Scores([{"nll": n, "tokens": t} for n, t in zip(nll, tokens)])

    better = nll_scores([n * 0.8 for n in base_nll])
    decision = decide(metric="perplexity", min_improvement=0.0, challenger=better, base=nll_scores(base_nll),
                      champion=None, champion_version=None, leaks=0)
    interval = decision.intervals["base"]
    ppl = lambda nll: math.exp(sum(nll) / sum(tokens))  # noqa: E731
    assert interval.estimate == pytest.approx(ppl(base_nll) - ppl([n * 0.8 for n in base_nll]))
    assert decision.promote and interval.low > 0 and "perplexity drop, 95 % CI" in decision.reasons[0]
    worse = nll_scores([n * 1.2 for n in base_nll])
    assert not decide(metric="perplexity", min_improvement=0.0, challenger=worse, base=nll_scores(base_nll),
                      champion=None, champion_version=None, leaks=0).promote


def test_interval_is_scipys_paired_bca_bootstrap_on_a_fixed_example():
    import numpy as np
    from scipy import stats

    challenger, other = spread(40, seed=5), spread(40, seed=6)
    got = paired_gain("rougeL", rows(challenger), rows(other), samples=2000, confidence=0.9, seed=7)
    expected = stats.bootstrap((np.array(challenger), np.array(other)),
                               lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis),
                               paired=True, vectorized=True, n_resamples=2000, confidence_level=0.9, method="BCa",
                               rng=np.random.default_rng(7))
    assert (got.low, got.high) == pytest.approx(tuple(expected.confidence_interval), abs=1e-12)
    assert got.estimate == pytest.approx(np.mean(challenger) - np.mean(other))
    assert got.method == "BCa" and got.examples == 40 and got.confidence == 0.9

    # Perplexity: the ratio of sums of each side's resampled rows, the same rows for both sides.
    rng = np.random.default_rng(8)
    tokens = rng.integers(2, 20, size=30).astype(float)
    nll_c, nll_o = tokens * rng.uniform(1.5, 2.5, 30), tokens * rng.uniform(1.8, 2.8, 30)

    def ppl_gain(c_nll, c_tok, o_nll, o_tok, axis=-1):
        return np.exp(o_nll.sum(axis) / o_tok.sum(axis)) - np.exp(c_nll.sum(axis) / c_tok.sum(axis))

    got = paired_gain("perplexity", [{"nll": n, "tokens": t} for n, t in zip(nll_c, tokens)],
                      [{"nll": n, "tokens": t} for n, t in zip(nll_o, tokens)], samples=1000, confidence=0.95, seed=3)
    expected = stats.bootstrap((nll_c, tokens, nll_o, tokens), ppl_gain, paired=True, vectorized=True,
                               n_resamples=1000, method="BCa", rng=np.random.default_rng(3))
    assert (got.low, got.high) == pytest.approx(tuple(expected.confidence_interval), abs=1e-12)

    # And it is a real interval: for a large normal sample of differences, about mean +- 1.96 sd / sqrt(n).
    diffs = rng.normal(0.05, 0.2, 4000)
    wide = paired_gain("rougeL", rows(list(diffs)), rows([0.0] * 4000), samples=2000, confidence=0.95, seed=0)
    half = 1.96 * diffs.std(ddof=1) / np.sqrt(4000)
    assert wide.low == pytest.approx(diffs.mean() - half, abs=0.15 * half)
    assert wide.high == pytest.approx(diffs.mean() + half, abs=0.15 * half)


def test_the_same_scores_and_seed_give_the_same_interval():
    a, b = rows(spread(seed=9)), rows(spread(seed=10))
    first = paired_gain("rougeL", a, b, samples=500, confidence=0.95, seed=11)
    assert paired_gain("rougeL", a, b, samples=500, confidence=0.95, seed=11) == first
    assert paired_gain("rougeL", a, b, samples=500, confidence=0.95, seed=12) != first
    assert paired_gain("rougeL", a[:1], b[:1], samples=500, confidence=0.95, seed=11) is None


def test_leaks_block_promotion():
    decision = decide(metric="rougeL", min_improvement=0.0, challenger=scores([0.5] * N), base=BASE,
                      champion=None, champion_version=None, leaks=2)
    assert not decision.promote and "data leak check: 2 leak(s) left in the training data: fail" in decision.reasons


@pytest.mark.parametrize(("action", "in_training"), [("drop", 0), ("warn", 3)])
def test_only_the_leaks_left_in_training_block_promotion(action, in_training):
    """leak_action: drop removed the leaking rows before training: found, reported, no longer a reason."""
    from ftpipe.schemas import DataReport, PrefsReport

    data = DataReport(source="s", rows_in=10, rules={}, rows_out=9, near_duplicate_clusters=0, split_groups=9,
                      splits={"train": 7, "val": 1, "test": 1}, leaks={"total": 3}, leak_action=action,
                      train_rows_dropped_for_leaks=3 if action == "drop" else 0, token_filters=True)
    prefs = PrefsReport(enabled=True, leaks={"total": 2}, leak_action=action)
    assert data.leaks_in_training == in_training and data.leaks.total == 3
    assert prefs.leaks_in_training == (0 if action == "drop" else 2)


def test_gate_line_reads_like_the_summary():
    challenger = scores(shifted(spread(seed=1), 0.08))
    decision = decide(metric="rougeL", min_improvement=0.0, challenger=challenger, base=BASE,
                      champion=None, champion_version=None, leaks=0)
    registration = RegistrationReport(
        model_name="m", version="1", model_uri="models:/m/1", experiment="e", pipeline_run_id="p", base_run_id="b",
        fewshot_run_id="f", finetuned_run_id="t", tracking_uri="sqlite:///mlruns.db", aliases=["challenger", "champion"],
        promotion={"promote": decision.promote, "reasons": decision.reasons, "metric": "rougeL", "min_improvement": 0.0,
                   "intervals": {k: v.as_dict() for k, v in decision.intervals.items()}},
        champion=None)
    line = gate_line(registration)
    assert line == f"{decision.intervals['base'].describe()} over base; no champion yet: promoted"


def test_gate_metric_must_be_one_the_evaluation_scores(tmp_path):
    import yaml

    from ftpipe.errors import PipelineError
    from ftpipe.params import validate_all

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"]["metrics"] = ["bleu", "chrf"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "primary_metric" in text)
    with pytest.raises(PipelineError, match=rf"params.yaml:{line}: register.primary_metric: 'rougeL' is not among "
                                            r"evaluate.metrics \(bleu, chrf\)"):
        validate_all(path)
    params["register"]["primary_metric"] = "chrf"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    assert validate_all(path)["register"].primary_metric == "chrf"


def test_forgetting_check_both_ways_with_its_reason():
    base = scores([0.1] * N, general_perplexity=20.0)
    kwargs = {"metric": "rougeL", "min_improvement": 0.0, "base": base, "champion": None, "champion_version": None,
              "leaks": 0, "max_forgetting": 0.1}
    kept = decide(challenger=scores([0.3] * N, general_perplexity=21.0), **kwargs)
    assert kept.promote
    assert "general_perplexity 21.0000 vs base 20.0000 (+5.0%, allowed <= +10.0%): pass" in kept.reasons
    forgot = decide(challenger=scores([0.3] * N, general_perplexity=23.0), **kwargs)
    assert not forgot.promote  # better on the metric, but it forgot general language
    assert "general_perplexity 23.0000 vs base 20.0000 (+15.0%, allowed <= +10.0%): fail" in forgot.reasons
    assert not decide(challenger=scores([0.3] * N), **kwargs).promote  # not measured: no promotion on trust
    assert decide(**{**kwargs, "max_forgetting": None}, challenger=scores([0.3] * N, general_perplexity=99.0)).promote


def test_registered_model_requirements_include_peft_only_for_a_peft_model(tiny_model_dir):
    from peft import PromptTuningConfig, get_peft_model

    from ftpipe import models
    from stages.register import _requirements

    model = models.load_model(tiny_model_dir)
    plain = _requirements(model)
    assert any(r.startswith("torch==") for r in plain) and not any(r.startswith("peft==") for r in plain)
    prompt_tuned = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    assert sorted(_requirements(prompt_tuned)) == sorted(plain + [f"peft=={__import__('peft').__version__}"])


def test_a_side_without_per_example_scores_of_the_metric_cannot_be_compared_and_blocks_promotion():
    bleu_only = Scores([{"bleu": 3.0}] * N)
    decision = decide(metric="rougeL", min_improvement=0.0, challenger=scores([0.5] * N), base=BASE,
                      champion=bleu_only, champion_version="2", leaks=0)
    assert not decision.promote and decision.intervals["champion"] is None
    assert "champion v2 has no per-example rougeL scores: cannot compare" in decision.reasons
    assert decision.reasons[0].endswith(": pass")  # the base comparison still stands
    unmeasured = decide(metric="bleu", min_improvement=0.0, challenger=scores([0.5] * N), base=BASE,
                        champion=None, champion_version=None, leaks=0)
    assert not unmeasured.promote
    assert "challenger has no per-example bleu scores: cannot compare" in unmeasured.reasons
    one = decide(metric="rougeL", min_improvement=0.0, challenger=scores([0.5]), base=scores([0.1]),
                 champion=None, champion_version=None, leaks=0)
    assert not one.promote and "rougeL over base: one test example gives no interval: cannot compare" in one.reasons


def test_old_task_check_refuses_a_challenger_that_lost_the_parents_task():
    """Continual fine-tuning: on the parent champion's own test split the challenger may be at most
    max_old_task_drop worse than the parent (perplexity: higher), whatever it gained on the new data."""
    from ftpipe.promotion import old_task_drop
    from ftpipe.schemas import OldTask

    clear_gain = dict(metric="rougeL", min_improvement=0.0, challenger=scores(shifted(spread(seed=1), 0.1)), base=BASE,
                      champion=None, champion_version=None, leaks=0)
    kept = OldTask(parent="m v1", examples=50, parent_scores={"rougeL": 0.40}, finetuned={"rougeL": 0.38})
    lost = OldTask(parent="m v1", examples=50, parent_scores={"rougeL": 0.40}, finetuned={"rougeL": 0.30})
    passed = decide(old_task=kept, max_old_task_drop=0.1, **clear_gain)
    assert passed.promote and "rougeL 0.3800 vs parent 0.4000 (+5.0% worse, allowed <= +10.0%): pass" in passed.summary()
    failed = decide(old_task=lost, max_old_task_drop=0.1, **clear_gain)
    assert not failed.promote and "(+25.0% worse, allowed <= +10.0%): fail" in failed.summary()
    assert decide(old_task=lost, max_old_task_drop=None, **clear_gain).promote  # off
    assert "old-task check: off" in decide(old_task=lost, max_old_task_drop=None, **clear_gain).summary()
    assert old_task_drop("perplexity", 10.0, 12.0) == pytest.approx(0.2)  # a rise in perplexity is the loss
    assert old_task_drop("perplexity", 10.0, 9.0) == pytest.approx(-0.1)
    assert old_task_drop("rougeL", 0.0, 0.0) == 0.0  # nothing to lose
    # Trained from a parent whose run logged no test split: said, not silently skipped.
    unchecked = decide(old_task=None, max_old_task_drop=0.1, parent_version="3", **clear_gain)
    assert "old-task check: parent v3's run holds no test split: not checked" in unchecked.summary()
