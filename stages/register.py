"""Log the pipeline run to MLflow, register the fine-tuned model with its lineage, and apply the promotion gate.

One parent run with `base`, `fewshot` and `finetuned` child runs of the same metric keys (with dpo: `dpo` and
`sft`); a run the train or dpo stage logged into live is adopted. The new version of `register.model_name`
(tags: git commit, dvc.lock hashes, method, params) becomes `challenger`, and `champion` if the gate passes
(ftpipe/promotion.py; the champion is scored again here on the current test split, as the registry is outside
DVC). A registry that cannot be read stops the stage with one line before anything is created or moved.
Reads params.yaml, dvc.lock, models/, data/prepared/test.jsonl, reports/; writes reports/registration.json.
Run: python -m stages.register
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftpipe import paths
from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import read_json, read_jsonl
from ftpipe.params import DpoParams, RegisterParams, load_section, read_params_file
from ftpipe.paths import (
    ADAPTER_DIR,
    BASE_DIR,
    DPO_DIR,
    GGUF_DIR,
    PARENT_DIR,
    PARENT_TRAINED_ON,
    PREPARED_DIR,
    REGISTRATION,
    REPORTS,
    TRAIN_CONFIG_NAME,
    split_file,
)
from ftpipe.schemas import (
    DataReport,
    DpoReport,
    ExportReport,
    MetricsReport,
    PrefsReport,
    RegistrationReport,
    TrainReport,
)

# Reports logged with the pipeline run (the MLflow UI shows them beside its metrics).
REPORT_ARTIFACTS = (paths.DATA_REPORT, paths.DATA_REPORT_MD, paths.LEAKS, paths.QUANTIZE_REPORT, paths.QUANTIZE_MD,
                    paths.TRAIN_REPORT, paths.METRICS, paths.COMPARISON, paths.LOSS_PLOT, paths.EXPORT_REPORT,
                    paths.EXPORT_MD, paths.PREFS_REPORT, paths.DPO_REPORT)
# Lineage tags that make a registered version this very model.
SAME_MODEL_TAGS = ("adapter_md5", "base_model_md5", "dpo_md5")
# The model's own runtime needs; explicit because MLflow's inference imports torchvision, which is absent.
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")


def _requirements(model=None) -> list[str]:
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
    artifact_location: str | None,
    base_dir: Path,
    adapter_dir: Path,
    reports_dir: Path,
    data_dir: Path = PREPARED_DIR,
    gguf_dir: Path = GGUF_DIR,
    dpo_dir: Path | None = None,
    parent_dir: Path | None = None,
) -> RegistrationReport:
    """`dpo_dir`: the dpo stage's model folder (models/dpo) when dpo is enabled: that model is
    registered and gated instead of the SFT one; None: dpo off. `parent_dir`: models/parent of a
    continual fine-tune (what its parent trained on is logged as trained on too); None: from the base."""
    import mlflow

    from ftpipe import models, registry
    from ftpipe.tracking import redact

    reports = _read_reports(reports_dir, registered=(dpo_dir or adapter_dir) / models.MERGED, dpo=dpo_dir is not None)
    product = reports.metrics.product  # the DPO model when dpo is enabled, else the SFT one
    client = registry.connect(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)  # the champion loads through its models:/ URI
    # Decided before anything is created: a registry that cannot be read (server down, champion's
    # run or model gone) stops here, leaving no run, no version and no alias moved.
    champion = _score_champion(client, params, lineage, reports, data_dir)
    decision = _decide(params, reports, champion)
    with registry.errors(tracking_uri, f"registering {params.model_name}"):
        experiment_id = _experiment_id(client, params.experiment, artifact_location)
        live = _live_runs(client, experiment_id, reports)
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"pipeline-{lineage['git_commit'][:8]}") as parent:
            _log_pipeline_run(all_params, lineage, reports, reports_dir, champion)
            runs = _log_candidates(experiment_id, lineage, reports.metrics, all_params, live)
            if champion:
                runs["champion"] = _log_champion(experiment_id, champion)
            with _candidate_run(experiment_id, product, live.get(product)) as tuned_run:
                runs["finetuned"] = tuned_run.info.run_id
                # An adopted run has its own stage's curves: the DPO run's are DPO's, so it still gets SFT's.
                _log_training(lineage, reports, reports_dir, gguf_dir, curves=product == "dpo" or product not in live)
                mlflow.log_params(_candidate_params(all_params, product))
                if dpo_dir:
                    _log_dpo(reports, dpo_dir, curves=product not in live)
                _log_gate(decision)
                # The split this version is evaluated on: a continual fine-tune from it scores it again.
                mlflow.log_artifact(str(data_dir / split_file("test")), artifact_path="data")
                # What it trained on (prompt digests): a later run scoring it again leaves those rows out.
                mlflow.log_dict(_trained_on(data_dir, parent_dir), models.TRAINED_ON_ARTIFACT)
                version = log_model(params.model_name, base_dir, dpo_dir or adapter_dir,
                                    tags=_version_tags(lineage, all_params, decision))
        _describe_version(client, params.model_name, version, lineage, runs["finetuned"])
        _set_aliases(client, params.model_name, version, decision)
        client.set_tag(parent.info.run_id, "promotion", decision.summary())
    return _registration(params, tracking_uri=redact(tracking_uri), version=version, pipeline_run_id=parent.info.run_id,
                         runs=runs, decision=decision, champion=champion)


def _registration(params: RegisterParams, *, tracking_uri: str, version: str, pipeline_run_id: str,
                  runs: dict[str, str], decision, champion: dict[str, Any] | None) -> RegistrationReport:
    return RegistrationReport(**{
        "model_name": params.model_name,
        "version": version,
        "model_uri": f"models:/{params.model_name}/{version}",
        "experiment": params.experiment,
        "pipeline_run_id": pipeline_run_id,
        "base_run_id": runs["base"],
        "fewshot_run_id": runs["fewshot"],
        "finetuned_run_id": runs["finetuned"],
        "candidate": "dpo" if "sft" in runs else "finetuned",
        "sft_run_id": runs.get("sft"),
        "tracking_uri": tracking_uri,
        "aliases": ["challenger", "champion"] if decision.promote else ["challenger"],
        "promotion": {
            "promote": decision.promote,
            "reasons": decision.reasons,
            "metric": params.primary_metric,
            "min_improvement": params.min_improvement,
            # The gain (positive: the challenger is better) over each and its interval; None: not formed.
            "intervals": {name: interval and interval.as_dict() for name, interval in decision.intervals.items()},
        },
        # The champion the gate compared with, scored again on this test split (None: no champion).
        "champion": champion and {
            "version": champion["version"],
            "scored": champion["scored"],
            "run_id": runs["champion"],
            "metrics": champion["metrics"],
            "logged_metrics": champion["logged_metrics"],
            "examples": len(champion["examples"]),
            "left_out_trained": champion["left_out"],
        },
    })


@dataclass
class Reports:
    """What evaluate, train and prepare_data reported: register reads nothing else of theirs."""

    metrics: MetricsReport
    train: TrainReport
    data: DataReport
    generations: list[dict[str, Any]]  # per-example outputs and scores (reports/generations.jsonl)
    dpo: DpoReport | None  # with dpo enabled: the dpo stage's report
    prefs: PrefsReport | None  # with dpo enabled: the preference pairs' report (their leak check)


def _read_reports(reports_dir: Path, *, registered: Path, dpo: bool) -> Reports:
    """The reports, checked to describe the model about to be registered (`registered`, a merged/
    folder): a report written before dpo was turned on or off would gate or export another model."""
    metrics = MetricsReport.read(reports_dir / paths.METRICS.name)
    if metrics.product != ("dpo" if dpo else "finetuned"):
        raise PipelineError(f"{paths.METRICS}: scores {'a DPO model' if metrics.product == 'dpo' else 'no DPO model'}"
                            f" but dpo.enabled is {str(dpo).lower()}: rerun `dvc repro evaluate`")
    export_path = reports_dir / paths.EXPORT_REPORT.name
    export = ExportReport.read(export_path) if export_path.is_file() else None
    if export and export.formats and export.model and Path(export.model) != registered:
        raise PipelineError(f"{paths.EXPORT_REPORT}: the GGUF files are of {export.model}, not {registered}: "
                            "rerun `dvc repro export`")
    trained = DpoReport.read(reports_dir / paths.DPO_REPORT.name) if dpo else None
    if trained is not None and not trained.enabled:
        raise PipelineError(f"{paths.DPO_REPORT}: says dpo is off, though dpo.enabled is true: rerun `dvc repro dpo`")
    return Reports(metrics=metrics, train=TrainReport.read(reports_dir / paths.TRAIN_REPORT.name),
                   data=DataReport.read(reports_dir / paths.DATA_REPORT.name),
                   generations=read_jsonl(reports_dir / paths.GENERATIONS.name), dpo=trained,
                   prefs=PrefsReport.read(reports_dir / paths.PREFS_REPORT.name) if dpo else None)


def _examples(generations: list[dict[str, Any]], candidate: str) -> list[dict[str, float]]:
    """A candidate's per-example scores from generations.jsonl (its `<key>_<candidate>` columns)."""
    suffix = f"_{candidate}"
    return [{key.removesuffix(suffix): value for key, value in row.items() if key.endswith(suffix)}
            for row in generations]


def _scored_keys(report) -> list[str]:
    """The metrics evaluate scored (evaluate.metrics' keys), general_perplexity aside."""
    from ftpipe.comparison import metric_keys
    from ftpipe.metrics import GENERAL_KEY

    return [k for k in metric_keys(report.model_dump()) if k != GENERAL_KEY]


def _test_conversations(data_dir: Path, generations: list[dict[str, Any]]) -> list[list[dict[str, str]]]:
    """The test rows evaluate scored, in its order (generations.jsonl's ids in test.jsonl)."""
    path = data_dir / split_file("test")
    by_id = {row["id"]: row["messages"] for row in read_jsonl(path)}
    missing = [row["id"] for row in generations if row["id"] not in by_id]
    if missing:
        raise PipelineError(f"{paths.GENERATIONS}: {len(missing)} row(s) not in {path} (first: {missing[0]}); "
                            "the evaluation is older than the test split: run `dvc repro evaluate`")
    return [by_id[row["id"]] for row in generations]


def _score_champion(client, params: RegisterParams, lineage: dict[str, str], reports: Reports,
                    data_dir: Path) -> dict[str, Any] | None:
    """The current champion scored on this test split ({version, scored, metrics, examples, outputs,
    logged_metrics}); None if there is none. Its logged metrics come from the split of its own day."""
    from ftpipe import device, metrics, registry, scoring
    from ftpipe.device import Placement
    from ftpipe.splits import prompt_digest

    found = registry.champion(client, params.model_name)
    if found is None:
        return None
    version, logged = found
    generations = reports.generations
    tags = registry.version_tags(client, params.model_name, version)
    if all(lineage[key] != "unknown" and tags.get(key) == lineage[key] for key in SAME_MODEL_TAGS):
        # The same adapter on the same base: the fine-tuned scores are its scores on these rows with
        # these settings; generating again would cost minutes to reproduce them.
        product = reports.metrics.product
        tuned = reports.metrics.candidate(product)
        return {"version": version, "scored": "same model as the challenger: its fine-tuned scores",
                "metrics": {k: tuned[k] for k in _scored_keys(reports.metrics) if k in tuned},
                "examples": _examples(generations, product), "outputs": [row[product] for row in generations],
                "logged_metrics": logged, "rows": None, "left_out": 0}
    conversations = _test_conversations(data_dir, generations)
    trained = _champion_trained_on(client, params.model_name, version)
    rows = [i for i, c in enumerate(conversations) if trained is None or prompt_digest(c) not in trained]
    left_out = None if trained is None else len(conversations) - len(rows)
    if not rows:
        raise PipelineError(f"{params.model_name} champion v{version} trained on all {len(conversations)} rows of "
                            f"this test split, so it cannot be compared on them; change prepare_data.seed or the data")
    settings = reports.metrics.settings
    model, tokenizer = registry.load_model(client, params.model_name, version)
    # Where evaluate ran the candidates (reports of an older evaluate: the CPU in fp32).
    placement = Placement(settings.get("device", "cpu"), settings.get("precision", "fp32"))
    if placement.device == "cuda":
        placement = device.decide(device="cuda", precision=placement.precision)  # one line if CUDA is gone
    model = device.place(model, placement, f"{params.model_name} champion v{version}")
    scores, outputs, examples = scoring.score_model(
        model, tokenizer, [conversations[i] for i in rows], max_new_tokens=settings["max_new_tokens"],
        batch_size=settings["batch_size"], stemmer=settings["rouge_stemmer"], name=f"champion v{version}",
        metrics=settings.get("metrics", metrics.METRIC_KEYS))
    scored = "generated again on this test split" + (
        "" if left_out is None else f" ({len(rows)} rows; {left_out} it trained on left out)" if left_out
        else f" ({len(rows)} rows; none it trained on)")
    return {"version": version, "scored": scored, "metrics": scores, "examples": examples, "outputs": outputs,
            "logged_metrics": logged, "rows": rows, "left_out": left_out}


def _trained_on(data_dir: Path, parent_dir: Path | None) -> list[str]:
    """The prompt digests of the rows this model trained on: its train split's, and for a continual
    fine-tune everything its parent champion had trained on (models/parent, from the parent's run)."""
    import json

    from ftpipe.splits import prompt_digests

    digests = set(prompt_digests(read_jsonl(data_dir / split_file("train"))))
    inherited = parent_dir / PARENT_TRAINED_ON if parent_dir else None
    if inherited is not None and inherited.is_file():
        digests |= set(json.loads(inherited.read_text(encoding="utf-8")))
    return sorted(digests)


def _champion_trained_on(client, model_name: str, version: str) -> set[str] | None:
    """The prompt digests of the champion's training rows; None for a version registered before
    they were logged (its training rows are not known, so none is left out)."""
    import json
    import tempfile

    from ftpipe import models, registry

    run_id = registry.version_run(client, model_name, version)
    with tempfile.TemporaryDirectory() as tmp:
        path = registry.download_run_file(client, run_id, models.TRAINED_ON_ARTIFACT, Path(tmp))
        return None if path is None else set(json.loads(path.read_text(encoding="utf-8")))


def _decide(params: RegisterParams, reports: Reports, champion: dict[str, Any] | None):
    """The promotion gate against the base model and the champion, on the same test rows (ftpipe.promotion)."""
    from ftpipe.promotion import Scores, decide

    metrics, generations = reports.metrics, reports.generations
    note = " (the same model as this challenger)" if champion and champion["scored"].startswith("same") else ""
    return decide(metric=params.primary_metric, min_improvement=params.min_improvement,
                  challenger=Scores(_examples(generations, metrics.product), metrics.candidate(metrics.product)),
                  base=Scores(_examples(generations, "base"), metrics.base),
                  champion=champion and Scores(champion["examples"], champion["metrics"],
                                               rows=champion["rows"] and tuple(champion["rows"])),
                  champion_version=champion and champion["version"], champion_note=note,
                  # Leaks left in what trained the model (leak_action: drop removes them); with DPO the
                  # preference pairs trained it too.
                  leaks=reports.data.leaks_in_training + (reports.prefs.leaks_in_training if reports.prefs else 0),
                  max_forgetting=params.max_forgetting,
                  old_task=metrics.old_task, max_old_task_drop=params.max_old_task_drop,
                  parent_version=reports.train.parent_version,
                  samples=params.bootstrap_samples, confidence=params.confidence, seed=params.bootstrap_seed)


def _experiment_id(client, name: str, artifact_location: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def _live_runs(client, experiment_id: str, reports: Reports) -> dict[str, str]:
    """{candidate run name: the run to adopt as it}: the SFT model's live run from train.json (the
    `finetuned` run, or `sft` when the DPO model is registered) and the DPO model's from dpo.json."""
    stated = {"sft" if reports.dpo else "finetuned": ("train", reports.train.live_run_id)}
    if reports.dpo:
        stated["dpo"] = ("dpo", reports.dpo.live_run_id)
    return {name: run_id for name, (stage, run_id) in stated.items()
            if run_id and _adoptable(client, experiment_id, run_id, stage)}


def _adoptable(client, experiment_id: str, run_id: str, stage: str) -> bool:
    """Whether the run `stage` logged into while training can be adopted: it is in this experiment,
    not deleted, and no earlier pipeline run adopted it (register run again on the same training
    makes a run of its own). A run that is gone says so in one line; any other failure is the
    store's, and stops the stage (registry.errors around this call)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
        print(f"register: {stage}'s live run {run_id} is gone from this experiment: the curves go into a new run")
        return False
    return MLFLOW_PARENT_RUN_ID not in run.data.tags


def _candidate_run(experiment_id: str, name: str, adopt: str | None):
    """A run named `name` nested under the active pipeline run: the stage's live run `adopt` when
    there is one (renamed, and given the parent tag, which resuming a run does not set), else a new one."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    if adopt is None:
        return mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True)
    parent = mlflow.active_run().info.run_id
    return mlflow.start_run(run_id=adopt, run_name=name, nested=True, tags={MLFLOW_PARENT_RUN_ID: parent})


def _log_pipeline_run(all_params: dict[str, Any], lineage: dict[str, str], reports: Reports,
                      reports_dir: Path, champion: dict[str, Any] | None) -> None:
    """The parent run: params, data and quantization figures, report files, generations table
    (with the champion's outputs and scores on these rows, when there is one)."""
    import mlflow

    from ftpipe.tracking import flatten

    data, generations = reports.data, reports.generations
    if champion:
        # Rows the champion trained on were not scored again: their champion cells stay empty.
        rows = champion["rows"] if champion["rows"] is not None else range(len(generations))
        scored = {i: (output, scores) for i, output, scores in zip(rows, champion["outputs"], champion["examples"])}
        generations = [{**row, "champion": scored.get(i, (None, {}))[0],
                        **{f"{k}_champion": scored.get(i, (None, {}))[1].get(k) for k in champion["examples"][0]}}
                       for i, row in enumerate(generations)]
    mlflow.log_params(flatten(all_params))
    mlflow.set_tags({"role": "pipeline", **lineage})
    _log_metrics({"data_rows_in": data.rows_in, "data_rows_out": data.rows_out, "data_leaks": data.leaks.total,
                        **{f"data_rows_{name}": n for name, n in data.splits.items()}})
    _log_metrics(quant_metrics(reports_dir / paths.QUANTIZE_REPORT.name))
    if (reports_dir / paths.EXPORT_REPORT.name).is_file():
        export = ExportReport.read(reports_dir / paths.EXPORT_REPORT.name)
        _log_metrics({f"gguf_{fmt}_{key}": getattr(f, key) for fmt, f in export.formats.items()
                            for key in ("bytes", "top1_agreement", "max_abs_logit_diff", "token_agreement")})
    for report in REPORT_ARTIFACTS:
        if (reports_dir / report.name).is_file():
            mlflow.log_artifact(str(reports_dir / report.name), artifact_path="reports")
    mlflow.log_table({k: [g[k] for g in generations] for k in generations[0]}, "generations.json")


def quant_metrics(report: Path) -> dict[str, float]:
    """The quantize stage's figures as MLflow metrics: none when it did not run or was asked for no
    variant (its report then has empty `variants` and `pruned`)."""
    if not report.is_file():
        return {}
    quant = read_json(report)
    return {**{f"quant_{name}_{key}": v[key] for name, v in quant.get("variants", {}).items()
               for key in ("footprint_ratio", "perplexity_ratio", "token_agreement")},
            **{f"pruned_{name}_{key}": v[key] for name, v in quant.get("pruned", {}).items()
               for key in ("sparsity", "perplexity_ratio", "token_agreement")}}


def _log_candidates(experiment_id: str, lineage: dict[str, str], metrics: MetricsReport,
                    all_params: dict[str, Any], live: dict[str, str]) -> dict[str, str]:
    """The base and few-shot sibling runs, and the SFT model's when DPO is what is registered (the
    train stage's live run, when `live` names it); {name: run id}."""
    import mlflow

    runs = {}
    for name in ("base", "fewshot", *(["sft"] if metrics.product == "dpo" else [])):
        with _candidate_run(experiment_id, name, live.get(name)) as child:
            mlflow.set_tags({"role": "candidate", "candidate": name, **lineage})
            _log_metrics(metrics.candidate("finetuned" if name == "sft" else name))
            mlflow.log_params(_candidate_params(all_params, name))
            runs[name] = child.info.run_id
    return runs


# The params that produced each candidate, logged on its run so the MLflow compare view lines them up
# (the base and few-shot runs: the base model, the data and the evaluation settings; a tuned model:
# its training params as well).
CANDIDATE_SECTIONS = {"base": ("prepare_base", "prepare_data", "evaluate", "inference"),
                      "fewshot": ("prepare_base", "prepare_data", "evaluate", "inference")}
TUNED_SECTIONS = ("prepare_base", "prepare_data", "train", "evaluate", "inference")


def _candidate_params(all_params: dict[str, Any], candidate: str) -> dict[str, Any]:
    from ftpipe.tracking import flatten

    sections = CANDIDATE_SECTIONS.get(candidate, TUNED_SECTIONS + (("dpo",) if candidate == "dpo" else ()))
    return flatten({section: all_params[section] for section in sections if section in all_params})


def _log_champion(experiment_id: str, champion: dict[str, Any]) -> str:
    """A sibling run with the champion's metrics on this test split (the same keys as the
    candidates', general_perplexity aside); its run id. Its lineage is on its own version's tags."""
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"champion-v{champion['version']}",
                          nested=True) as child:
        mlflow.set_tags({"role": "candidate", "candidate": "champion", "champion_version": champion["version"],
                         "champion_scored": champion["scored"]})
        _log_metrics(champion["metrics"])
        return child.info.run_id


def _gate_tags(decision) -> dict[str, str]:
    """`gate.<base|champion>`: the gain's interval in words, for the run and the version."""
    return {f"gate.{name}": interval.describe() if interval else "no interval"
            for name, interval in decision.intervals.items()}


def _log_gate(decision) -> None:
    """Into the active fine-tuned run: each gain, its interval and the decision."""
    import mlflow

    for name, interval in decision.intervals.items():
        if interval:
            _log_metrics({f"gain_vs_{name}": interval.estimate, f"gain_vs_{name}_ci_low": interval.low,
                                f"gain_vs_{name}_ci_high": interval.high})
    mlflow.log_metric("promoted", float(decision.promote))
    mlflow.set_tags({**_gate_tags(decision), "promotion": decision.summary()})


def _log_training(lineage: dict[str, str], reports: Reports, reports_dir: Path, gguf_dir: Path, *,
                  curves: bool = True) -> None:
    """Into the active fine-tuned run: its metrics, training losses (unless `curves` is false: the run
    logged them itself while training) and overfitting verdict."""
    import mlflow

    metrics, train = reports.metrics, reports.train
    mlflow.set_tags({"role": "candidate", "candidate": metrics.product, **lineage})
    _log_metrics(metrics.candidate(metrics.product))
    _log_metrics({k: v for k, v in train.model_dump().items()
                        if k in ("val_loss_final", "val_loss_best", "train_loss_final", "train_val_gap", "best_step")})
    training = metrics.training
    if "possible_overfitting" in training:
        _log_metrics({"val_loss_above_best": training["val_loss_above_best"],
                            "possible_overfitting": float(training["possible_overfitting"])})
    for step, loss in _curve(reports_dir / paths.TRAIN_LOSS.name) if curves else ():
        mlflow.log_metric("train_loss", loss, step=step)
    for step, loss in _curve(reports_dir / paths.VAL_LOSS.name) if curves else ():
        mlflow.log_metric("val_loss", loss, step=step)
    _log_gguf(reports_dir, gguf_dir)


def _log_dpo(reports: Reports, dpo_dir: Path, *, curves: bool = True) -> None:
    """Into the active DPO run: the preference metrics, the DPO curves (unless `curves` is false: the
    run logged them itself while training) and their plot."""
    import mlflow

    dpo = reports.dpo
    _log_metrics({f"dpo_{k}": v for k, v in dpo.model_dump().items() if isinstance(v, float)
                        and k not in ("beta", "epochs") and v is not None})
    mlflow.log_params({"dpo_start": dpo.start, "dpo_method": dpo.method, "dpo_loss_type": dpo.loss_type,
                       "dpo_beta": dpo.beta})
    for point in dpo.train_curve if curves else ():
        mlflow.log_metric("dpo_train_loss", point["loss"], step=int(point["step"]))
    for point in dpo.val_curve if curves else ():
        _log_metrics({f"dpo_val_{k}": v for k, v in point.items() if k != "step" and v is not None},
                           step=int(point["step"]))
    if (dpo_dir / paths.DPO_LOSS_PLOT_NAME).is_file():
        mlflow.log_artifact(str(dpo_dir / paths.DPO_LOSS_PLOT_NAME), artifact_path="dpo")


def _log_gguf(reports_dir: Path, gguf_dir: Path) -> None:
    """What the export stage wrote, by name, size and sha256, with its Modelfile: the GGUF files
    themselves stay in DVC's cache (models/gguf; `dvc push` shares them), since a second copy in the
    MLflow store would double the disk a model takes. Their checks are metrics of the pipeline run."""
    import mlflow

    report_path = reports_dir / paths.EXPORT_REPORT.name
    export = ExportReport.read(report_path) if report_path.is_file() else None
    if not export or not export.formats:
        return
    mlflow.log_dict({"where": "models/gguf (DVC output of the export stage)", "files": {
        fmt: {"file": Path(f.file).name, "bytes": f.bytes, "sha256": f.sha256} for fmt, f in export.formats.items()}},
        "gguf/manifest.json")
    if (gguf_dir / "Modelfile").is_file():
        mlflow.log_artifact(str(gguf_dir / "Modelfile"), artifact_path="gguf")


def log_model(model_name: str, base_dir: Path, adapter_dir: Path, *, tags: dict[str, str] | None = None) -> str:
    """Log the merged fine-tuned model into the active run and register it with `tags`; its new
    version. `adapter_dir`: the train stage's output, or the dpo stage's (models/dpo, merged/ inside)."""
    import mlflow

    from ftpipe import bottleneck, models
    from ftpipe.chat import render

    if bottleneck.saved_in(adapter_dir):  # adapter layers: a pyfunc that puts them on the base (safetensors both)
        from ftpipe import bottleneck_model

        info = bottleneck_model.log(base_dir, adapter_dir, requirements=_requirements())
        return str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)
    # As stored (bf16 for a bf16 base): MLflow keeps one copy of the merged weights, in their own dtype.
    model, tokenizer = models.load_finetuned(base_dir, adapter_dir, as_stored=True), models.load_tokenizer(base_dir)
    template = render(tokenizer, [{"role": "user", "content": "{prompt}"}], generation_prompt=True)
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        prompt_template=template,
        model_config={"max_new_tokens": 64, "do_sample": False},
        pip_requirements=_requirements(model),
    )
    # The tags go in with the version (one registry call, where one call per tag took about 1.7 s on a
    # local store and a round trip each on a server), so no version exists without its lineage.
    return str(mlflow.register_model(info.model_uri, model_name, tags=tags).version)


def _version_tags(lineage: dict[str, str], all_params: dict[str, Any], decision) -> dict[str, str]:
    """Lineage, params and the gate's verdict as version tags, so a version says what produced it."""
    from ftpipe.tracking import flatten

    params = {f"param.{k}": v for k, v in flatten(all_params).items()}
    return {k: str(v) for k, v in {**lineage, **params, **_gate_tags(decision), "promotion": decision.summary()}.items()}


def _describe_version(client, model_name: str, version: str, lineage: dict[str, str], tuned_run_id: str) -> None:
    tuning = f"{lineage['method']} fine-tune" + (f", then DPO ({lineage['dpo']})" if "dpo" in lineage else "")
    client.update_model_version(model_name, version, description=f"{tuning}; metrics in run {tuned_run_id}")


def _set_aliases(client, model_name: str, version: str, decision) -> None:
    """The new version becomes `challenger`; `champion` moves to it only if the gate passed."""
    client.set_registered_model_alias(model_name, "challenger", version)
    if decision.promote:
        client.set_registered_model_alias(model_name, "champion", version)


def _log_metrics(values: dict[str, Any], step: int | None = None) -> None:
    """Log the metrics that were measured: a value a short or partial run did not produce is None
    in its report, and MLflow refuses a metric without a value."""
    import mlflow

    mlflow.log_metrics({key: value for key, value in values.items() if value is not None}, step=step)


def _curve(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [(int(step), float(loss)) for step, loss in (line.split(",") for line in lines if line)]


def main() -> None:
    from ftpipe import models, tracking
    from ftpipe.promotion import gate_line

    tracking.bound_http_retries()
    params = load_section("register", RegisterParams)
    all_params, _ = read_params_file()
    train_config = read_json(ADAPTER_DIR / TRAIN_CONFIG_NAME)
    project = Path(".")  # the workspace: its dvc.lock and git commit say what produced the model
    store = tracking.project_root(project)  # the project's store, also from DVC's temporary workspaces
    lineage = {**tracking.lineage(project, method=train_config["params"]["method"]), **tracking.experiment()}
    lineage["parent"] = train_config["summary"].get("parent", "base")  # or "<model> v<N> (champion)"
    dpo_dir = models.dpo_result(DPO_DIR, enabled=load_section("dpo", DpoParams).enabled)
    if dpo_dir:  # the registered model is the DPO one: say how it was tuned
        dpo = read_json(DPO_DIR / TRAIN_CONFIG_NAME)
        loss = "kto" if dpo["params"].get("method") == "kto" else dpo["params"]["loss_type"]
        lineage["dpo"] = f"{loss} beta {dpo['params']['beta']} from {dpo['summary']['start']}"
    result = run(
        params=params,
        all_params=all_params,
        lineage=lineage,
        tracking_uri=tracking.tracking_uri(store),
        artifact_location=tracking.artifact_location(store),
        base_dir=BASE_DIR,
        adapter_dir=ADAPTER_DIR,
        reports_dir=REPORTS,
        data_dir=PREPARED_DIR,
        gguf_dir=GGUF_DIR,
        dpo_dir=dpo_dir,
        parent_dir=PARENT_DIR if train_config["summary"].get("parent_version") else None,
    )
    result.write(REGISTRATION)
    print(f"register: {result.model_uri} (pipeline run {result.pipeline_run_id}): {gate_line(result)}")


if __name__ == "__main__":
    run_cli(main)
