"""train: a few LoRA steps on the tiny model change the adapter and write every declared output."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_params

from ftpipe.errors import PipelineError
from ftpipe.params import PrepareDataParams, TrainParams
from stages import prepare_base, prepare_data, train


@pytest.fixture
def inputs(tmp_path, tiny_model_dir, tiny_data):
    cfg = tiny_params(tiny_model_dir, tiny_data)
    base, data = tmp_path / "base", tmp_path / "prepared"
    prepare_base.run(params=prepare_base.PrepareBaseParams(**cfg["prepare_base"]), out_dir=base)
    prepare_data.run(params=PrepareDataParams(**cfg["prepare_data"]), out_dir=data, reports_dir=tmp_path / "r0")
    return cfg, base, data


def test_lora_training_changes_adapter_weights(tmp_path, inputs):
    from safetensors.torch import load_file

    cfg, base, data = inputs
    params = TrainParams(**cfg["train"])
    out, reports = tmp_path / "adapter", tmp_path / "reports"
    summary = train.run(params=params, base_dir=base, data_dir=data, out_dir=out, reports_dir=reports)
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # peft initialises B to zeros
    assert summary["steps"] == 6 and 0 < summary["trainable_parameters"] < summary["parameters"]
    config = json.loads((out / "train_config.json").read_text())
    assert config["params"] == params.model_dump() and config["base_model"]["source"]["kind"] == "local"
    assert (reports / "train_loss.csv").read_text().startswith("step,loss\n1,")
    assert len((reports / "val_loss.csv").read_text().splitlines()) == 3  # header + steps 3 and 6
    assert (reports / "loss.png").stat().st_size > 1000
    assert json.loads((reports / "train.json").read_text()) == summary
    assert not (out / "trainer").exists()


def test_loss_only_counts_response_tokens(tiny_model_dir):
    import torch

    from ftpipe import models
    from ftpipe.chat import encode

    tokenizer, model = models.load_tokenizer(tiny_model_dir), models.load_model(tiny_model_dir)
    item = encode(tokenizer, [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red cat"}])
    batch = {k: torch.tensor([v]) for k, v in item.items()}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        ours = train.response_only_loss(model, batch)
        reference = model(**batch).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_unknown_target_module_fails_naming_the_key(tmp_path, inputs):
    cfg, base, data = inputs
    params = TrainParams(**{**cfg["train"], "target_modules": ["no_such_proj"]})
    with pytest.raises(PipelineError, match=r"train.target_modules: "):
        train.run(params=params, base_dir=base, data_dir=data, out_dir=tmp_path / "adapter", reports_dir=tmp_path / "r")
    assert not (tmp_path / "adapter").exists()
