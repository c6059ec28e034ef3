"""Log the pipeline run to MLflow and register the fine-tuned model with its lineage.

One parent run per pipeline run holds the params, reports, loss curve and the per-example
generations table (prompt, reference, each candidate's output and ROUGE-L); under it a `base`, a
`fewshot` and a `finetuned` run carry the same metric keys, so selecting them and pressing Compare
lines them up. The fine-tuned run also carries the training losses, the best validation step and
the overfitting verdict. The merged fine-tuned model is logged and registered as a new version of
`register.model_name`, tagged with git commit, dvc.lock hashes of data and base model, method and
params. The new version becomes `challenger`; `champion` moves to it only if the promotion gate
(ftpipe/promotion.py: metric, forgetting and leak checks) passes, and the decision's reasons are logged.
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
    from mlflow import MlflowClient

    from ftpipe import models
    from ftpipe.chat import render
    from ftpipe.tracking import flatten, redact

    metrics = read_json(reports_dir / "metrics.json")
    train = read_json(reports_dir / "train.json")
    data = read_json(reports_dir / "data.json")
    generations = read_jsonl(reports_dir / "generations.jsonl")

    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(params.experiment)
    experiment_id = (experiment.experiment_id if experiment else
                     client.create_experiment(params.experiment, artifact_location=artifact_location))
    run_name = f"pipeline-{lineage['git_commit'][:8]}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as parent:
        mlflow.log_params(flatten(all_params))
        mlflow.set_tags({"role": "pipeline", **lineage})
        mlflow.log_metrics({"data_rows_in": data["rows_in"], "data_rows_out": data["rows_out"],
                            "data_leaks": data["leaks"]["total"],
                            **{f"data_rows_{name}": n for name, n in data["splits"].items()}})
        if (reports_dir / "quantize.json").is_file():
            quant = read_json(reports_dir / "quantize.json")["variants"]
            mlflow.log_metrics({f"quant_{name}_{key}": v[key] for name, v in quant.items()
                                for key in ("footprint_ratio", "perplexity_ratio", "token_agreement")})
        for name in ("data.json", "data_report.md", "quantize.json", "quantize.md", "train.json", "metrics.json",
                     "comparison.md", "loss.png"):
            if (reports_dir / name).is_file():
                mlflow.log_artifact(str(reports_dir / name), artifact_path="reports")
        mlflow.log_table({k: [g[k] for g in generations] for k in generations[0]}, "generations.json")

        runs = {}
        for name in ("base", "fewshot"):
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True) as child:
                mlflow.set_tags({"role": "candidate", "candidate": name, **lineage})
                mlflow.log_metrics(metrics[name])
                runs[name] = child.info.run_id

        with mlflow.start_run(experiment_id=experiment_id, run_name="finetuned", nested=True) as tuned_run:
            mlflow.set_tags({"role": "candidate", "candidate": "finetuned", **lineage})
            mlflow.log_metrics(metrics["finetuned"])
            runs["finetuned"] = tuned_run.info.run_id
            mlflow.log_metrics({k: v for k, v in train.items()
                                if k in ("val_loss_final", "val_loss_best", "train_loss_final", "train_val_gap",
                                         "best_step")})
            training = metrics.get("training", {})
            if "possible_overfitting" in training:
                mlflow.log_metrics({"val_loss_above_best": training["val_loss_above_best"],
                                    "possible_overfitting": float(training["possible_overfitting"])})
            for step, loss in _curve(reports_dir / "train_loss.csv"):
                mlflow.log_metric("train_loss", loss, step=step)
            for step, loss in _curve(reports_dir / "val_loss.csv"):
                mlflow.log_metric("val_loss", loss, step=step)
            model, tokenizer = models.load_finetuned(base_dir, adapter_dir), models.load_tokenizer(base_dir)
            template = render(tokenizer, [{"role": "user", "content": "{prompt}"}], generation_prompt=True)
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name="model",
                task="text-generation",
                prompt_template=template,
                model_config={"max_new_tokens": 64, "do_sample": False},
                pip_requirements=_requirements(model),
                registered_model_name=params.model_name,
            )

    version = str(info.registered_model_version)
    for key, value in {**lineage, **{f"param.{k}": v for k, v in flatten(all_params).items()}}.items():
        client.set_model_version_tag(params.model_name, version, key, str(value))
    client.update_model_version(params.model_name, version,
                                description=f"{lineage['method']} fine-tune; metrics in run {tuned_run.info.run_id}")
    decision = _promote(client, params, version, metrics, data["leaks"]["total"])
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


def _promote(client, params: RegisterParams, version: str, metrics: dict[str, Any], leaks: int):
    """Make the new version the challenger; move `champion` to it only if the gate passes."""
    from mlflow.exceptions import MlflowException

    from ftpipe.promotion import decide

    try:
        current = client.get_model_version_by_alias(params.model_name, "champion")
        champion = client.get_run(current.run_id).data.metrics
        champion_version = current.version
    except MlflowException:  # no champion yet
        champion, champion_version = None, None
    decision = decide(metric=params.primary_metric, min_improvement=params.min_improvement,
                      challenger=metrics["finetuned"], base=metrics["base"], champion=champion,
                      champion_version=champion_version, leaks=leaks, max_forgetting=params.max_forgetting)
    client.set_registered_model_alias(params.model_name, "challenger", version)
    if decision.promote:
        client.set_registered_model_alias(params.model_name, "champion", version)
    client.set_model_version_tag(params.model_name, version, "promotion", decision.summary())
    return decision


def _curve(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(int(step), float(loss)) for step, loss in (line.split(",") for line in lines if line)]


def main() -> None:
    from ftpipe import tracking

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
