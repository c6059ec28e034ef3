"""train.method bottleneck (ftpipe/bottleneck.py): only the adapters train and the base stays bit for bit,
each placement starts as the base and learns, the saved adapters load back with identical logits, the
registered version (a pyfunc) answers in a fresh process and is scored again as a champion, and the
export and DPO steps that need plain weights refuse it at params time (train's own keys: test_train)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import register_in_process, set_param, stage_env, tiny_params
from test_train import assert_learns, run_train

from ftpipe import bottleneck
from ftpipe.errors import PipelineError
from ftpipe.params import TrainParams, validate_all

OPTIONS = {"method": "bottleneck", "merge": False, "learning_rate": 0.02, "bottleneck_reduction": 4}


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("placement", bottleneck.PLACEMENTS)
def test_an_untrained_adapter_is_the_base_and_only_its_weights_train(train_inputs, placement):
    import torch

    from ftpipe import methods, models

    _, base, _ = train_inputs
    params = TrainParams(**{**OPTIONS, "bottleneck_placement": placement})
    model = methods.build(params, base, bf16=False)
    plain = models.load_model(base)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    assert torch.equal(logits(model, ids), logits(plain, ids))  # the up-projections start at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    per_block = {"houlsby": 2, "pfeiffer": 1, "parallel": 1}[placement]
    layers = plain.config.num_hidden_layers
    assert trainable == set(bottleneck.adapter_state(model)) and len(trainable) == 4 * per_block * layers
    size = plain.config.hidden_size // 4
    assert model.model.layers[0].bottleneck_ffn[0].weight.shape == (size, plain.config.hidden_size)
    # With the up-projection moved, the placement changes the output (each hook is wired).
    for block in model.model.layers:
        torch.nn.init.normal_(block.bottleneck_ffn[2].weight, std=0.5)
    assert not torch.equal(logits(model, ids), logits(plain, ids))


@pytest.mark.parametrize("placement", bottleneck.PLACEMENTS)
def test_training_changes_only_the_adapters_learns_and_loads_back_with_identical_logits(tmp_path, train_inputs,
                                                                                        placement):
    import torch
    from safetensors.torch import load_file

    from ftpipe import metrics, models

    _, base, _ = train_inputs
    base_weights = {k: v.clone() for k, v in models.load_model(base).state_dict().items()}
    params, out, _, summary = run_train(tmp_path, train_inputs, **OPTIONS, bottleneck_placement=placement)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("bottleneck")) == [
        bottleneck.CONFIG_NAME, bottleneck.WEIGHTS_NAME]
    assert not (out / "merged").exists() and not (out / "adapter_config.json").exists()
    saved = load_file(out / bottleneck.WEIGHTS_NAME)
    assert summary.trainable_parameters == sum(w.numel() for w in saved.values())
    assert summary.trainable_parameters < 0.1 * summary.parameters
    assert any(torch.count_nonzero(w) for k, w in saved.items() if k.endswith("2.weight"))  # up-projections moved
    assert_learns(train_inputs, out, f"bottleneck {placement}")

    finetuned = models.load_finetuned(base, out)
    # The base under the adapters is bit for bit the base on disk.
    kept = {k: v for k, v in finetuned.state_dict().items() if k in base_weights}
    assert kept.keys() == base_weights.keys() and all(torch.equal(kept[k], base_weights[k]) for k in kept)
    # Loaded twice: the same logits (what evaluate scores is what register logs).
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    assert torch.equal(logits(finetuned, ids), logits(models.load_finetuned(base, out), ids))
    tokenizer = models.load_tokenizer(base)
    assert len(metrics.generate(finetuned, tokenizer, ["<|im_start|>user\nsay red<|im_end|>\n"],
                                max_new_tokens=3, batch_size=1)) == 1


def test_adapters_of_another_shape_are_one_line(tmp_path, train_inputs):
    from ftpipe import methods, models

    _, base, _ = train_inputs
    model = methods.build(TrainParams(**OPTIONS), base, bf16=False)
    bottleneck.save(model, tmp_path / "a")
    config = json.loads((tmp_path / "a" / bottleneck.CONFIG_NAME).read_text())
    (tmp_path / "a" / bottleneck.CONFIG_NAME).write_text(json.dumps({**config, "size": config["size"] + 1}))
    with pytest.raises(PipelineError, match=r"bottleneck_model\.safetensors: does not fit this base model"):
        models.load_finetuned(base, tmp_path / "a")
    (tmp_path / "a" / bottleneck.CONFIG_NAME).write_text(json.dumps({**config, "placement": "houlsby"}))
    with pytest.raises(PipelineError, match=r"does not fit this base model \(missing \['model\.layers\.0\."):
        models.load_finetuned(base, tmp_path / "a")
    (tmp_path / "a" / bottleneck.WEIGHTS_NAME).write_bytes(b"not safetensors")
    with pytest.raises(PipelineError, match=r"bottleneck adapter unreadable"):
        models.load_finetuned(base, tmp_path / "a")


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("export", "gguf", ["f16"], r"export\.gguf: needs train\.merge: true"),
    ("dpo", "enabled", True, r"dpo\.init_from: 'sft' needs a train method whose result merges"),
])
def test_gguf_export_and_dpo_from_the_adapters_are_refused_naming_the_key(tmp_path, tiny_model_dir, tiny_data,
                                                                          section, key, value, message):
    import yaml

    params = tiny_params(tiny_model_dir, tiny_data)
    params["train"].update(method="bottleneck", merge=False)
    params["export"]["gguf"] = []
    params[section][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(PipelineError, match=message):
        validate_all(path)


def test_the_registered_version_answers_in_a_fresh_process_and_is_scored_again_as_champion(
        finished_project, tmp_path):
    """Through the stages as DVC runs them: train, evaluate and register take the adapters; the version
    is a pyfunc that loads in a new interpreter; the next registration scores it again as champion."""
    proj = finished_project
    set_param(proj, "train", "method", "bottleneck")
    for key, value in {**OPTIONS, "bottleneck_placement": "houlsby"}.items():
        set_param(proj, "train", key, value)
    set_param(proj, "export", "gguf", [])
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate"], cwd=proj, env=stage_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((proj / "reports" / "train.json").read_text())["method"] == "bottleneck"

    first = register_in_process(proj)
    assert first["version"] == "2"
    script = ("import sys, mlflow; mlflow.set_tracking_uri(sys.argv[1]); "
              "model = mlflow.pyfunc.load_model('models:/tiny-model/2'); "
              "print(repr(model.predict(['say red blue number 3', 'say cat'])))")
    fresh = subprocess.run([sys.executable, "-c", script, f"sqlite:///{proj / 'mlruns.db'}"], cwd=tmp_path,
                           env=stage_env(), capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    replies = eval(fresh.stdout.strip().splitlines()[-1])  # noqa: S307 - the repr of a list of strings printed above
    assert isinstance(replies, list) and len(replies) == 2 and all(isinstance(r, str) for r in replies)

    # v2 as champion, scored again when v3 (the same adapters, tagged as if trained elsewhere) registers.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    client.set_registered_model_alias("tiny-model", "champion", "2")
    client.set_model_version_tag("tiny-model", "2", "adapter_md5", "from-another-run")
    second = register_in_process(proj)
    assert second["version"] == "3"
    assert second["champion"]["scored"].startswith("generated again on this test split")

    # Continual fine-tuning cannot start from such a champion: it is no set of plain weights.
    from stages import prepare_parent

    try:
        with pytest.raises(PipelineError, match=r"tiny-model v[23] \(champion\) is bottleneck adapters, not merged"):
            prepare_parent.run(init_from="champion", model_name="tiny-model",
                               tracking_uri=f"sqlite:///{proj / 'mlruns.db'}", out_dir=tmp_path / "parent")
    finally:
        mlflow.set_tracking_uri(None)  # the stage set its store as the global one
    assert not (tmp_path / "parent").exists()
