"""One device and dtype decision (ftpipe.device), and every stage that runs a model for inference
running it there: forced to the CPU in bf16 here, whatever the machine would pick."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, qa_rows, stage_env

from ftpipe import models, scoring
from ftpipe.device import Placement, bf16_supported, check_placed, decide, place
from ftpipe.errors import PipelineError
from ftpipe.params import EvaluateParams, ExportParams, PrepareDataParams, PreparePrefsParams, RegisterParams, load_section

BF16 = Placement("cpu", "bf16")


def test_auto_follows_the_machine_and_explicit_choices_win():
    cuda = torch.cuda.is_available()
    auto = decide()
    assert auto.device == ("cuda" if cuda else "cpu")
    assert auto.precision == ("bf16" if bf16_supported(auto.device) else "fp32")
    assert decide(device="cpu", precision="fp32") == Placement("cpu", "fp32")
    assert decide(device="cpu", precision="bf16").dtype == torch.bfloat16
    if not cuda:
        with pytest.raises(PipelineError, match=r"^inference.device: cuda, but torch sees no CUDA device"):
            decide(device="cuda")


def test_the_fp32_cpu_script_hides_bf16_from_torch_and_the_decision():
    """scripts/fp32_cpu.sh (`make test-fp32-cpu`): the suite as on a CPU without bf16, on any x86 CPU."""
    probe = ("import torch; from ftpipe import device; "
             "print(torch.backends.cpu.get_cpu_capability(), device.bf16_supported(), device.decide())")
    done = subprocess.run([str(ROOT / "scripts" / "fp32_cpu.sh"), sys.executable, "-c", probe], cwd=ROOT,
                          env=stage_env(), capture_output=True, text=True, timeout=120)
    if os.geteuid() != 0:  # no mount namespace without root: one line saying so
        assert done.returncode == 2 and "needs root" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-2000:]
    capability, bf16, placement = done.stdout.split(maxsplit=2)
    assert capability in {"DEFAULT", "AVX2"} and bf16 == "False" and placement.strip() == "cpu fp32"
    assert "avx512" not in subprocess.run(
        [str(ROOT / "scripts" / "fp32_cpu.sh"), "cat", "/proc/cpuinfo"], capture_output=True, text=True).stdout
    if not torch.cuda.is_available():  # the machine itself is unchanged outside the script
        assert decide().precision == ("bf16" if bf16_supported() else "fp32")


def test_placing_moves_every_weight_and_keeps_the_rotary_frequencies_in_fp32(tiny_model_dir):
    model = place(models.load_model(tiny_model_dir), BF16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    frequencies = [b for name, b in model.named_buffers() if name.endswith("inv_freq")]
    assert frequencies and all(b.dtype == torch.float32 for b in frequencies)
    # Loading straight into the placement gives the same model.
    direct = models.load_model(tiny_model_dir, placement=BF16)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values()))


def test_a_weight_left_behind_is_an_error_naming_it(tiny_model_dir):
    model = models.load_model(tiny_model_dir)
    check_placed(model, Placement("cpu", "fp32"))
    model.model.layers[0].register_buffer("stray", torch.zeros(2, device="meta"))
    with pytest.raises(PipelineError, match=r"model.layers.0.stray is on meta float32, not cpu fp32"):
        check_placed(model, Placement("cpu", "fp32"))
    with pytest.raises(PipelineError, match=r"is on cpu float32, not cpu bf16"):
        check_placed(models.load_model(tiny_model_dir), BF16)


def test_evaluate_runs_every_candidate_where_the_decision_says(finished_project, tmp_path, monkeypatch):
    from stages import evaluate, score_base

    proj = finished_project
    seen = []
    real = scoring.score_model

    def spy(model, *args, **kwargs):
        weight = next(model.parameters())
        seen.append((kwargs["name"], weight.device.type, weight.dtype))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_model", spy)
    params = load_section("evaluate", EvaluateParams, proj / "params.yaml").model_copy(update={"max_examples": 2})
    monkeypatch.chdir(proj)  # the general text's path is relative to the project
    score_base.run(params=params, base_dir=proj / "models" / "base", data_dir=proj / "data" / "prepared",
                   out=tmp_path / "base_scores.json", placement=BF16)
    # Scores of another placement are not this evaluation's: refused, not mixed in.
    with pytest.raises(PipelineError, match=r"base_scores.json: scored with precision 'bf16', this evaluation "
                                            r"uses 'fp32'"):
        evaluate.run(params=params, bootstrap=load_section("register", RegisterParams, proj / "params.yaml"),
                     base_dir=proj / "models" / "base", adapter_dir=proj / "models" / "adapter",
                     data_dir=proj / "data" / "prepared", train_report=proj / "reports" / "train.json",
                     general_text=proj / params.general_text, reports_dir=tmp_path,
                     placement=Placement("cpu", "fp32"))
    report = evaluate.run(params=params,
                          bootstrap=load_section("register", RegisterParams, proj / "params.yaml"),
                          base_dir=proj / "models" / "base", adapter_dir=proj / "models" / "adapter",
                          data_dir=proj / "data" / "prepared", train_report=proj / "reports" / "train.json",
                          general_text=proj / params.general_text, reports_dir=tmp_path, placement=BF16)
    assert seen == [(name, "cpu", torch.bfloat16) for name in ("base", "base few-shot", "fine-tuned")]
    assert report.settings["device"] == "cpu" and report.settings["precision"] == "bf16"


def test_preference_pairs_are_generated_where_the_decision_says(tmp_path, talking_model, monkeypatch):
    from ftpipe import preferences
    from stages import prepare_prefs

    seen = []
    real = preferences.self_pairs

    def spy(sft, model, *args, **kwargs):
        weight = next(model.parameters())
        seen.append((weight.device.type, weight.dtype))
        return real(sft, model, *args, **kwargs)

    monkeypatch.setattr(preferences, "self_pairs", spy)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    for split, qa in zip(("train", "val", "test"), qa_rows(3)):  # prompts the talking model answers in words
        row = {"id": f"{split}-0", "messages": [{"role": "user", "content": qa["prompt"]},
                                                 {"role": "assistant", "content": "something else entirely"}]}
        (prepared / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    prepare_prefs.run(params=PreparePrefsParams(max_new_tokens=8), data=PrepareDataParams(source="file", path="x"),
                      enabled=True, base_dir=talking_model / "merged", prepared_dir=prepared, out_dir=tmp_path / "prefs",
                      report_path=tmp_path / "preferences.json", project_dir=tmp_path, placement=BF16)
    assert seen == [("cpu", torch.bfloat16)]


def test_export_checks_run_where_the_decision_says(finished_project, tmp_path, monkeypatch):
    from stages import export

    proj = finished_project
    seen = []
    real = export._logits

    def spy(model, ids):
        weight = next(model.parameters())
        seen.append((weight.device.type, weight.dtype))
        return real(model, ids)

    monkeypatch.setattr(export, "_logits", spy)
    params = load_section("export", ExportParams, proj / "params.yaml").model_copy(update={"gguf": ["f16"],
                                                                                          "prompts": 1})
    report = export.run(params=params, merged_dir=proj / "models" / "adapter" / "merged",
                        val_file=proj / "data" / "prepared" / "val.jsonl", out_dir=tmp_path / "gguf",
                        reports_dir=tmp_path, pre_tokenizer="default", name="t", placement=BF16)
    assert seen == [("cpu", torch.bfloat16)] * 2  # the merged model, then the file read back
    assert report.formats["f16"].top1_agreement > 0.9  # bf16 on both sides still tells a sound file


def test_serving_runs_on_the_decided_device(tmp_path, monkeypatch):
    from services.serve import environment

    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", raising=False)

    assert environment(tmp_path, "cpu")["MLFLOW_DEFAULT_PREDICTION_DEVICE"] == "-1"
    assert environment(tmp_path, "cuda")["MLFLOW_DEFAULT_PREDICTION_DEVICE"] == "0"
