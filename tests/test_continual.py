"""Continual fine-tuning from the registered champion (`train.init_from: champion`): the parent is
materialized by prepare_parent, training starts from its weights, evaluate scores the old task on
the parent's own test split, and the gate refuses a challenger that lost it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, set_param, stage_env

from ftpipe.device import Placement
from ftpipe.errors import PipelineError
from stages import prepare_parent

CPU_FP32 = Placement("cpu", "fp32")


def test_from_base_writes_a_manifest_and_never_reads_the_registry(tmp_path):
    # An address nothing listens on: reading it would fail, so passing shows it was not read.
    manifest = prepare_parent.run(init_from="base", model_name="m", tracking_uri="http://127.0.0.1:9",
                                  out_dir=tmp_path / "parent")
    assert manifest == {"init_from": "base", "model_name": "m", "version": None}
    assert [p.name for p in (tmp_path / "parent").iterdir()] == ["manifest.json"]


def test_old_test_rows_now_in_train_or_val_are_left_out_of_the_old_task(tmp_path, tiny_model_dir):
    """New data can hold rows of the parent's test split: scoring the new model on them would
    flatter its old-task score, so they are left out (normalized prompts compared) and counted."""
    import shutil

    from conftest import qa_rows, write_jsonl

    from ftpipe import promotion
    from ftpipe.models import load_model, load_tokenizer
    from ftpipe.params import EvaluateParams
    from stages import evaluate

    def rows(qa):
        return [{"id": f"r{i}", "messages": [{"role": "user", "content": r["prompt"]},
                                             {"role": "assistant", "content": r["response"]}]} for i, r in enumerate(qa)]

    parent = Path(shutil.copytree(tiny_model_dir, tmp_path / "parent"))
    (parent / "manifest.json").write_text(json.dumps({"model_name": "m", "version": "3"}))
    old = qa_rows(10)
    write_jsonl(parent / "test.jsonl", rows(old))
    seen = [{**old[1], "prompt": old[1]["prompt"].upper() + "?"}, old[4]]  # the same prompts, normalized
    train_and_val = rows(qa_rows(20, offset=50) + seen[:1]) + rows(seen[1:])  # one in train, one in val
    params = EvaluateParams(max_new_tokens=2, batch_size=8)
    found = evaluate._old_task(params, load_tokenizer(tiny_model_dir), load_model(tiny_model_dir), parent, "3",
                               train_and_val, CPU_FP32, {})
    assert (found.examples, found.left_out_seen, found.parent) == (8, 2, "m v3")
    # Every old test row trained on now: nothing to measure.
    found = evaluate._old_task(params, load_tokenizer(tiny_model_dir), load_model(tiny_model_dir), parent, "3",
                               rows(old), CPU_FP32, {})
    assert (found.examples, found.left_out_seen, found.finetuned) == (0, 10, {})
    reasons = []
    assert promotion._old_task(reasons, "rougeL", found, 0.1)  # not a reason to refuse the challenger
    assert reasons == ["old-task check: all 10 rows of m v3's test split are in the current train or val split: "
                       "not checked"]


def test_no_champion_yet_starts_from_the_base_and_says_so(tmp_path):
    from mlflow import MlflowClient

    from ftpipe.models import start_weights

    uri = f"sqlite:///{tmp_path / 'db'}"
    MlflowClient(uri).search_registered_models()  # an existing, empty registry
    manifest = prepare_parent.run(init_from="champion", model_name="m", tracking_uri=uri, out_dir=tmp_path / "parent")
    assert manifest["version"] is None and "no m@champion" in manifest["note"]
    assert start_weights("champion", tmp_path / "parent", tmp_path / "base") == (
        tmp_path / "base", "base (no champion yet)", None)
    # With init_from: base models/parent/ is not even read (a stage run by hand needs no manifest).
    assert start_weights("base", tmp_path / "absent", tmp_path / "base") == (tmp_path / "base", "base", None)


def test_a_tracking_store_that_does_not_exist_is_an_error_not_no_champion(tmp_path):
    missing = tmp_path / "typo" / "mlruns.db"
    with pytest.raises(PipelineError, match=r"train.init_from: champion, but the tracking store sqlite:///.*typo/mlruns.db "
                                            r"does not exist"):
        prepare_parent.run(init_from="champion", model_name="m", tracking_uri=f"sqlite:///{missing}",
                           out_dir=tmp_path / "parent")
    assert not missing.exists() and not (tmp_path / "parent").exists()  # no empty store created, nothing written


def test_an_unreachable_registry_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(PipelineError, match=r"127.0.0.1:9"):
        prepare_parent.run(init_from="champion", model_name="m", tracking_uri="http://127.0.0.1:9",
                           out_dir=tmp_path / "parent")
    assert not (tmp_path / "parent").exists()  # never "no champion": nothing written


def test_init_from_champion_needs_a_merged_model(tmp_path):
    from ftpipe.params import validate_all

    text = (ROOT / "params.yaml").read_text().replace("  merge: true", "  merge: false") \
        .replace("  init_from: base", "  init_from: champion").replace("  gguf: [f16, q8_0]", "  gguf: []")
    (tmp_path / "params.yaml").write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("  init_from:"))
    with pytest.raises(PipelineError, match=rf"params.yaml:{line}: train.init_from: continual fine-tuning needs merge"):
        validate_all(tmp_path / "params.yaml")


@pytest.mark.slow
def test_continual_fine_tune_starts_from_the_champion_and_checks_the_old_task(finished_project):
    """The finished project's v1, made champion, is the parent: `dvc repro` after `init_from: champion`
    materializes it, trains from it, scores it and the new model on v1's test split, and registers
    v2 with its parent in the lineage and the old-task check among the gate's reasons."""
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    proj = finished_project
    client = MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    # The tiny model never beats the base by a clear margin, so v1 is made champion as an operator would.
    client.set_registered_model_alias("tiny-model", "champion", "1")
    champion_weights = load_file(proj / "models/adapter/merged/model.safetensors")  # what v1 registered
    set_param(proj, "train", "init_from", "champion")
    set_param(proj, "register", "max_old_task_drop", 0.5)
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=stage_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "prepare_parent: tiny-model v1 (champion) -> models/parent" in done.stdout
    assert "steps from tiny-model v1 (champion), val loss" in done.stdout

    manifest = json.loads((proj / "models/parent/manifest.json").read_text())
    assert (manifest["version"], manifest["old_test_split"]) == ("1", "test.jsonl")
    parent = load_file(proj / "models/parent/model.safetensors")
    assert all(torch.equal(parent[k], champion_weights[k]) for k in champion_weights)
    assert (proj / "models/parent/test.jsonl").read_text() == (proj / "data/prepared/test.jsonl").read_text()
    adapter_config = json.loads((proj / "models/adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"].endswith("models/parent")  # the adapter sits on the champion
    train = json.loads((proj / "reports/train.json").read_text())
    assert (train["parent"], train["parent_version"]) == ("tiny-model v1 (champion)", "1")

    old = json.loads((proj / "reports/metrics.json").read_text())["old_task"]
    assert old["parent"] == "tiny-model v1" and old["examples"] > 0
    assert set(old["parent_scores"]) == set(old["finetuned"]) >= {"rougeL", "perplexity"}
    assert old["parent_scores"]["perplexity"] != old["finetuned"]["perplexity"]  # trained: a different model
    assert "Old task: the parent tiny-model v1" in (proj / "reports/comparison.md").read_text()

    registration = json.loads((proj / "reports/registration.json").read_text())
    assert registration["version"] == "2"
    assert any(r.startswith("old task (tiny-model v1's test split") for r in registration["promotion"]["reasons"])
    version = client.get_model_version("tiny-model", "2")
    assert version.tags["parent"] == "tiny-model v1 (champion)"
    assert [f.path for f in client.list_artifacts(version.run_id, "data")] == ["data/test.jsonl", "data/train_prompts.json"]

    # The champion read again (as the flows do on every run) writes the same files: nothing downstream reruns.
    again = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "prepare_parent"], cwd=proj, env=stage_env(),
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=proj, env=stage_env(), capture_output=True,
                            text=True)
    assert "up to date" in status.stdout, status.stdout
