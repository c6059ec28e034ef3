"""Log the pipeline run to MLflow and register the fine-tuned model with its lineage.

One parent run per pipeline run holds the params, reports, loss curve and the per-example
generations table (prompt, reference, each candidate's output and ROUGE-L); under it a `base`, a
`fewshot` and a `finetuned` run carry the same metric keys, so selecting them and pressing Compare
lines them up. The fine-tuned run also carries the training losses, the best validation step and
the overfitting verdict. The merged fine-tuned model is logged and registered as a new version of
`register.model_name`, tagged with git commit, dvc.lock hashes of data and base model, method and
params. The new version becomes `challenger`; `champion` moves to it only if the promotion gate
(ftpipe/promotion.py: metric, forgetting and leak checks) passes, and the decision's reasons are logged.
The gate is decided first, against the champion read through ftpipe/registry.py: a registry that
cannot be read (server down, champion's run deleted) stops the stage with one line and exit 2
before any run, version or alias is created or moved.
Reads params.yaml (all sections), dvc.lock, models/, reports/; writes reports/registration.json.
Run: python -m stages.register
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from ftpipe.errors import run_cli
from ftpipe.io import read_json, read_jsonl, write_json
from ftpipe.params import RegisterParams, load_section, read_params_file

REPORTS = Path("reports")
BASE_DIR = Path("models/base")
ADAPTER_DIR = Path("models/adapter")
# The model's own runtime needs; explicit because MLflow's inference imports torchvision, which is absent.
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def _requirements(model) -> list[str]:
    """Pinned packages the logged model needs; peft too when it is a PeftModel (prompt-learning
    methods, whose virtual tokens cannot be merged into the weights)."""
    names = MODEL_REQUIREMENTS + (("peft",) if hasattr(model, "peft_config") else ())
    return [f"{name}=={importlib.metadata.version(name)}" for name in names]


def run(
    *,
    params: RegisterParams,
    all_params: dict[str, Any],
    lineage: dict[str, str],
    tracking_uri: str,
    artifact_location: str,
    base_dir: Path,
    adapter_dir: Path,
    reports_dir: Path,
) -> dict[str, Any]:
    import mlflow

    from ftpipe import registry
    from ftpipe.tracking import redact

    reports = _read_reports(reports_dir)
    client = registry.connect(tracking_uri)
    # Decided before anything is created: a registry that cannot be read (server down, champion's
    # run gone) stops here, leaving no run, no version and no alias moved.
    decision = _decide(client, params, reports)
    mlflow.set_tracking_uri(tracking_uri)
    with registry.errors(tracking_uri, f"registering {params.model_name}"):
        experiment_id = _experiment_id(client, params.experiment, artifact_location)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline-{lineage['git_commit'][:8]}") as parent:
            _log_pipeline_run(all_params, lineage, reports, reports_dir)
            runs = _log_candidates(experiment_id, lineage, reports["metrics"])
            with mlflow.start_run(experiment_id=experiment_id, run_name="finetuned", nested=True) as tuned_run:
                runs["finetuned"] = tuned_run.info.run_id
                _log_training(lineage, reports, reports_dir)
                version = _log_model(params.model_name, base_dir, adapter_dir)
        _tag_version(client, params.model_name, version, lineage, all_params, runs["finetuned"])
        _set_aliases(client, params.model_name, version, decision)
        client.set_tag(parent.info.run_id, "promotion", decision.summary())
    return {
        "model_name": params.model_name,
        "version": version,
        "model_uri": f"models:/{params.model_name}/{version}",
        "experiment": params.experiment,
        "pipeline_run_id": parent.info.run_id,
        "base_run_id": runs["base"],
        "fewshot_run_id": runs["fewshot"],
        "finetuned_run_id": runs["finetuned"],
        "tracking_uri": redact(tracking_uri),
        "aliases": ["challenger", "champion"] if decision.promote else ["challenger"],
        "promotion": {"promote": decision.promote, "reasons": decision.reasons},
    }


def _read_reports(reports_dir: Path) -> dict[str, Any]:
    return {"metrics": read_json(reports_dir / "metrics.json"), "train": read_json(reports_dir / "train.json"),
            "data": read_json(reports_dir / "data.json"), "generations": read_jsonl(reports_dir / "generations.jsonl")}


def _decide(client, params: RegisterParams, reports: dict[str, Any]):
    """The promotion gate against the current champion (ftpipe.promotion)."""
    from ftpipe import registry
    from ftpipe.promotion import decide

    champion_version, champion = registry.champion(client, params.model_name) or (None, None)
    metrics = reports["metrics"]
    return decide(metric=params.primary_metric, min_improvement=params.min_improvement,
                  challenger=metrics["finetuned"], base=metrics["base"], champion=champion,
                  champion_version=champion_version, leaks=reports["data"]["leaks"]["total"],
                  max_forgetting=params.max_forgetting)


def _experiment_id(client, name: str, artifact_location: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _log_pipeline_run(all_params: dict[str, Any], lineage: dict[str, str], reports: dict[str, Any],
                      reports_dir: Path) -> None:
    """The parent run: params, data and quantization figures, report files, generations table."""
    import mlflow

    from ftpipe.tracking import flatten

    data, generations = reports["data"], reports["generations"]
    mlflow.log_params(flatten(all_params))
    mlflow.set_tags({"role": "pipeline", **lineage})
    mlflow.log_metrics({"data_rows_in": data["rows_in"], "data_rows_out": data["rows_out"],
                        "data_leaks": data["leaks"]["total"],
                        **{f"data_rows_{name}": n for name, n in data["splits"].items()}})
    if (reports_dir / "quantize.json").is_file():
        quant = read_json(reports_dir / "quantize.json")["variants"]
        mlflow.log_metrics({f"quant_{name}_{key}": v[key] for name, v in quant.items()
                            for key in ("footprint_ratio", "perplexity_ratio", "token_agreement")})
    for name in ("data.json", "data_report.md", "leaks.jsonl", "quantize.json", "quantize.md", "train.json", "metrics.json",
                 "comparison.md", "loss.png"):
        if (reports_dir / name).is_file():
            mlflow.log_artifact(str(reports_dir / name), artifact_path="reports")
    mlflow.log_table({k: [g[k] for g in generations] for k in generations[0]}, "generations.json")


def _log_candidates(experiment_id: str, lineage: dict[str, str], metrics: dict[str, Any]) -> dict[str, str]:
    """The base and few-shot sibling runs; {name: run id}."""
    import mlflow

    runs = {}
    for name in ("base", "fewshot"):
        with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True) as child:
            mlflow.set_tags({"role": "candidate", "candidate": name, **lineage})
            mlflow.log_metrics(metrics[name])
            runs[name] = child.info.run_id
    return runs


def _log_training(lineage: dict[str, str], reports: dict[str, Any], reports_dir: Path) -> None:
    """Into the active fine-tuned run: its metrics, training losses and overfitting verdict."""
    import mlflow

    metrics, train = reports["metrics"], reports["train"]
    mlflow.set_tags({"role": "candidate", "candidate": "finetuned", **lineage})
    mlflow.log_metrics(metrics["finetuned"])
    mlflow.log_metrics({k: v for k, v in train.items()
                        if k in ("val_loss_final", "val_loss_best", "train_loss_final", "train_val_gap", "best_step")})
    training = metrics.get("training", {})
    if "possible_overfitting" in training:
        mlflow.log_metrics({"val_loss_above_best": training["val_loss_above_best"],
                            "possible_overfitting": float(training["possible_overfitting"])})
    for step, loss in _curve(reports_dir / "train_loss.csv"):
        mlflow.log_metric("train_loss", loss, step=step)
    for step, loss in _curve(reports_dir / "val_loss.csv"):
        mlflow.log_metric("val_loss", loss, step=step)


def _log_model(model_name: str, base_dir: Path, adapter_dir: Path) -> str:
    """Log the merged fine-tuned model into the active run and register it; its new version."""
    import mlflow

    from ftpipe import models
    from ftpipe.chat import render

    model, tokenizer = models.load_finetuned(base_dir, adapter_dir), models.load_tokenizer(base_dir)
    template = render(tokenizer, [{"role": "user", "content": "{prompt}"}], generation_prompt=True)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        prompt_template=template,
        model_config={"max_new_tokens": 64, "do_sample": False},
        pip_requirements=_requirements(model),
        registered_model_name=model_name,
    )
    return str(info.registered_model_version)


def _tag_version(client, model_name: str, version: str, lineage: dict[str, str], all_params: dict[str, Any],
                 tuned_run_id: str) -> None:
    """Lineage and params as version tags, so a version says what produced it."""
    from ftpipe.tracking import flatten

    for key, value in {**lineage, **{f"param.{k}": v for k, v in flatten(all_params).items()}}.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.update_model_version(model_name, version,
                                description=f"{lineage['method']} fine-tune; metrics in run {tuned_run_id}")


def _set_aliases(client, model_name: str, version: str, decision) -> None:
    """The new version becomes `challenger`; `champion` moves to it only if the gate passed."""
    client.set_registered_model_alias(model_name, "challenger", version)
    if decision.promote:
        client.set_registered_model_alias(model_name, "champion", version)
    client.set_model_version_tag(model_name, version, "promotion", decision.summary())


def _curve(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(int(step), float(loss)) for step, loss in (line.split(",") for line in lines if line)]


def main() -> None:
    from ftpipe import tracking

    tracking.bound_http_retries()
    params = load_section("register", RegisterParams)
    all_params, _ = read_params_file()
    train_config = read_json(ADAPTER_DIR / "train_config.json")
    project = Path(".")
    result = run(
        params=params,
        all_params=all_params,
        lineage=tracking.lineage(project, method=train_config["params"]["method"]),
        tracking_uri=tracking.tracking_uri(project),
        artifact_location=tracking.artifact_location(project),
        base_dir=BASE_DIR,
        adapter_dir=ADAPTER_DIR,
        reports_dir=REPORTS,
    )
    write_json(REPORTS / "registration.json", result)
    print(f"register: {result['model_uri']} (pipeline run {result['pipeline_run_id']})")


if __name__ == "__main__":
    run_cli(main)
