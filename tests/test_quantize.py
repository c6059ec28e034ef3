"""quantize: every bitsandbytes variant of the tiny model measured against fp32, and its params checks."""

from __future__ import annotations

import json
import math
import typing

import pytest
from conftest import qa_rows, write_jsonl

from ftpipe import metrics
from ftpipe.errors import PipelineError
from ftpipe.params import QuantizeParams, QuantVariant, load_section
from ftpipe.quantization import VARIANTS
from stages import quantize


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model at 64 wide: bitsandbytes' CPU 4-bit kernel packs weights in blocks of 64
    input features and 32 output features, which the fixture's 32-wide layers (16-wide k/v) are not."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("wide-model")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def val_file(tmp_path):
    rows = [{"id": f"val-{i}", "messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}]}
            for i, r in enumerate(qa_rows(6))]
    return write_jsonl(tmp_path / "val.jsonl", rows)


def test_report_has_every_variant_and_4bit_is_smaller(tmp_path, wide_model_dir):
    params = QuantizeParams(max_rows=4, prompts=3, max_new_tokens=6, batch_size=2)
    reports = tmp_path / "reports"
    result = quantize.run(params=params, base_dir=wide_model_dir, val_file=val_file(tmp_path), reports_dir=reports)

    assert json.loads((reports / "quantize.json").read_text()) == result
    assert list(result["variants"]) == list(VARIANTS)
    assert result["perplexity_rows"] == 4 and result["prompts"] == 3
    fp32 = result["fp32"]
    # The reference is the base folder's own safetensors file.
    assert fp32["disk_bytes"] == (wide_model_dir / "model.safetensors").stat().st_size
    for name, v in result["variants"].items():
        assert v["footprint_ratio"] == pytest.approx(v["footprint_bytes"] / fp32["footprint_bytes"])
        assert 0 < v["footprint_ratio"] < 1, name
        assert math.isfinite(v["perplexity"]) and v["perplexity_ratio"] == pytest.approx(v["perplexity"] / fp32["perplexity"])
        assert 0 <= v["exact_match"] <= 1 and 0 <= v["token_agreement"] <= 1
        assert v["disk_bytes"] > 0 and "not_serializable" not in v  # bitsandbytes 0.50 saves every variant
        assert v["load_s"] > 0 and v["generate_s"] > 0
    # 4 bits per linear weight against 8: smaller than int8 too (the fp32 embedding is shared by all).
    assert result["variants"]["nf4"]["footprint_bytes"] < result["variants"]["int8"]["footprint_bytes"]
    table = (reports / "quantize.md").read_text()
    assert table.splitlines()[2].startswith("| fp32 |")
    assert all(f"| {name} |" in table for name in VARIANTS)
    assert not list(tmp_path.glob("ftpipe-quantize-*"))  # no saved copy left behind


def test_agreement_counts_exact_outputs_and_token_positions(tiny_model_dir):
    from ftpipe.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    assert metrics.agreement(tokenizer, ["red cat", "blue dog"], ["red cat", "blue dog"]) == (1.0, 1.0)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    exact, tokens = metrics.agreement(tokenizer, ["red cat", "blue dog"], ["red cat", "green"])
    assert exact == 0.5
    mismatched = max(len(ids("blue dog")), len(ids("green")))
    assert tokens == pytest.approx(len(ids("red cat")) / (len(ids("red cat")) + mismatched))


def test_unserializable_variant_is_reported_not_raised():
    class Unsaveable:
        def save_pretrained(self, folder):
            raise ValueError("this model is quantized and is not serializable\nmore detail")

    assert quantize.saved_bytes(Unsaveable()) == (None, "ValueError: this model is quantized and is not serializable")


def test_params_variant_names_match_the_quantization_module():
    assert typing.get_args(QuantVariant) == VARIANTS


def test_unknown_variant_fails_naming_the_key(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("quantize:\n  max_rows: 4\n  variants: [nf4, nf3]\n")
    with pytest.raises(PipelineError, match=r"params.yaml:3: quantize\.variants\.1: Input should be .*'nf3'"):
        load_section("quantize", QuantizeParams, path)
    path.write_text("quantize:\n  variants: [nf4, int8, nf4]\n")
    with pytest.raises(PipelineError, match=r"params.yaml:2: quantize\.variants: lists 'nf4' more than once"):
        load_section("quantize", QuantizeParams, path)


def test_magnitude_pruning_zeroes_the_smallest_weights_of_each_decoder_layer_only(tiny_model_dir):
    import torch

    from ftpipe import pruning
    from ftpipe.models import load_model

    model, original = load_model(tiny_model_dir), load_model(tiny_model_dir)
    sparsity = pruning.prune(model, "magnitude_50")
    layers = pruning.pruned_layers(model)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert sparsity == pytest.approx(0.5, abs=0.01)
    pruned = dict(model.named_parameters())
    for name, before in original.named_parameters():
        after = pruned[name]
        if ".layers." in name and name.endswith("proj.weight"):
            kept = after != 0
            # Each layer on its own: every kept weight is at least as large as every zeroed one.
            assert abs(kept.float().mean().item() - 0.5) < 0.02, name
            assert before.abs()[kept].min() >= before.abs()[~kept].max(), name
            assert torch.equal(after[kept], before[kept]), name
        else:  # the embedding (shared with the output layer) and the norms are kept whole
            assert torch.equal(after, before), name
    assert pruning.prune(load_model(tiny_model_dir), "magnitude_90") == pytest.approx(0.9, abs=0.01)


def test_semi_structured_pruning_keeps_the_two_largest_of_every_four():
    import torch

    from ftpipe.pruning import semi_structured_mask

    torch.manual_seed(0)
    weight = torch.randn(6, 16)
    mask = semi_structured_mask(weight)
    groups, kept = weight.abs().reshape(6, 4, 4), mask.reshape(6, 4, 4).bool()
    assert (kept.sum(-1) == 2).all()
    smallest_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
    largest_dropped = groups.masked_fill(kept, -1.0).amax(-1)
    assert (smallest_kept >= largest_dropped).all()
    with pytest.raises(ValueError, match="multiples of 4, not 6"):
        semi_structured_mask(torch.randn(2, 6))


def test_pruned_variants_are_measured_beside_the_quantized_ones(tmp_path, tiny_model_dir):
    params = QuantizeParams(variants=["int8"], pruned=["magnitude_30", "2of4"], max_rows=4, prompts=3,
                            max_new_tokens=6, batch_size=2)
    reports = tmp_path / "reports"
    result = quantize.run(params=params, base_dir=tiny_model_dir, val_file=val_file(tmp_path), reports_dir=reports)
    assert list(result["pruned"]) == ["magnitude_30", "2of4"]
    assert result["pruned"]["magnitude_30"]["sparsity"] == pytest.approx(0.3, abs=0.01)
    assert result["pruned"]["2of4"]["sparsity"] == pytest.approx(0.5, abs=0.001)
    fp32 = result["fp32"]
    for name, v in result["pruned"].items():
        assert v["footprint_ratio"] == 1.0, name  # dense tensors: nothing saved
        assert v["perplexity_ratio"] == pytest.approx(v["perplexity"] / fp32["perplexity"])
        assert v["perplexity"] != fp32["perplexity"], name  # pruning did change the model
        assert 0 <= v["token_agreement"] <= 1 and v["generate_ratio"] > 0
        assert "disk_bytes" not in v
    table = (reports / "quantize.md").read_text()
    assert "| pruned | sparsity |" in table and "| 2of4 | 50.0% |" in table and "CUDA only" in table


@pytest.mark.parametrize("value, error", [
    ("[magnitude_100]", r"quantize\.pruned\.0: String should match pattern"),
    ('["2:4"]', r"quantize\.pruned\.0: String should match pattern"),
    ("[2:4]", r"quantize\.pruned\.0: Input should be a valid string"),  # YAML 1.1: the number 124
    ('[magnitude_50, 2of4, magnitude_50]', r"quantize\.pruned: lists 'magnitude_50' more than once"),
])
def test_bad_pruned_variant_fails_naming_the_key(tmp_path, value, error):
    path = tmp_path / "params.yaml"
    path.write_text(f"quantize:\n  pruned: {value}\n")
    with pytest.raises(PipelineError, match=r"params.yaml:2: " + error):
        load_section("quantize", QuantizeParams, path)


def test_no_variant_asked_loads_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    from stages.register import quant_metrics

    empty = tmp_path / "empty-base"
    empty.mkdir()
    params = QuantizeParams(variants=[], pruned=[])
    reports = tmp_path / "reports"
    # No model, no validation file: anything loaded would fail.
    result = quantize.run(params=params, base_dir=empty, val_file=tmp_path / "absent.jsonl", reports_dir=reports)
    assert json.loads((reports / "quantize.json").read_text()) == result
    assert result["variants"] == {} and result["pruned"] == {} and result["skipped"] == quantize.NOTHING_ASKED
    assert (reports / "quantize.md").read_text() == quantize.NOTHING_ASKED + "\n"
    assert quant_metrics(reports / "quantize.json") == {}  # register logs no quant_* or pruned_* metric

    # The stage itself: no models/base in this folder, one printed line.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("quantize:\n  variants: []\n  pruned: []\n")
    quantize.main()
    assert capsys.readouterr().out == quantize.NOTHING_ASKED + "\n"


def test_register_logs_each_measured_variant(tmp_path):
    from ftpipe.io import write_json
    from stages.register import quant_metrics

    figures = {"footprint_ratio": 0.3, "perplexity_ratio": 1.01, "token_agreement": 0.9}
    write_json(tmp_path / "quantize.json", {"variants": {"nf4": figures},
                                            "pruned": {"2of4": {"sparsity": 0.5, **figures}}})
    assert quant_metrics(tmp_path / "quantize.json") == {
        "quant_nf4_footprint_ratio": 0.3, "quant_nf4_perplexity_ratio": 1.01, "quant_nf4_token_agreement": 0.9,
        "pruned_2of4_sparsity": 0.5, "pruned_2of4_perplexity_ratio": 1.01, "pruned_2of4_token_agreement": 0.9}
    assert quant_metrics(tmp_path / "absent.json") == {}
