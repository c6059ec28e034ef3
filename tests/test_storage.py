"""Weights kept once: models stored in their own dtype, DVC outputs linked to its cache, and MLflow
holding the merged model once (the GGUF files by manifest only)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import stage_env

from ftpipe import models
from ftpipe.params import TrainParams

ROOT = Path(__file__).resolve().parents[1]


def test_the_shipped_dvc_config_links_outputs_to_the_cache_instead_of_copying(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=proj, check=True)
    shutil.copy(ROOT / ".dvc" / "config", proj / ".dvc" / "config")
    (proj / "weights.bin").write_bytes(b"\0" * 4096)
    subprocess.run([sys.executable, "-m", "dvc", "add", "-q", "weights.bin"], cwd=proj, env=stage_env(), check=True)
    out = proj / "weights.bin"
    cached = [p for p in (proj / ".dvc" / "cache").rglob("*") if p.is_file()]
    assert len(cached) == 1
    assert out.is_symlink() or out.stat().st_ino == cached[0].stat().st_ino  # one copy on disk, not two


def test_a_merged_model_is_stored_in_the_base_models_dtype(tmp_path, tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from ftpipe.methods import save_merged

    base = tmp_path / "base"
    models.load_model(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    shutil.copy(tiny_model_dir / "tokenizer.json", base)
    assert models.stored_dtype(base) == torch.bfloat16
    tokenizer = models.load_tokenizer(tiny_model_dir)
    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(models.load_model(base), LoraConfig(r=4, target_modules=["q_proj"]))
    for name, weight in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.5)  # a delta that merging must keep
    peft_model.save_pretrained(adapter)
    save_merged(peft_model, TrainParams(), base_dir=base, adapter_dir=adapter, tokenizer=tokenizer,
                out_dir=adapter / "merged")
    merged = models.load_model(adapter / "merged", dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    fp32 = models.load_model(base)
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p.float(), fp32.get_parameter(n))]
    assert changed and all("q_proj" in n for n in changed)
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    assert size(adapter / "merged") == size(base)  # bf16: half of what an fp32 copy would take


def test_mlflow_holds_the_merged_model_once_and_no_gguf_bytes(finished_project):
    artifacts = finished_project / "mlartifacts"
    assert not list(artifacts.rglob("*.gguf"))
    manifests = list(artifacts.rglob("gguf/manifest.json"))
    assert manifests
    files = json.loads(manifests[0].read_text())["files"]
    assert {entry["file"] for entry in files.values()} == {p.name for p in (finished_project / "models" / "gguf").glob("*.gguf")}
    weights = [p for p in artifacts.rglob("*.safetensors")]
    merged = finished_project / "models" / "adapter" / "merged"
    assert sum(p.stat().st_size for p in weights) == sum(p.stat().st_size for p in merged.glob("*.safetensors"))
