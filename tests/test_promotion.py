"""The promotion gate: a better challenger is promoted, a worse one is not, with its reasons."""

from __future__ import annotations

from ftpipe.promotion import decide

BASE = {"rougeL": 0.10, "perplexity": 13.0}


def test_first_challenger_that_beats_base_is_promoted():
    decision = decide(metric="rougeL", min_improvement=0.01, challenger={"rougeL": 0.15}, base=BASE,
                      champion=None, champion_version=None, leaks=0)
    assert decision.promote
    assert decision.reasons[0].startswith("rougeL 0.1500 vs base 0.1000 (+0.0500") and "no champion yet" in decision.reasons


def test_challenger_worse_than_champion_stays_challenger_with_reasons():
    decision = decide(metric="rougeL", min_improvement=0.0, challenger={"rougeL": 0.14}, base=BASE,
                      champion={"rougeL": 0.15}, champion_version="3", leaks=0)
    assert not decision.promote
    assert "rougeL 0.1400 vs champion v3 0.1500 (-0.0100, needs > 0 and >= 0): fail" in decision.reasons
    assert decision.summary().startswith("kept as challenger: ")


def test_min_improvement_and_lower_is_better_perplexity():
    kwargs = {"metric": "perplexity", "base": BASE, "champion": {"perplexity": 8.0}, "champion_version": "1", "leaks": 0}
    assert decide(min_improvement=0.5, challenger={"perplexity": 7.0}, **kwargs).promote
    assert not decide(min_improvement=1.5, challenger={"perplexity": 7.0}, **kwargs).promote


def test_leaks_block_promotion():
    decision = decide(metric="rougeL", min_improvement=0.0, challenger={"rougeL": 0.5}, base=BASE,
                      champion=None, champion_version=None, leaks=2)
    assert not decision.promote and "data leak check found 2 leak(s): fail" in decision.reasons


def test_gate_metric_choices_are_the_evaluated_metrics():
    import typing

    from ftpipe.metrics import METRIC_KEYS
    from ftpipe.params import RegisterParams

    assert typing.get_args(RegisterParams.model_fields["primary_metric"].annotation) == METRIC_KEYS


def test_forgetting_check_both_ways_with_its_reason():
    base = {"rougeL": 0.10, "general_perplexity": 20.0}
    kwargs = {"metric": "rougeL", "min_improvement": 0.0, "base": base, "champion": None, "champion_version": None,
              "leaks": 0, "max_forgetting": 0.1}
    kept = decide(challenger={"rougeL": 0.3, "general_perplexity": 21.0}, **kwargs)
    assert kept.promote
    assert "general_perplexity 21.0000 vs base 20.0000 (+5.0%, allowed <= +10.0%): pass" in kept.reasons
    forgot = decide(challenger={"rougeL": 0.3, "general_perplexity": 23.0}, **kwargs)
    assert not forgot.promote  # better on the metric, but it forgot general language
    assert "general_perplexity 23.0000 vs base 20.0000 (+15.0%, allowed <= +10.0%): fail" in forgot.reasons
    assert not decide(challenger={"rougeL": 0.3}, **kwargs).promote  # not measured: no promotion on trust
    assert decide(**{**kwargs, "max_forgetting": None}, challenger={"rougeL": 0.3, "general_perplexity": 99.0}).promote


def test_registered_model_requirements_include_peft_only_for_a_peft_model(tiny_model_dir):
    from peft import PromptTuningConfig, get_peft_model

    from ftpipe import models
    from stages.register import _requirements

    model = models.load_model(tiny_model_dir)
    plain = _requirements(model)
    assert any(r.startswith("torch==") for r in plain) and not any(r.startswith("peft==") for r in plain)
    prompt_tuned = get_peft_model(model, PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    assert sorted(_requirements(prompt_tuned)) == sorted(plain + [f"peft=={__import__('peft').__version__}"])


def test_a_side_without_the_primary_metric_cannot_be_compared_and_blocks_promotion():
    decision = decide(metric="rougeL", min_improvement=0.0, challenger={"rougeL": 0.5}, base=BASE,
                      champion={"bleu": 0.3}, champion_version="2", leaks=0)
    assert not decision.promote
    assert "champion v2 has no rougeL logged: cannot compare" in decision.reasons
    assert decision.reasons[0].endswith(": pass")  # the base comparison still stands
    unmeasured = decide(metric="bleu", min_improvement=0.0, challenger={"rougeL": 0.5}, base=BASE,
                        champion=None, champion_version=None, leaks=0)
    assert not unmeasured.promote and "challenger has no bleu logged: cannot compare" in unmeasured.reasons
