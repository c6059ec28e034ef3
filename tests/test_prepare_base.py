"""prepare_base: materializes a local model folder as safetensors with a manifest; refuses bad sources."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import set_param, stage

from ftpipe.errors import PipelineError
from ftpipe.models import sha256_of
from ftpipe.params import PrepareBaseParams
from stages.prepare_base import run


def test_local_folder_is_materialized_with_manifest(tmp_path, tiny_model_dir):
    out = tmp_path / "base"
    manifest = run(params=PrepareBaseParams(source="local", path=str(tiny_model_dir)), out_dir=out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "chat_template.jinja").is_file() or "chat_template" in (out / "tokenizer_config.json").read_text()
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["weights_sha256"]["model.safetensors"] == sha256_of(out / "model.safetensors")
    assert manifest["parameters"] > 10_000 and manifest["source"]["kind"] == "local"
    assert not list(tmp_path.glob(".base*"))


def test_missing_local_folder(tmp_path):
    with pytest.raises(PipelineError, match=r"prepare_base.path: local model folder not found: .*nowhere"):
        run(params=PrepareBaseParams(source="local", path=str(tmp_path / "nowhere")), out_dir=tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_pickle_weights_are_refused(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(PipelineError, match=r"cannot load model"):
        run(params=PrepareBaseParams(source="local", path=str(folder)), out_dir=tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_unreachable_hub_id_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError, match=r"no-such-org/no-such-model: cannot load"):
        run(params=PrepareBaseParams(source="hub", hub_id="no-such-org/no-such-model"), out_dir=tmp_path / "base")
    assert not (tmp_path / "base").exists()


@pytest.mark.slow
def test_embedded_smollm2(tmp_path):
    from ftpipe import models

    manifest = run(params=PrepareBaseParams(), out_dir=tmp_path / "base")
    assert manifest["parameters"] == 134_515_008 and manifest["source"]["kind"] == "embedded"
    tokenizer = models.load_tokenizer(tmp_path / "base")
    model = models.load_model(tmp_path / "base")
    from ftpipe.chat import prompt_text
    from ftpipe.metrics import generate

    prompt = prompt_text(tokenizer, [{"role": "user", "content": "What is the capital of France?"},
                                     {"role": "assistant", "content": ""}])
    assert "Paris" in generate(model, tokenizer, [prompt], max_new_tokens=12, batch_size=1)[0]


def _break(folder, case: str) -> None:
    if case == "truncated":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "remote_code":
        config = json.loads((folder / "config.json").read_text())
        config.update(model_type="mystery", auto_map={"AutoConfig": "configuration_mystery.MysteryConfig",
                                                      "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
        (folder / "config.json").write_text(json.dumps(config))
    else:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (folder / name).unlink(missing_ok=True)


@pytest.mark.parametrize(
    ("case", "problem"),
    [
        ("truncated", r"safetensors weights truncated or corrupt \(.+\)"),
        ("remote_code", r"the model needs its own code .*`prepare_base.trust_remote_code: true` would allow it"),
        ("no_tokenizer", r"tokenizer files missing \(no tokenizer.json, tokenizer.model or vocab file\)"),
    ],
)
def test_broken_model_folder_stops_the_stage_with_one_line(project, tmp_path, tiny_model_dir, case, problem):
    folder = tmp_path / f"broken-{case}"
    shutil.copytree(tiny_model_dir, folder)
    _break(folder, case)
    set_param(project, "prepare_base", "path", str(folder))
    result = stage(project, "prepare_base")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2, result.stderr
    assert len(errors) == 1 and re.fullmatch(rf"error: {re.escape(str(folder))}: {problem}", errors[0]), errors
    assert "Traceback" not in result.stderr and "sentencepiece" not in errors[0]
    assert [p.name for p in (project / "models").iterdir()] == [".gitignore"]  # nothing partial


@pytest.fixture
def templateless_dir(tmp_path, tiny_model_dir):
    """The tiny model without a chat template, like many base (not instruct) models."""
    folder = tmp_path / "templateless"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sky colour?"}]


def test_base_without_template_fails_naming_the_param(tmp_path, templateless_dir):
    with pytest.raises(PipelineError) as err:
        run(params=PrepareBaseParams(source="local", path=str(templateless_dir)), out_dir=tmp_path / "base")
    assert str(err.value) == (f"{templateless_dir}: tokenizer has no chat template; set prepare_base.chat_template "
                              "(chatml, llama3, zephyr, alpaca, or a .jinja file under the project)")
    assert not (tmp_path / "base").exists()


def test_named_template_is_saved_with_the_base(tmp_path, templateless_dir):
    from ftpipe import models

    out = tmp_path / "base"
    manifest = run(params=PrepareBaseParams(source="local", path=str(templateless_dir), chat_template="chatml"),
                   out_dir=out)
    assert manifest["chat_template"]["given"] == "chatml" and not manifest["chat_template"]["replaced"]
    text = models.load_tokenizer(out).apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSky colour?<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_template_file_is_used_and_hashed(tmp_path, templateless_dir, monkeypatch):
    from ftpipe import models

    monkeypatch.chdir(tmp_path)  # the project folder: the file's path is relative to it
    template = tmp_path / "templates" / "plain.jinja"
    template.parent.mkdir()
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    params = PrepareBaseParams(source="local", path=str(templateless_dir), chat_template="templates/plain.jinja")
    manifest = run(params=params, out_dir=tmp_path / "base")
    assert manifest["chat_template"]["sha256"] == sha256_of(template)
    text = models.load_tokenizer(tmp_path / "base").apply_chat_template(CONVERSATION, tokenize=False,
                                                                        add_generation_prompt=True)
    assert text == "[system] Be brief.\n[user] Sky colour?\n[assistant] "


def test_given_template_replaces_the_models_own_and_says_so(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from ftpipe import models
    from stages.prepare_base import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"prepare_base:\n  source: local\n  path: {tiny_model_dir}\n  chat_template: zephyr\n")
    main()
    assert capsys.readouterr().out.endswith(", chat template zephyr (replaces the model's own) -> models/base\n")
    assert json.loads((tmp_path / "models" / "base" / "manifest.json").read_text())["chat_template"]["replaced"]
    text = models.load_tokenizer(tmp_path / "models" / "base").apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|system|>\nBe brief.<|im_end|>\n<|user|>") and text.endswith("<|assistant|>\n")


@pytest.mark.parametrize(("value", "problem"), [
    ("vicuna", r"unknown template 'vicuna' \(choices: chatml, llama3, zephyr, alpaca, or a \.jinja file under the "
               r"project\)"),
    ("templates/missing.jinja", r"template file not found: templates/missing.jinja"),
    ("../outside.jinja", r"\.\./outside.jinja is outside the project folder"),
])
def test_bad_chat_template_fails_at_params_validation_naming_the_key(tmp_path, value, problem):
    from ftpipe.params import load_section

    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "outside.jinja").write_text("{{ messages }}")
    path = project / "params.yaml"
    path.write_text(f"prepare_base:\n  source: embedded\n  chat_template: {value}\n")
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}:3: prepare_base\.chat_template: {problem}$"):
        load_section("prepare_base", PrepareBaseParams, path)
