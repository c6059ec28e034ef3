"""train: every method trains on the tiny model (its trainable weights change, frozen ones do not),
merges into a plain transformers model where it can, rejects invalid combinations at params time,
and resumes from its last checkpoint after a kill -9."""

from __future__ import annotations

import json

import pytest
from conftest import killed_at_first_checkpoint, set_param, stage

from ftpipe import trainer
from ftpipe.errors import PipelineError
from ftpipe.params import TrainParams, load_section
from ftpipe.schemas import TrainReport
from stages import train

# IA3's scales and the virtual tokens learn at far higher rates than LoRA's (prompt tuning's paper
# uses 0.3); at the suite's 5e-3 six steps move them by under 1 % (measured on the tiny model).
METHOD_OPTIONS = {
    "full": {},
    "lora": {},
    # nf4 needs in_features >= 64 (the bitsandbytes CPU block size); the tiny model is 32 wide.
    "qlora": {"quantization": "int8"},
    "dora": {},
    "ia3": {"learning_rate": 0.2},
    "prefix_tuning": {"num_virtual_tokens": 4, "merge": False, "learning_rate": 0.2},
    "prompt_tuning": {"num_virtual_tokens": 4, "merge": False, "learning_rate": 0.3},
    "p_tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 16, "merge": False, "learning_rate": 0.1},
}


def run_train(tmp_path, train_inputs, **overrides):
    cfg, base, data = train_inputs
    params = TrainParams(**{**cfg["train"], "save_steps": 0, **overrides})
    out, reports = tmp_path / "adapter", tmp_path / "reports"
    summary = train.run(params=params, base_dir=base, data_dir=data, out_dir=out, reports_dir=reports,
                        checkpoint_root=tmp_path / "checkpoints")
    return params, out, reports, summary


def test_lora_training_writes_every_declared_output(tmp_path, train_inputs):
    stale = tmp_path / "checkpoints" / "0123456789abcdef" / "checkpoint-3"  # another key's, e.g. a stopped trial's
    stale.mkdir(parents=True)
    params, out, reports, summary = run_train(tmp_path, train_inputs)
    assert summary.steps == 6 and 0 < summary.trainable_parameters < summary.parameters
    config = json.loads((out / "train_config.json").read_text())
    assert config["params"] == params.model_dump() and config["base_model"]["source"]["kind"] == "local"
    assert (reports / "train_loss.csv").read_text().startswith("step,loss\n1,")
    assert len((reports / "val_loss.csv").read_text().splitlines()) == 3  # header + steps 3 and 6
    assert (reports / "loss.png").stat().st_size > 1000
    assert json.loads((reports / "train.json").read_text()) == summary.model_dump(mode="json")
    assert not list((tmp_path / "checkpoints").glob("*"))  # removed once the run succeeded, stale keys' too
    import torch

    # auto: the CPU's kernels, or the GPU's where one is present (ftpipe.methods, trainer.optimizer_name).
    cuda = torch.cuda.is_available()
    assert (summary.attention, summary.optimizer) == (("sdpa", "adamw_torch") if cuda else ("packed_rows", "adamw_torch_fused"))
    assert 0 < summary.train_s <= summary.runtime_s  # evaluation time is not training time


def test_a_run_shorter_than_its_logging_and_eval_steps_reports_its_final_losses(tmp_path, train_inputs):
    _, _, reports, summary = run_train(tmp_path, train_inputs, max_steps=2, logging_steps=5, eval_steps=25)
    assert summary.steps == 2
    assert summary.train_loss_final is not None and summary.val_loss_final is not None
    assert summary.train_val_gap == pytest.approx(summary.val_loss_final - summary.train_loss_final)
    assert (reports / "train_loss.csv").read_text().splitlines()[1:] == [f"2,{summary.train_loss_final:.6f}"]
    assert [line.split(",")[0] for line in (reports / "val_loss.csv").read_text().splitlines()[1:]] == ["2"]


def test_attention_kernel_choice_and_same_loss(tiny_model_dir, train_inputs):
    """auto: packed_rows on CPU where batches are packed, eager where not, sdpa on CUDA; the kernels
    give the model the same training loss on padded rows."""
    import torch

    from ftpipe import methods, models
    from ftpipe.chat import encode

    cfg = train_inputs[0]["train"]
    assert methods.attention_kernel(TrainParams(**cfg), cuda=False) == "packed_rows"
    assert methods.attention_kernel(TrainParams(**{**cfg, "packing": False}), cuda=False) == "eager"
    assert methods.attention_kernel(TrainParams(**cfg), cuda=True) == "sdpa"
    assert methods.attention_kernel(TrainParams(**{**cfg, "max_length": 1024}), cuda=False) == "sdpa"  # memory
    assert methods.attention_kernel(TrainParams(**{**cfg, "attention": "sdpa"}), cuda=False) == "sdpa"
    tokenizer = models.load_tokenizer(tiny_model_dir)
    rows = [encode(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in (("say red", "red cat"), ("a much longer question about blue things", "blue"))]
    width = max(len(r["input_ids"]) for r in rows)  # right padding, masked: the kernels must agree on it
    batch = {
        "input_ids": torch.tensor([r["input_ids"] + [0] * (width - len(r["input_ids"])) for r in rows]),
        "labels": torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r["labels"]) + [0] * (width - len(r["labels"])) for r in rows]),
    }
    losses = {}
    for kernel in ("eager", "sdpa", "packed_rows"):
        model = methods.build(TrainParams(**{**cfg, "attention": kernel}), tiny_model_dir, bf16=False, attention=kernel)
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            losses[kernel] = trainer.response_only_loss(model, batch).item()
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-5)
    assert losses["eager"] == pytest.approx(losses["packed_rows"], rel=1e-5)


def validation_perplexity(model_dir, adapter_dir, data_dir) -> float:
    """Perplexity of the validation replies under the base model (adapter_dir None) or the fine-tuned one."""
    from ftpipe import metrics, models
    from ftpipe.io import read_jsonl

    model = models.load_finetuned(model_dir, adapter_dir) if adapter_dir else models.load_model(model_dir)
    chats = [row["messages"] for row in read_jsonl(data_dir / "val.jsonl")]
    return metrics.response_perplexity(model.eval(), models.load_tokenizer(model_dir), chats, batch_size=8)


def assert_learns(train_inputs, out, method):
    """The run lowered the validation replies' perplexity: weights that changed in the wrong direction
    (a loss with its sign flipped, an optimizer that ascends) raise it."""
    _, base, data = train_inputs
    before, after = validation_perplexity(base, None, data), validation_perplexity(base, out, data)
    # Six steps lower it by 4-25 % depending on the method; a wrong sign raises it.
    assert after < 0.98 * before, f"{method}: validation perplexity {before:.2f} -> {after:.2f}"


@pytest.mark.parametrize("method", [m for m in METHOD_OPTIONS if m != "full"])
def test_peft_method_trains_its_adapter_and_loads_for_inference(tmp_path, train_inputs, method):
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, set_seed

    from ftpipe import methods, metrics, models
    from ftpipe.chat import encode

    _, base, _ = train_inputs
    params, out, _, summary = run_train(tmp_path, train_inputs, method=method, **METHOD_OPTIONS[method])
    set_seed(params.seed)  # the same seed as train.run: the adapter as it was before training
    initial = get_peft_model_state_dict(methods.build(params, base, bf16=False))
    trained = load_file(out / "adapter_model.safetensors")
    assert trained.keys() == initial.keys() and summary.trainable_parameters > 0
    assert summary.packing == methods.response_only_ok(method)  # packing: auto
    unchanged = [k for k, w in trained.items() if torch.equal(w, initial[k].to(w.dtype))]
    assert not unchanged, f"{method}: trainable weights did not change: {unchanged}"
    assert_learns(train_inputs, out, method)

    tokenizer = models.load_tokenizer(base)
    finetuned = models.load_finetuned(base, out)
    item = encode(tokenizer, [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red cat"}])
    ids = torch.tensor([item["input_ids"]])
    if params.merge:
        # The merged folder is a plain transformers model and scores exactly like base + adapter.
        assert not (out / "merged" / "adapter_config.json").exists()
        assert (out / "merged" / "chat_template.jinja").is_file()
        plain = AutoModelForCausalLM.from_pretrained(out / "merged")
        with_adapter = PeftModel.from_pretrained(models.load_model(base), out).eval()
        with torch.no_grad():
            torch.testing.assert_close(plain(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)
    else:
        assert isinstance(finetuned, PeftModel) and not (out / "merged").exists()
    # evaluate's two uses of the model work whatever the method: scoring and generation.
    chat = [{"role": "user", "content": "say red"}, {"role": "assistant", "content": "red cat"}]
    assert metrics.response_perplexity(finetuned, tokenizer, [chat], batch_size=2) > 0
    with torch.no_grad():
        generated = finetuned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                       do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated[0, : ids.shape[1]].equal(ids[0])  # evaluate cuts the prompt off by its length
    assert len(metrics.generate(finetuned, tokenizer, ["<|im_start|>user\nsay red<|im_end|>\n"],
                                max_new_tokens=3, batch_size=1)) == 1


def test_full_with_frozen_embeddings_and_first_block(tmp_path, train_inputs):
    from safetensors.torch import load_file

    _, base, _ = train_inputs
    # With gradient checkpointing too: frozen embeddings must not cut the gradient to block 1.
    params, out, _, summary = run_train(tmp_path, train_inputs, method="full", freeze_embeddings=True, freeze_layers=1,
                                        layer_lr_divisor=2.6, gradient_checkpointing=True)
    before, after = load_file(base / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("model.embed_tokens", "model.layers.0."))]
    trained = [k for k in before if k.startswith("model.layers.1.")]
    assert frozen and all(before[k].equal(after[k]) for k in frozen)
    assert trained and not any(before[k].equal(after[k]) for k in trained)
    assert summary.trainable_parameters == sum(before[k].numel() for k in before if k not in frozen)
    assert_learns(train_inputs, out, "full")


def test_gradual_unfreezing_opens_the_lower_block_only_later(tmp_path, train_inputs):
    from safetensors.torch import load_file

    _, base, _ = train_inputs
    # 2 blocks, one more unfrozen every 4 steps: block 1 trains from step 0, block 0 from step 4 on.
    _, out, _, _ = run_train(tmp_path, train_inputs, method="full", gradual_unfreezing=True, unfreeze_every_steps=4,
                             max_steps=3)
    before, after = load_file(base / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert all(before[k].equal(after[k]) for k in before if k.startswith(("model.layers.0.", "model.embed")))
    assert not any(before[k].equal(after[k]) for k in before if k.startswith("model.layers.1."))


def packed_and_unpacked(tmp_path, train_inputs, method, precision):
    """The same training run with packed and with padded batches: {packing: (out, curves)}."""
    options = {"learning_rate": 1e-3} if method == "full" else METHOD_OPTIONS[method]
    runs = {}
    for packs in (False, True):
        _, out, reports, summary = run_train(tmp_path / str(packs), train_inputs, method=method, packing=packs,
                                             precision=precision, **options)
        assert summary.packing == packs and summary.precision == precision and summary.steps == 6
        curves = {name: [tuple(map(float, row.split(","))) for row in (reports / name).read_text().splitlines()[1:]]
                  for name in ("train_loss.csv", "val_loss.csv")}
        runs[packs] = out, curves, summary
    assert runs[True][2].shared_prefix_tokens > 0
    return runs


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_packed_training_follows_the_unpacked_run(tmp_path, train_inputs, method):
    """Packing changes the speed only: the same batches, steps, losses and weights as padded rows.

    In fp32, pinned: exact agreement is an fp32 property (see the bf16 test below for auto on bf16 CPUs)."""
    import torch
    from safetensors.torch import load_file

    runs = packed_and_unpacked(tmp_path, train_inputs, method, "fp32")
    for name, apart in runs[False][1].items():
        packed = runs[True][1][name]
        assert [step for step, _ in packed] == [step for step, _ in apart], name
        assert [loss for _, loss in packed] == pytest.approx([loss for _, loss in apart], rel=1e-3), name
    out, unpacked_out = runs[True][0], runs[False][0]
    before, after = load_file(train_inputs[1] / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert any(not before[k].equal(after[k].to(before[k].dtype)) for k in before if ".layers." in k)
    unpacked = load_file(unpacked_out / "merged" / "model.safetensors")
    for name, weight in after.items():
        torch.testing.assert_close(weight, unpacked[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_packed_training_follows_the_unpacked_run_in_bf16(tmp_path, train_inputs, method):
    """bf16 (forced; autocast runs on any x86 CPU, slowly where not native): packed and padded batches
    add up in different orders and shapes, so they round differently and match only to bf16 precision.

    bf16 keeps 8 bits of mantissa: each op rounds by up to 2**-8 (about 3.9e-3) relative. A loss
    passes through a few dozen such ops (2 blocks) and 6 steps feed each rounding back into the
    weights, so the curves may drift by a few ulps: rel 2e-2 (about 5 ulps). The gradients carry the
    same few-ulp relative error and Adam's per-element normalisation passes it on to the update, so
    each tensor's update (trained minus base weights) must match to 5e-2 of its norm; comparing whole
    weights instead would hide the update under the much larger base weights, or flag a near-zero
    gradient's Adam step flipping sign. Measured: about 3e-5 on the losses, at most 1.1e-2 on updates.
    """
    from safetensors.torch import load_file

    runs = packed_and_unpacked(tmp_path, train_inputs, method, "bf16")
    for name, apart in runs[False][1].items():
        packed = runs[True][1][name]
        assert [step for step, _ in packed] == [step for step, _ in apart], name
        assert [loss for _, loss in packed] == pytest.approx([loss for _, loss in apart], rel=2e-2), name
    before = load_file(train_inputs[1] / "model.safetensors")
    after, unpacked = (load_file(runs[packs][0] / "merged" / "model.safetensors") for packs in (True, False))
    updated = 0
    for name, weight in unpacked.items():
        update = weight.float() - before[name].float()
        if update.any():
            updated += 1
            drift = (after[name].float() - weight.float()).norm() / update.norm()
            assert drift < 5e-2, f"{name}: packed update differs by {drift:.3g} of its norm"
    assert updated


def test_unfreezing_schedule_and_layer_learning_rates(train_inputs):
    from types import SimpleNamespace

    from ftpipe import methods, models

    cfg, base, _ = train_inputs
    params = TrainParams(**{**cfg["train"], "method": "full", "gradual_unfreezing": True, "unfreeze_every_steps": 2,
                            "layer_lr_divisor": 2.0, "learning_rate": 0.1})
    model = models.load_model(base)
    callback = methods.unfreezing_callback(model, params)
    open_blocks = []
    for step in range(7):
        callback.on_step_begin(None, SimpleNamespace(global_step=step, epoch=0), None)
        open_blocks.append([layer.self_attn.q_proj.weight.requires_grad for layer in model.model.layers]
                           + [model.get_input_embeddings().weight.requires_grad])
    # blocks [0, 1] + embeddings: top block, then both, then the embeddings too
    assert open_blocks == [[False, True, False]] * 2 + [[True, True, False]] * 2 + [[True, True, True]] * 3
    rates = {round(g["lr"], 6) for g in methods.param_groups(model, params, set())}
    assert rates == {0.1, 0.05, 0.025}  # block 1 and the final norm, block 0, embeddings


@pytest.mark.parametrize(("overrides", "key"), [
    ({"method": "qlora"}, "quantization"),
    ({"method": "lora", "quantization": "nf4"}, "quantization"),
    ({"method": "qlora", "quantization": "int3"}, "quantization"),
    ({"method": "lora", "freeze_layers": 1}, "freeze_layers"),
    ({"method": "dora", "layer_lr_divisor": 2.6}, "layer_lr_divisor"),
    ({"method": "lora", "num_virtual_tokens": 8}, "num_virtual_tokens"),
    ({"method": "ia3", "lora_r": 8}, "lora_r"),
    ({"method": "full", "target_modules": ["q_proj"]}, "target_modules"),
    ({"method": "prompt_tuning", "merge": False, "lora_dropout": 0.1}, "lora_dropout"),
    ({"method": "prompt_tuning", "encoder_hidden_size": 8, "merge": False}, "encoder_hidden_size"),
    ({"method": "prefix_tuning"}, "merge"),
    ({"method": "full", "unfreeze_every_steps": 5}, "unfreeze_every_steps"),
    ({"method": "ia3", "ia3_target_modules": ["k_proj"], "ia3_feedforward_modules": ["down_proj"]},
     "ia3_feedforward_modules"),
    ({"early_stopping_patience": 2, "eval_steps": 25, "save_steps": 30}, "save_steps"),
    ({"method": "p_tuning", "merge": False, "packing": True}, "packing"),
    ({"method": "full", "fused_lora": True}, "fused_lora"),
    ({"method": "prompt_tuning", "merge": False, "fused_loss": True}, "fused_loss"),
    ({"processes": 2, "distributed": "fsdp", "fused_loss": True}, "fused_loss"),
    ({"attention": "packed_rows", "packing": False}, "attention"),
    ({"method": "p_tuning", "merge": False, "attention": "packed_rows"}, "attention"),
    ({"attention": "flash"}, "attention"),
    # Bottleneck adapters cannot become plain weights (merge: true is the default).
    ({"method": "bottleneck"}, "merge"),
    ({"method": "lora", "bottleneck_reduction": 8}, "bottleneck_reduction"),
    ({"method": "bottleneck", "merge": False, "bottleneck_placement": "sideways"}, "bottleneck_placement"),
    ({"method": "bottleneck", "merge": False, "fused_lora": True}, "fused_lora"),
    ({"method": "bottleneck", "merge": False, "init_from": "champion"}, "init_from"),
])
def test_invalid_combination_fails_at_params_time_naming_the_key(tmp_path, overrides, key):
    import yaml

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": overrides}))
    with pytest.raises(PipelineError, match=rf"params.yaml:\d+: train\.{key}: "):
        load_section("train", TrainParams, path)


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, train_inputs):
    # A huge learning rate makes validation loss worse after the first evaluation.
    _, out, _, summary = run_train(tmp_path, train_inputs, early_stopping_patience=1, eval_steps=1, save_steps=1,
                                   learning_rate=5.0, max_steps=20, warmup_ratio=0.0)
    assert summary.early_stopped and summary.steps < 20
    # The written model is the best checkpoint, so its loss is the best one, not the last evaluation's.
    assert summary.kept_step == summary.best_step < summary.steps
    assert summary.val_loss_final == summary.val_loss_best < summary.val_loss_last_eval
    curve = (tmp_path / "reports" / "val_loss.csv").read_text().splitlines()[1:]
    val_steps = [int(line.split(",")[0]) for line in curve]
    assert len(val_steps) == len(set(val_steps))  # every step evaluated once
    assert not list((tmp_path / "checkpoints").glob("*"))  # removed once the run succeeded, stale keys' too


@pytest.mark.parametrize("position_mask", [True, False], ids=["model-picks-positions", "hidden-states-projected"])
def test_loss_only_counts_response_tokens(tiny_model_dir, monkeypatch, position_mask):
    """Both ways of taking logits at assistant tokens only (the model's forward given a mask of
    positions; for model classes without it, the last hidden states projected by the output head)
    give the model's own loss, over a padded batch of two rows of different lengths."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from ftpipe import models
    from ftpipe.chat import IGNORE_INDEX, encode

    monkeypatch.setattr(trainer, "takes_position_mask", lambda model: position_mask)
    tokenizer, model = models.load_tokenizer(tiny_model_dir), models.load_model(tiny_model_dir)
    rows = [encode(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in (("say red", "red cat"), ("say one two three four", "four three two one"))]
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)(
        [{**row, "attention_mask": [1] * len(row["input_ids"])} for row in rows])
    with torch.no_grad():
        ours = trainer.response_only_loss(model, batch)
        reference = model(**batch).loss
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


def test_the_shipped_model_class_takes_a_mask_of_positions(tiny_model_dir):
    import torch

    from ftpipe import models

    assert trainer.takes_position_mask(models.load_model(tiny_model_dir))
    assert not trainer.takes_position_mask(torch.nn.Linear(2, 2))  # a module from elsewhere


def test_unknown_target_module_fails_naming_the_key(tmp_path, train_inputs):
    with pytest.raises(PipelineError, match=r"train.target_modules: "):
        run_train(tmp_path, train_inputs, target_modules=["no_such_proj"])
    assert not (tmp_path / "adapter").exists()


def test_killed_run_resumes_from_its_last_checkpoint(finished_project):
    project = finished_project  # base and data prepared, and a previous adapter that must survive the kill
    previous = (project / "models" / "adapter" / "adapter_model.safetensors").read_bytes()
    steps = 40
    for key, value in {"max_steps": steps, "save_steps": 5, "eval_steps": 20, "logging_steps": 5}.items():
        set_param(project, "train", key, value)
    killed_at_first_checkpoint(project, "train")
    # Nothing half-written: the previous adapter is intact and no temporary folder is left beside it.
    assert (project / "models" / "adapter" / "adapter_model.safetensors").read_bytes() == previous
    assert [p.name for p in (project / "models").iterdir() if ".tmp-" in p.name] == []

    rerun = stage(project, "train")
    assert rerun.returncode == 0, rerun.stderr
    assert "train: resuming from checkpoints/train/" in rerun.stdout
    summary = TrainReport.read(project / "reports" / "train.json")
    assert summary.steps == steps and 5 <= summary.resumed_from_step < steps
    # The loss log continues from the checkpoint: one row every 5 steps, none missing or repeated.
    logged = [int(line.split(",")[0]) for line in (project / "reports" / "train_loss.csv").read_text().splitlines()[1:]]
    assert logged == list(range(5, steps + 1, 5))
    assert (project / "models" / "adapter" / "merged" / "model.safetensors").is_file()
    assert not (project / "checkpoints" / "train").exists()  # removed with any stale key




@pytest.mark.parametrize(("method", "what"), [("lora", "loss"), ("full", "gradient norm")])
def test_diverging_run_stops_and_keeps_the_previous_model(tmp_path, train_inputs, method, what):
    """A non-finite loss or gradient norm stops the stage at that step; the last good output stays.

    On the tiny model 1e20 overflows within a step (smaller rates saturate RMSNorm instead: a finite,
    uniform loss); lora's loss turns nan first, full's gradient norm."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "marker").write_text("previous model")
    with pytest.raises(PipelineError, match=rf"^train: {what} is nan at step 2 \(learning_rate 1e\+20\): "
                                            r"training diverged; lower train\.learning_rate$"):
        run_train(tmp_path, train_inputs, method=method, learning_rate=1e20, warmup_ratio=0.0, max_steps=4, save_steps=1)
    assert [p.name for p in out.iterdir()] == ["marker"] and (out / "marker").read_text() == "previous model"
    assert not list(tmp_path.glob(".adapter.tmp-*")) and not (tmp_path / "reports" / "train.json").exists()
    assert not list((tmp_path / "checkpoints").glob("*"))  # a rerun would diverge again: nothing to resume


def test_a_checkpoint_is_resumed_only_under_the_same_code_and_libraries(tmp_path, monkeypatch):
    """The checkpoint folder's key changes with the training code and the library versions, not only
    the params and inputs: a checkpoint written by other code is never resumed."""
    import importlib.metadata
    from pathlib import Path

    from ftpipe import packing
    from ftpipe.paths import MANIFEST_NAME, split_file

    base, data = tmp_path / "base", tmp_path / "data"
    base.mkdir()
    data.mkdir()
    (base / MANIFEST_NAME).write_text(json.dumps({"source": "tiny"}))
    for split in ("train", "val"):
        (data / split_file(split)).write_text('{"id": "a"}\n')
    params = TrainParams()
    key = trainer.checkpoint_key(params, base, data)
    assert trainer.checkpoint_key(params, base, data) == key
    edited = tmp_path / "packing.py"
    edited.write_text(Path(packing.__file__).read_text() + "\n# edited\n")
    with monkeypatch.context() as patch:
        patch.setattr(packing, "__file__", str(edited))
        assert trainer.checkpoint_key(params, base, data) != key
    with monkeypatch.context() as patch:
        real = importlib.metadata.version
        patch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "transformers" else real(name))
        assert trainer.checkpoint_key(params, base, data) != key
    assert trainer.checkpoint_key(params, base, data) == key
