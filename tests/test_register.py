"""The register stage against a registry it cannot fully trust: the champion's run gone, the server
down, no champion alias, a challenger without per-example scores. The champion scored again on the
current test split, and never promoted over by itself. Plus credential masking and the registry
reader's "not found" versus "failed" on a fake client.

The stage tests share one `dvc repro` (every stage but register) of the tiny project; each copies it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import register_in_process, stage_env

from ftpipe.errors import PipelineError
from ftpipe.io import remove_path

MODEL = "tiny-model"


# --- credential masking ----------------------------------------------------------------------------

def test_redact_masks_url_credentials_secret_query_values_and_secret_env_values(monkeypatch):
    from ftpipe.credentials import redact
    from ftpipe.tracking import redact as tracking_redact

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2pw")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "ghp_abc123")
    monkeypatch.setenv("SOME_FLAG_TOKEN", "1")  # too short to be a secret: left alone
    assert redact("http://alice:s3cret@host:5000/x") == "http://***@host:5000/x"
    assert redact("failed: https://user@h/p and s3://k:v@bucket/a") == "failed: https://***@h/p and s3://***@bucket/a"
    assert redact("http://h/?token=tok1&page=2&api_key=k9;sig=zz") == "http://h/?token=***&page=2&api_key=***;sig=***"
    assert (redact("x?X-Amz-Signature=dead&X-Amz-Security-Token=beef")
            == "x?X-Amz-Signature=***&X-Amz-Security-Token=***")
    assert redact("login hunter2pw then ghp_abc123, flag 1") == "login *** then ***, flag 1"
    assert redact("http://a:hunter2pw@h") == "http://***@h"
    assert redact("git@github.com:org/repo and plain text") == "git@github.com:org/repo and plain text"
    assert tracking_redact("http://bob:pw@127.0.0.1:9") == "http://***@127.0.0.1:9"


def test_mlflow_http_retries_are_bounded_by_default_but_the_environment_wins(monkeypatch):
    from ftpipe.tracking import HTTP_DEFAULTS, bound_http_retries

    for name in HTTP_DEFAULTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 3 and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() <= 2


# --- the registry reader on a fake client ----------------------------------------------------------

class FakeClient:
    tracking_uri = "http://bob:pw123@registry.example:5000"

    def __init__(self, alias_error=None, run_error=None, lifecycle="active"):
        self.alias_error, self.run_error, self.lifecycle = alias_error, run_error, lifecycle

    def get_model_version_by_alias(self, name, alias):
        if self.alias_error:
            raise self.alias_error
        return SimpleNamespace(version="3", run_id="run3")

    def get_run(self, run_id):
        if self.run_error:
            raise self.run_error
        return SimpleNamespace(info=SimpleNamespace(lifecycle_stage=self.lifecycle),
                               data=SimpleNamespace(metrics={"rougeL": 0.4}))


def mlflow_error(message: str, code: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos import databricks_pb2

    return MlflowException(message, error_code=getattr(databricks_pb2, code))


def test_champion_is_none_only_when_the_model_or_alias_does_not_exist():
    from ftpipe.registry import champion

    assert champion(FakeClient(), MODEL) == ("3", {"rougeL": 0.4})
    no_model = mlflow_error("Registered Model with name=tiny-model not found", "RESOURCE_DOES_NOT_EXIST")
    assert champion(FakeClient(alias_error=no_model), MODEL) is None
    no_alias = mlflow_error("Registered model alias champion not found.", "INVALID_PARAMETER_VALUE")
    assert champion(FakeClient(alias_error=no_alias), MODEL) is None


REFUSED = ("API request to http://bob:pw123@registry.example:5000/api/2.0/x failed with exception HTTPConnectionPool("
           "host='registry.example', port=5000): Max retries exceeded (Caused by NewConnectionError('<conn>: Failed "
           "to establish a new connection: [Errno 111] Connection refused'))")
# A proxy's 404 page says "Not Found" but is no answer about the alias.
PROXY_404 = ("API request to endpoint /api/2.0/mlflow/registered-models/alias failed with error code 404 != 200. "
             "Response body: '<h1>Not Found</h1>'")
SERVER = "MLflow tracking server http://***@registry.example:5000 unreachable or failing (reading tiny-model@champion: "
RUN = "MLflow registry http://***@registry.example:5000: tiny-model champion v3: its run run3 "


@pytest.mark.parametrize("failing, error, lifecycle, expected", [
    ("alias", (PROXY_404, "ENDPOINT_NOT_FOUND"), "active", SERVER + "error code 404 != 200)"),
    ("alias", (REFUSED, "INTERNAL_ERROR"), "active", SERVER + "Connection refused)"),
    ("run", ("Run with id=run3 not found", "RESOURCE_DOES_NOT_EXIST"), "active",
     RUN + "no longer exists (garbage-collected?); restore the run or move the alias by hand"),
    ("run", None, "deleted",
     RUN + "is deleted, so its metrics cannot be trusted; restore the run or move the alias by hand"),
])
def test_any_other_registry_failure_is_one_redacted_line(failing, error, lifecycle, expected):
    from ftpipe.registry import champion

    error = error and mlflow_error(*error)
    errors = {"alias_error": error} if failing == "alias" else {"run_error": error}
    fake = FakeClient(**errors, lifecycle=lifecycle)
    with pytest.raises(PipelineError) as err:
        champion(fake, MODEL)
    assert str(err.value) == expected and "pw123" not in str(err.value)


def test_a_refusal_is_not_reported_as_an_unreachable_server():
    from ftpipe.registry import RegistryUnreachable, errors

    refusal = mlflow_error("Missing value for required parameter 'metrics[0].value'.", "INVALID_PARAMETER_VALUE")
    with pytest.raises(PipelineError) as err, errors(FakeClient.tracking_uri, "registering tiny-model"):
        raise refusal
    assert not isinstance(err.value, RegistryUnreachable)
    assert str(err.value) == ("MLflow tracking store http://***@registry.example:5000 refused registering tiny-model: "
                              "Missing value for required parameter 'metrics[0].value'.")
    with pytest.raises(RegistryUnreachable), errors(FakeClient.tracking_uri, "registering tiny-model"):
        raise mlflow_error(REFUSED, "INTERNAL_ERROR")


# --- the register stage -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reproduced(built_project, tmp_path_factory) -> Path:
    """The tiny project with every stage but register run (the session's built project, its MLflow
    store and registration taken away)."""
    proj = Path(shutil.copytree(built_project, tmp_path_factory.mktemp("register") / "project", symlinks=True))
    for name in ("mlruns.db", "mlartifacts", "reports/registration.json"):
        remove_path(proj / name)
    return proj


@pytest.fixture
def proj(reproduced, tmp_path) -> Path:
    return Path(shutil.copytree(reproduced, tmp_path / "project", symlinks=True))


def register(proj: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.register"], cwd=proj, env={**stage_env(), **env},
                          capture_output=True, text=True, timeout=600)


def set_scores(proj: Path, finetuned: float | None) -> None:
    """The gate's inputs: every test example's rougeL 0.1 for the base model and `finetuned` for
    the fine-tuned one (None: no per-example rougeL, as from an older evaluate), no forgetting."""
    path = proj / "reports" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["base"].update(rougeL=0.1, general_perplexity=20.0)
    metrics["finetuned"].update(rougeL=finetuned, general_perplexity=20.0)
    if finetuned is None:
        del metrics["finetuned"]["rougeL"]
    path.write_text(json.dumps(metrics))
    path = proj / "reports" / "generations.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        row.update(rougeL_base=0.1, rougeL_finetuned=finetuned)
        if finetuned is None:
            del row["rougeL_finetuned"]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def client(proj: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")


def aliases(proj: Path) -> dict[str, str]:
    return {alias: str(v) for alias, v in client(proj).get_registered_model(MODEL).aliases.items()}


def versions(proj: Path) -> list[str]:
    return sorted(str(v.version) for v in client(proj).search_model_versions(f"name = '{MODEL}'"))


def all_runs(proj: Path) -> int:
    from mlflow.entities import ViewType

    mlflow_client = client(proj)
    experiments = [e.experiment_id for e in mlflow_client.search_experiments(view_type=ViewType.ALL)]
    return len(mlflow_client.search_runs(experiments, run_view_type=ViewType.ALL))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def test_champion_whose_run_is_gone_stops_before_anything_is_register_in_process(proj):
    set_scores(proj, 0.9)
    first = register_in_process(proj)
    assert first["aliases"] == ["challenger", "champion"] and "no champion yet" in first["promotion"]["reasons"]
    run_id = first["finetuned_run_id"]
    client(proj).delete_run(run_id)
    set_scores(proj, 0.5)  # worse: had the champion been skipped, this one would be promoted
    runs = all_runs(proj)
    deleted = register(proj)
    assert deleted.returncode == 2
    assert one_error_line(deleted) == (
        f"error: MLflow registry sqlite:///{proj.resolve() / 'mlruns.db'}: {MODEL} champion v1: its run {run_id} "
        "is deleted, so its metrics cannot be trusted; restore the run or move the alias by hand")
    assert versions(proj) == ["1"] and aliases(proj) == {"challenger": "1", "champion": "1"}
    assert all_runs(proj) == runs  # not even a pipeline run was started

    # `mlflow gc` removes the deleted run's rows: the champion's run is not found, which is no
    # "no champion yet".
    store = f"sqlite:///{proj / 'mlruns.db'}"
    gc = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", store, "--run-ids", run_id],
                        cwd=proj, env={**stage_env(), "MLFLOW_TRACKING_URI": store}, capture_output=True, text=True)
    assert gc.returncode == 0, gc.stderr[-3000:]
    gone = register(proj)
    assert gone.returncode == 2
    assert f"{MODEL} champion v1: its run {run_id} no longer exists" in one_error_line(gone)
    assert versions(proj) == ["1"] and aliases(proj) == {"challenger": "1", "champion": "1"}


def test_unreachable_registry_fails_fast_with_one_redacted_line(proj):
    started = time.monotonic()
    result = register(proj, MLFLOW_TRACKING_URI="http://alice:s3cret@127.0.0.1:9/?token=tok123abc")
    elapsed = time.monotonic() - started
    assert result.returncode == 2 and elapsed < 60
    line = one_error_line(result)
    assert line.startswith("error: MLflow tracking server http://***@127.0.0.1:9/?token=*** unreachable or failing (")
    assert "s3cret" not in result.stdout + result.stderr and "tok123abc" not in result.stdout + result.stderr
    assert not (proj / "reports" / "registration.json").exists() and not (proj / "mlruns.db").exists()


def test_missing_champion_alias_lets_a_better_challenger_be_promoted(proj):
    set_scores(proj, 0.9)
    assert register_in_process(proj)["version"] == "1"
    client(proj).delete_registered_model_alias(MODEL, "champion")
    set_scores(proj, 0.95)
    second = register_in_process(proj)
    assert second["version"] == "2" and second["promotion"]["promote"] is True
    assert "no champion yet" in second["promotion"]["reasons"]
    assert aliases(proj) == {"challenger": "2", "champion": "2"}


def test_challenger_without_per_example_scores_of_the_metric_stays_challenger(proj):
    set_scores(proj, None)  # reports of an evaluate that kept no per-example rougeL
    first = register_in_process(proj)
    assert first["promotion"]["promote"] is False and first["aliases"] == ["challenger"]
    assert "challenger has no per-example rougeL scores: cannot compare" in first["promotion"]["reasons"]
    assert first["promotion"]["intervals"] == {"base": None}
    assert aliases(proj) == {"challenger": "1"}


def test_the_same_model_is_never_promoted_over_itself(proj):
    set_scores(proj, 0.9)
    first = register_in_process(proj)
    assert first["promotion"]["promote"] is True and first["champion"] is None
    assert first["promotion"]["intervals"]["base"]["estimate"] == pytest.approx(0.8)
    # The same adapter registered again with even better scores: the champion is this very model
    # (adapter_md5 and base_model_md5 equal), so its scores are the challenger's, and the gain is 0.
    set_scores(proj, 0.95)
    second = register_in_process(proj)
    assert second["version"] == "2" and second["promotion"]["promote"] is False
    assert second["champion"]["version"] == "1" and second["champion"]["scored"].startswith("same model")
    assert second["champion"]["logged_metrics"]["rougeL"] == pytest.approx(0.9)
    reason = next(r for r in second["promotion"]["reasons"] if "over champion v1" in r)
    assert reason == ("+0.0000 rougeL, 95 % CI [+0.0000, +0.0000] over champion v1 (the same model as this "
                      f"challenger) (paired bootstrap, {len(generations(proj))} examples; lower bound must be > 0): fail")
    assert aliases(proj) == {"champion": "1", "challenger": "2"}
    tags = client(proj).get_model_version(MODEL, "2").tags
    assert tags["promotion"].startswith("kept as challenger: ") and reason in tags["promotion"]
    assert tags["gate.base"].startswith("+0.8500 rougeL, 95 % CI [+0.8500, +0.8500]")
    assert tags["gate.champion"] == "+0.0000 rougeL, 95 % CI [+0.0000, +0.0000]"
    tuned = client(proj).get_run(second["finetuned_run_id"]).data
    assert tuned.metrics["gain_vs_base"] == pytest.approx(0.85) and tuned.metrics["promoted"] == 0
    assert tuned.metrics["gain_vs_champion_ci_low"] == 0 and tuned.tags["gate.champion"] == tags["gate.champion"]


def generations(proj: Path) -> list[dict]:
    return [json.loads(line) for line in (proj / "reports" / "generations.jsonl").read_text().splitlines()]


def test_the_champion_is_scored_again_on_the_current_split(proj):
    from ftpipe.metrics import METRIC_KEYS

    evaluated = json.loads((proj / "reports" / "metrics.json").read_text())
    scored = generations(proj)  # evaluate's own scores of the fine-tuned model, before any edit
    originals = {name: (proj / "reports" / name).read_text() for name in ("metrics.json", "generations.jsonl")}
    set_scores(proj, 0.9)
    assert register_in_process(proj)["aliases"] == ["challenger", "champion"]  # v1 logs rougeL 0.9
    # v1 as a champion from another training run: the gate must score it, not trust its logged 0.9.
    client(proj).set_model_version_tag(MODEL, "1", "adapter_md5", "from-another-run")
    for name, text in originals.items():
        (proj / "reports" / name).write_text(text)
    second = register_in_process(proj)
    champion = second["champion"]
    assert champion["version"] == "1"
    assert champion["scored"] == f"generated again on this test split ({len(scored)} rows; none it trained on)"
    assert champion["left_out_trained"] == 0 and champion["examples"] == len(scored)
    assert champion["logged_metrics"]["rougeL"] == pytest.approx(0.9)
    # Loaded from models:/tiny-model/1 and scored on the rows evaluate scored, with its settings:
    # exactly what evaluate measured of the same weights, not the figures v1 logged.
    assert set(champion["metrics"]) == {*METRIC_KEYS, "capped_share"}  # scored with evaluate's metrics
    for key in METRIC_KEYS:
        assert champion["metrics"][key] == pytest.approx(evaluated["finetuned"][key], rel=1e-5), key
    assert champion["metrics"]["rougeL"] != pytest.approx(0.9)
    logged = json.loads(Path(client(proj).download_artifacts(second["pipeline_run_id"], "generations.json",
                                                            str(proj))).read_text())
    table = {column: [row[i] for row in logged["data"]] for i, column in enumerate(logged["columns"])}
    assert table["champion"] == [row["finetuned"] for row in scored]
    assert table["rougeL_champion"] == pytest.approx([row["rougeL_finetuned"] for row in scored])
    assert table["nll_champion"] == pytest.approx([row["nll_finetuned"] for row in scored], rel=1e-5)
    champion_run = client(proj).get_run(champion["run_id"]).data
    assert champion_run.tags["candidate"] == "champion" and champion_run.tags["champion_version"] == "1"
    assert champion_run.metrics["perplexity"] == pytest.approx(evaluated["finetuned"]["perplexity"], rel=1e-5)
    # The same weights: no gain over the champion, so no promotion.
    interval = second["promotion"]["intervals"]["champion"]
    assert interval["low"] <= 0 and second["promotion"]["promote"] is False

    # A test split that no longer holds the evaluated rows: one line, nothing registered.
    test_split = proj / "data" / "prepared" / "test.jsonl"
    originals_split = test_split.read_text()
    test_split.write_text("".join(originals_split.splitlines(keepends=True)[1:]))
    stale = register(proj)
    assert stale.returncode == 2 and versions(proj) == ["1", "2"]
    assert one_error_line(stale).startswith("error: reports/generations.jsonl: 1 row(s) not in data/prepared/test.jsonl")

    # A champion whose model files are gone cannot be scored: one line, nothing registered.
    test_split.write_text(originals_split)
    model_id = client(proj).get_model_version(MODEL, "1").source.removeprefix("models:/")
    shutil.rmtree(Path(client(proj).get_logged_model(model_id).artifact_location.removeprefix("file://")))
    gone = register(proj)
    assert gone.returncode == 2 and versions(proj) == ["1", "2"] and aliases(proj) == {"champion": "1", "challenger": "2"}
    assert one_error_line(gone) == (
        f"error: MLflow registry sqlite:///{proj.resolve() / 'mlruns.db'}: {MODEL} champion v1: cannot load its "
        'model to score it again (Failed to download an "MLmodel" model file from "models:/tiny-model/1"); '
        "restore it or move the alias by hand")


def test_a_champion_is_not_scored_on_test_rows_it_trained_on(proj):
    """A champion whose training rows are in today's test split (a split that moved, a changed seed)
    would score them from memory: they are left out of its scoring and of the paired comparison."""
    train_split, test_split = proj / "data" / "prepared" / "train.jsonl", proj / "data" / "prepared" / "test.jsonl"
    original_train = train_split.read_text()
    scored = generations(proj)
    test_rows = {row["id"]: row for row in map(json.loads, test_split.read_text().splitlines())}
    memorised = [test_rows[row["id"]] for row in scored[:3]]
    train_split.write_text(original_train + "".join(json.dumps(row) + "\n" for row in memorised))
    set_scores(proj, 0.9)
    register_in_process(proj)  # v1 trained (as its logged digests say) on three of today's test rows
    client(proj).set_model_version_tag(MODEL, "1", "adapter_md5", "from-another-run")
    train_split.write_text(original_train)
    second = register_in_process(proj)
    champion, kept = second["champion"], len(scored) - 3
    assert champion["left_out_trained"] == 3 and champion["examples"] == kept
    assert champion["scored"] == f"generated again on this test split ({kept} rows; 3 it trained on left out)"
    assert second["promotion"]["intervals"]["champion"]["examples"] == kept
    assert second["promotion"]["intervals"]["base"]["examples"] == len(scored)
    logged = json.loads(Path(client(proj).download_artifacts(second["pipeline_run_id"], "generations.json",
                                                            str(proj))).read_text())
    table = {column: [row[i] for row in logged["data"]] for i, column in enumerate(logged["columns"])}
    assert table["champion"][:3] == [None, None, None] and None not in table["champion"][3:]
    assert table["champion"][3:] == [row["finetuned"] for row in scored[3:]]


def test_a_short_run_without_some_losses_registers_and_logs_no_null(proj):
    """A report whose training loss was never logged (an older short run) holds nulls: they are not
    metrics, and the version registers."""
    path = proj / "reports" / "train.json"
    report = json.loads(path.read_text())
    report.update(train_loss_final=None, train_val_gap=None)
    path.write_text(json.dumps(report))
    registered = register_in_process(proj)
    tuned = client(proj).get_run(registered["finetuned_run_id"]).data.metrics
    assert "train_loss_final" not in tuned and "train_val_gap" not in tuned
    assert tuned["val_loss_final"] == pytest.approx(report["val_loss_final"])


def test_the_champion_is_scored_again_where_evaluate_ran_the_candidates(proj, monkeypatch):
    """reports/metrics.json says where evaluate ran (device, precision): the champion is scored there too."""
    import torch

    from ftpipe import scoring

    set_scores(proj, 0.9)
    register_in_process(proj)
    client(proj).set_model_version_tag(MODEL, "1", "adapter_md5", "from-another-run")
    path = proj / "reports" / "metrics.json"
    report = json.loads(path.read_text())
    report["settings"].update(device="cpu", precision="bf16")
    path.write_text(json.dumps(report))
    seen, real = [], scoring.score_model

    def spy(model, *args, **kwargs):
        weight = next(model.parameters())
        seen.append((weight.device.type, weight.dtype))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_model", spy)
    assert register_in_process(proj)["champion"]["version"] == "1"
    assert seen == [("cpu", torch.bfloat16)]


def test_a_continual_fine_tune_is_logged_as_trained_on_its_parents_rows_too(tmp_path):
    from ftpipe.splits import prompt_digests
    from stages.register import _trained_on

    rows = [{"id": f"train-{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                             {"role": "assistant", "content": "a"}]} for i in range(3)]
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "parent").mkdir()
    (tmp_path / "parent" / "train_prompts.json").write_text(json.dumps(["0123456789abcdef"]))
    assert _trained_on(tmp_path / "prepared", None) == prompt_digests(rows)
    assert set(_trained_on(tmp_path / "prepared", tmp_path / "parent")) == {*prompt_digests(rows), "0123456789abcdef"}


def test_each_candidate_run_carries_the_params_that_produced_it(proj):
    """The MLflow compare view lines up the runs' Parameters: the tuned model's training params beside
    the base and few-shot runs' base model, data and evaluation settings."""
    import yaml

    registered = register_in_process(proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    store = client(proj)
    tuned = store.get_run(registered["finetuned_run_id"]).data.params
    assert tuned["train.learning_rate"] == str(params["train"]["learning_rate"])
    assert tuned["train.method"] == params["train"]["method"] and tuned["prepare_base.source"] == "local"
    for name in ("base_run_id", "fewshot_run_id"):
        base = store.get_run(registered[name]).data.params
        assert base["evaluate.max_new_tokens"] == str(params["evaluate"]["max_new_tokens"])
        assert base["prepare_base.path"] == tuned["prepare_base.path"]
        assert not any(key.startswith("train.") for key in base)


@pytest.mark.parametrize("case", ["gguf of another model", "scores of a DPO model"])
def test_reports_describing_another_model_stop_before_anything_is_registered(proj, case):
    """A report written for another model (before dpo was turned on or off, an older export) would
    gate or describe the wrong model: register stops with one line naming the report and the rerun."""
    reports = proj / "reports"
    if case == "gguf of another model":
        export = json.loads((reports / "export.json").read_text())
        assert export["model"] == "models/adapter/merged" and export["formats"]  # the shipped f16 and q8_0
        export["model"] = "models/dpo/merged"
        (reports / "export.json").write_text(json.dumps(export))
        expected = ("error: reports/export.json: the GGUF files are of models/dpo/merged, not "
                    "models/adapter/merged: rerun `dvc repro export`")
    else:
        metrics = json.loads((reports / "metrics.json").read_text())
        metrics["dpo"] = dict(metrics["finetuned"])  # as evaluate writes it with dpo.enabled
        (reports / "metrics.json").write_text(json.dumps(metrics))
        expected = ("error: reports/metrics.json: scores a DPO model but dpo.enabled is false: "
                    "rerun `dvc repro evaluate`")
    result = register(proj)
    assert result.returncode == 2
    assert one_error_line(result) == expected
    assert not (proj / "mlruns.db").exists() or all_runs(proj) == 0  # nothing logged, nothing registered
    assert not (reports / "registration.json").exists()


def test_the_gguf_files_are_named_in_the_registered_run_with_their_checksums(proj):
    set_scores(proj, 0.9)
    registration = register_in_process(proj)
    export = json.loads((proj / "reports" / "export.json").read_text())
    mlflow_client = client(proj)
    run_id = registration["finetuned_run_id"]
    listed = {a.path for a in mlflow_client.list_artifacts(run_id, "gguf")}
    assert listed == {"gguf/manifest.json", "gguf/Modelfile"}
    manifest = json.loads(Path(mlflow_client.download_artifacts(run_id, "gguf/manifest.json", str(proj / "dl"))).read_text())
    assert manifest["files"] == {fmt: {"file": Path(f["file"]).name, "bytes": f["bytes"], "sha256": f["sha256"]}
                                 for fmt, f in export["formats"].items()}
    for entry in manifest["files"].values():  # the files themselves stay in DVC's cache, as named
        assert (proj / "models" / "gguf" / entry["file"]).stat().st_size == entry["bytes"]
