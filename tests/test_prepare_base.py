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
    assert not (project / "models").exists()
