"""MLflow compare-runs screenshot: which runs it picks, and a real server + headless Chromium shot."""

from __future__ import annotations

import struct
import urllib.request

import pytest
from conftest import register_in_process

from ftpipe.errors import PipelineError
from scripts.mlflow_screenshot import latest_candidates, mlflow_server, run


def _log_pipeline(experiment_id: str, candidates: list[str]) -> dict[str, str]:
    import mlflow

    ids = {}
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline") as parent:
        mlflow.set_tag("role", "pipeline")
        for name in candidates:
            with mlflow.start_run(experiment_id=experiment_id, run_name=name, nested=True) as child:
                mlflow.set_tags({"role": "candidate", "candidate": name})
                ids[name] = child.info.run_id
    ids["pipeline"] = parent.info.run_id
    return ids


def test_picks_the_newest_pipeline_runs_candidates_in_order(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    mlflow.set_tracking_uri(uri)
    experiment_id = mlflow.MlflowClient().create_experiment("exp", artifact_location=(tmp_path / "a").as_uri())
    _log_pipeline(experiment_id, ["base", "finetuned"])
    newest = _log_pipeline(experiment_id, ["finetuned", "fewshot", "base"])
    found_id, runs = latest_candidates(uri, "exp")
    assert found_id == experiment_id
    assert [r.info.run_id for r in runs] == [newest["base"], newest["fewshot"], newest["finetuned"]]

    _log_pipeline(experiment_id, ["base"])
    with pytest.raises(PipelineError, match="needs base and finetuned candidate runs, found \\['base'\\]"):
        latest_candidates(uri, "exp")
    with pytest.raises(PipelineError, match="no MLflow experiment named 'nope'"):
        latest_candidates(uri, "nope")


def test_the_server_stops_on_error_and_a_failed_start_says_why(tmp_path):
    uri, artifacts = f"sqlite:///{tmp_path / 'mlruns.db'}", (tmp_path / "mlartifacts").as_uri()
    with pytest.raises(RuntimeError, match="page failed"):
        with mlflow_server(uri, artifacts) as url:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                assert response.status == 200
            raise RuntimeError("page failed")
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    with pytest.raises(PipelineError, match="mlflow server exited with code 1: .*unsupported URI 'bogus://db'"):
        with mlflow_server("bogus://db", artifacts):
            pass


@pytest.mark.slow
def test_screenshot_of_the_compare_view_after_a_pipeline_run(finished_project, tmp_path):
    project = finished_project  # a copy of the session's finished pipeline run
    registration = register_in_process(project)  # a second pipeline run: the newest one is shown

    out = tmp_path / "shots" / "compare.png"
    result = run(project_dir=project, out=out, experiment=registration["experiment"])

    assert result["runs"] == {"base": registration["base_run_id"], "fewshot": registration["fewshot_run_id"],
                              "finetuned": registration["finetuned_run_id"]}
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 30_000  # a blank 1600x1200 page compresses far smaller
    assert struct.unpack(">II", png[16:24]) == (1600, 1200)
    text = result["text"]
    for shown in ("bleu", "rougeL", "perplexity", "base", "fewshot", "finetuned", *result["runs"].values()):
        assert shown in text
    assert result["metrics_shown"] == ["bleu", "rougeL", "perplexity"]
    # The Parameters section lines up what produced each candidate: the tuned run's training params
    # beside the base runs' base model, data and evaluation settings.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    params = {name: client.get_run(run_id).data.params for name, run_id in result["runs"].items()}
    for key in ("train.method", "train.learning_rate", "train.lora_r", "train.epochs"):
        assert key in params["finetuned"] and key not in params["base"] and key not in params["fewshot"], key
    for name in ("base", "fewshot", "finetuned"):
        assert {"prepare_base.source", "prepare_data.seed", "evaluate.max_new_tokens", "evaluate.metrics",
                "inference.precision"} <= set(params[name]), name
    assert not list(out.parent.glob(".*.tmp.png"))
    with pytest.raises(OSError):  # the server was stopped
        urllib.request.urlopen(result["url"].split("/#")[0] + "/health", timeout=5)
