"""End to end on the tiny model: dvc repro, caching, param-change reruns, MLflow registry (the Prefect
flow's run: test_flow_run.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import dvc, ran, register_in_process, set_param, stage, stage_env

from flows.common import STAGES, StageFailed, dvc_repro


def lock_md5(proj, stage_name: str, path: str) -> str:
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage_name]["outs"] if o["path"] == path)


def test_dvc_repro_end_to_end(finished_project):
    """From the session's one pipeline run of a fresh tiny project (built_project: every stage run
    through `dvc repro`), on a copy of it; then `dvc repro` after param edits (a training param's:
    test_project_store's sweep)."""
    import mlflow

    project = finished_project
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)

    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    keys = {"bleu", "chrf", "rouge1", "rouge2", "rougeL", "rougeLsum", "exact_match", "perplexity",
            "general_perplexity", "capped_share"}
    assert set(metrics["base"]) == set(metrics["fewshot"]) == set(metrics["finetuned"]) == keys
    assert metrics["fewshot"]["general_perplexity"] == metrics["base"]["general_perplexity"]
    assert metrics["fewshot"]["perplexity"] != metrics["base"]["perplexity"]  # the shots change the context
    assert len(metrics["few_shot_ids"]) == 3 and metrics["general_text"]["tokens"] > 256
    assert metrics["training"]["best_step"] > 0 and "possible_overfitting" in metrics["training"]
    generations = [json.loads(line) for line in (project / "reports" / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == metrics["examples"] > 0
    assert {"prompt", "reference", "base", "fewshot", "finetuned", "rougeL_base", "rougeL_fewshot",
            "rougeL_finetuned"} <= set(generations[0])
    # Every candidate's per-example scores, for the gate's paired bootstrap.
    assert {f"{key}_{name}" for key in ("bleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "nll", "tokens")
            for name in ("base", "fewshot", "finetuned")} <= set(generations[0])
    assert sum(g["tokens_base"] for g in generations) == sum(g["tokens_finetuned"] for g in generations)
    assert metrics["finetuned"]["rougeL"] == pytest.approx(sum(g["rougeL_finetuned"] for g in generations)
                                                           / len(generations))
    comparison = (project / "reports" / "comparison.md").read_text()
    assert "| base few-shot |" in comparison and "| general_perplexity |" in comparison
    assert "Forgetting: general-text perplexity" in comparison and "train-validation gap" in comparison
    assert "| fine-tuned vs base | 95 % CI |" in comparison and "95 % CI: paired bootstrap" in comparison

    # The registered version loads back by its models:/ URI, offline, and generates.
    registration = json.loads((project / "reports" / "registration.json").read_text())
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns.db'}")
    model = mlflow.pyfunc.load_model(registration["model_uri"])
    outputs = model.predict(["say red blue number 3"])
    assert len(outputs) == 1 and isinstance(outputs[0], str)

    # Lineage tags: git commit and the dvc.lock hashes of data and base model.
    client = mlflow.MlflowClient()
    version = client.get_model_version(registration["model_name"], registration["version"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert version.tags["git_commit"].startswith(head)
    assert version.tags["data_md5"] == lock_md5(project, "prepare_data", "data/prepared")
    assert version.tags["base_model_md5"] == lock_md5(project, "prepare_base", "models/base")
    assert version.tags["method"] == "lora" and version.tags["param.train.lora_r"] == "16"

    # Base, few-shot and fine-tuned are sibling runs under the pipeline run, with the same metric keys.
    runs = {name: client.get_run(registration[f"{name}_run_id"]) for name in ("base", "fewshot", "finetuned")}
    for name, run in runs.items():
        assert run.data.tags["mlflow.parentRunId"] == registration["pipeline_run_id"]
        assert keys <= set(run.data.metrics)
        assert run.data.metrics["rougeL"] == pytest.approx(metrics[name]["rougeL"])
    tuned_run = runs["finetuned"]
    assert tuned_run.data.metrics["best_step"] == metrics["training"]["best_step"]
    assert {"train_val_gap", "possible_overfitting"} <= set(tuned_run.data.metrics)
    assert len(client.get_metric_history(tuned_run.info.run_id, "train_loss")) == 6
    pipeline_run = client.get_run(registration["pipeline_run_id"])
    assert pipeline_run.data.metrics["data_leaks"] == 0 and pipeline_run.data.params["train.method"] == "lora"
    logged = {a.path for a in client.list_artifacts(registration["pipeline_run_id"], "reports")}
    assert {"reports/data_report.md", "reports/data.json", "reports/comparison.md", "reports/loss.png",
            "reports/quantize.json", "reports/quantize.md"} <= logged
    quant = json.loads((project / "reports" / "quantize.json").read_text())
    assert list(quant["variants"]) == ["int8"] and quant["variants"]["int8"]["footprint_ratio"] < 1
    assert pipeline_run.data.metrics["quant_int8_footprint_ratio"] == pytest.approx(
        quant["variants"]["int8"]["footprint_ratio"])
    assert list(quant["pruned"]) == ["magnitude_30", "2of4"]  # the shipped params.yaml's
    assert pipeline_run.data.metrics["pruned_2of4_sparsity"] == pytest.approx(0.5)
    assert pipeline_run.data.metrics["pruned_magnitude_30_perplexity_ratio"] == pytest.approx(
        quant["pruned"]["magnitude_30"]["perplexity_ratio"])
    table = client.load_table(pipeline_run.info.experiment_id, "generations.json", run_ids=[pipeline_run.info.run_id])
    assert len(table) == metrics["examples"] and "rougeL_fewshot" in table.columns

    # The first version becomes challenger, and champion only where the lower bound of its gain over
    # the base model is above 0 without forgetting (general-text perplexity at most 10% above the
    # base model's). Register's interval is the one evaluate reported: same scores, same settings.
    over_base = metrics["intervals"]["finetuned_vs_base"]["rougeL"]
    assert registration["promotion"]["intervals"]["base"] == over_base
    # Six fp32 steps leave the tiny model answering as the base does (ROUGE ties), on every CPU kind:
    # kept as challenger. A whole run that is promoted: test_retrain's second trigger (more data, more
    # epochs), through the same stages.
    assert not over_base["low"] > 0
    assert registration["aliases"] == ["challenger"] and not registration["promotion"]["promote"]
    assert str(client.get_model_version_by_alias("tiny-model", "challenger").version) == "1"
    assert version.tags["promotion"].startswith("kept as challenger")

    # Nothing changed: nothing reruns and the lock stays byte for byte.
    lock = (project / "dvc.lock").read_text()
    second = dvc(project, "repro")
    assert second.returncode == 0 and ran(second.stdout) == set()
    assert (project / "dvc.lock").read_text() == lock

    # A quantize param reruns quantize, not the stages beside it (train, evaluate).
    set_param(project, "quantize", "prompts", 3)
    quantized = dvc(project, "repro", "quantize")
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    assert ran(quantized.stdout) == {"validate", "quantize"}  # validate: any params.yaml edit, and cheap
    assert json.loads((project / "reports" / "quantize.json").read_text())["prompts"] == 3

    # An evaluation param reruns the scoring (the base's and the tuned model's) and register.
    set_param(project, "evaluate", "max_new_tokens", 5)
    third = dvc(project, "repro")
    assert third.returncode == 0, third.stderr[-3000:]
    assert ran(third.stdout) == {"validate", "score_base", "evaluate", "register"}
    assert json.loads((project / "reports" / "registration.json").read_text())["version"] == "2"

    # The gate both ways, through the register stage, on per-example scores: a challenger better by
    # a clear margin is promoted and `models:/NAME@champion` loads it; the same model again, whatever
    # its scores, or a better one that forgot general language, stays challenger and says why (in
    # the version's tag too). Versions 1 and 2 are this same adapter, which the gate never promotes
    # over itself: the loop starts with no champion.
    if "champion" in client.get_registered_model("tiny-model").aliases:
        client.delete_registered_model_alias("tiny-model", "champion")
    for score, general, promoted, version_number in ((0.9, 20.0, True, "3"), (0.5, 20.0, False, "4"),
                                                     (0.95, 30.0, False, "5")):
        if version_number == "5":  # v3 as if trained elsewhere: the champion is scored again, for real
            client.set_model_version_tag("tiny-model", "3", "adapter_md5", "from-another-run")
        tweaked = json.loads((project / "reports" / "metrics.json").read_text())
        tweaked["base"]["general_perplexity"], tweaked["finetuned"]["general_perplexity"] = 20.0, general
        (project / "reports" / "metrics.json").write_text(json.dumps(tweaked))
        rows = [json.loads(line) for line in (project / "reports" / "generations.jsonl").read_text().splitlines()]
        for row in rows:
            row["rougeL_base"], row["rougeL_finetuned"] = 0.1, score
        (project / "reports" / "generations.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        result = register_in_process(project)
        assert result["version"] == version_number and result["promotion"]["promote"] is promoted
        if version_number == "3":
            assert "no champion yet" in result["promotion"]["reasons"]
        if version_number == "4":
            assert result["champion"]["scored"].startswith("same model")
            assert ("+0.0000 rougeL, 95 % CI [+0.0000, +0.0000] over champion v3 (the same model as this challenger) "
                    f"(paired bootstrap, {len(rows)} examples; lower bound must be > 0): fail"
                    in result["promotion"]["reasons"])
    # v5 beats the re-scored champion (the tiny model's own scores) and fails on forgetting alone.
    assert result["champion"]["scored"].startswith("generated again on this test split (")
    assert next(r for r in result["promotion"]["reasons"] if "over champion v3" in r).endswith(": pass")
    assert "general_perplexity 30.0000 vs base 20.0000 (+50.0%, allowed <= +10.0%): fail" in result["promotion"]["reasons"]
    tag = client.get_model_version("tiny-model", "5").tags["promotion"]
    assert tag.startswith("kept as challenger: ") and "+50.0%, allowed <= +10.0%): fail" in tag
    assert str(client.get_model_version_by_alias("tiny-model", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("tiny-model", "challenger").version) == "5"
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns.db'}")
    assert len(mlflow.pyfunc.load_model("models:/tiny-model@champion").predict(["say red"])) == 1


def test_bad_param_stops_the_stage_with_one_line_and_no_output(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare_data"]["sead"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = stage(project, "prepare_data")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: params.yaml:{_line(project, 'sead')}: prepare_data.sead: unknown key"]
    assert not (project / "data" / "prepared").exists()
    # Through DVC, as the flow runs it (the params check first): the check's own line and exit code
    # come back, so no retry.
    set_param(project, "prepare_base", "trust_remote_code", "sometimes")
    with pytest.raises(StageFailed) as err:
        dvc_repro("validate", project)
    assert err.value.returncode == 2 and "prepare_base.trust_remote_code: Input should be a valid boolean" in str(err.value)
    assert [p.name for p in (project / "models").iterdir()] == [".gitignore"]


def test_missing_data_file_and_missing_base_model(project):
    assert stage(project, "prepare_data").stderr.strip().splitlines()[-1] == (
        "error: models/base: base model not prepared; its tokenizer sets the length filters "
        "(run `dvc repro prepare_base`)")
    assert stage(project, "prepare_base").returncode == 0
    manifest = (project / "models" / "base" / "manifest.json").read_text()
    set_param(project, "prepare_data", "path", "nowhere/raw.jsonl")
    result = stage(project, "prepare_data")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: prepare_data.path: data file not found: nowhere/raw.jsonl"
    assert not (project / "data" / "prepared").exists()
    set_param(project, "prepare_base", "path", "nowhere/model")
    result = stage(project, "prepare_base")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: prepare_base.path: local model folder not found: nowhere/model"
    assert (project / "models" / "base" / "manifest.json").read_text() == manifest  # the old output is untouched


def test_stage_and_flow_modules_import_nothing_heavy():
    code = ("import sys; import stages.prepare_base, stages.prepare_data, stages.train, stages.evaluate, "
            "stages.register, stages.quantize, ftpipe.metrics, ftpipe.models, ftpipe.quantization; "
            "print(sorted(m for m in ('torch', 'transformers', 'mlflow', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=stage_env(), check=True)
    assert out.stdout.strip() == "[]"


def _line(project, key: str) -> int:
    lines = (project / "params.yaml").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.strip().startswith(f"{key}:"))
