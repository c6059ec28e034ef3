"""The retraining flow on the tiny model: no change, better data, a worse model, one run at a time, retries,
and a deployment served on a schedule by a real Prefect server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import qa_rows, set_param, stage_env, write_jsonl

from flows.common import BUSY_EXIT, StageFailed
from flows.retrain import STAGES
from ftpipe.processes import stop_group

DATA = "data/raw/train.jsonl"


@pytest.fixture(scope="module")
def harness(prefect_server):
    """This module's flows, called in this process, against the test process's Prefect server
    (conftest's, on a migrated database: prefect_test_harness would migrate a new one, about 10 s)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server.url}):
        yield


def commit(project: Path, message: str) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-q", "-m", message], cwd=project, check=True)


def landed(project: Path, rows: list[dict]) -> Path:
    """Training data in the landing folder, trained by epochs so that more data means more steps.
    The gate compares perplexity: the tiny model's 8-token greedy answers score ROUGE 0 before and
    after a few dozen steps, while perplexity falls with every step."""
    write_jsonl(project / DATA, rows)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(max_steps=-1, epochs=1, learning_rate=1e-2, eval_steps=8)
    params["register"].update(primary_metric="perplexity")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(project, "data in data/raw")
    return project


def versions_registered(project: Path) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(f"sqlite:///{project / 'mlruns.db'}").search_model_versions("name = 'tiny-model'"))


def latest_artifact(key: str) -> str:
    import asyncio

    from prefect import get_client

    async def read() -> str:
        # A raw request: with fastapi 0.154 the server rejects the explicit nulls that
        # PrefectClient.read_artifacts sends for the filters it leaves unset (HTTP 422).
        async with get_client() as client:
            response = await client._client.post("/artifacts/filter", json={
                "artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1})
            return response.json()[0]["data"]

    return asyncio.run(read())


def test_three_triggers_no_change_better_data_worse_model(finished_project, harness, tmp_path):
    import mlflow

    from flows.retrain import retrain

    project = finished_project  # the session's pipeline run: v1 registered (a challenger: ROUGE 0 ties the base)

    # 1. Nothing changed: no stage runs, the report says why.
    lock = (project / "dvc.lock").read_text()
    unchanged = retrain(project_dir=project)
    assert unchanged["status"] == "unchanged" and unchanged["latest_version"] == "1"
    assert (project / "dvc.lock").read_text() == lock
    assert "# No change: no training" in latest_artifact("retrain-report")

    # 2. More data landed in data/raw, trained for more epochs: DVC sees data/raw change; the new
    #    version beats the base (there is no champion yet), scored on the new test split, by more than
    #    noise.
    landed(project, qa_rows(80))
    set_param(project, "train", "epochs", 4)
    better = retrain(project_dir=project, data_path=DATA)
    report = latest_artifact("retrain-report")
    assert better["status"] == "promoted", report
    assert "prepare_data: changed deps: data/raw modified" in report
    assert "# Retraining: tiny-model v2 promoted to champion" in report
    assert "| metric | base | champion (none) | challenger v2 |" in report
    assert set(better["timings_s"]) == set(STAGES)

    # 3. Continual fine-tuning from the champion (the flow fetches v2 as the parent) with a learning
    #    rate too small to move the adapter: the model stays v2, so it cannot beat the champion, and
    #    stays challenger. The project now has a default DVC remote: the flow pushes what it made.
    remote = tmp_path / "dvc-remote"
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-d", "shared", str(remote)], cwd=project,
                   env=stage_env(), check=True, capture_output=True)
    set_param(project, "train", "init_from", "champion")
    set_param(project, "train", "learning_rate", 1e-9)
    commit(project, "continue from the champion; a DVC remote")
    worse = retrain(project_dir=project)
    report = latest_artifact("retrain-report")
    assert worse["status"] == "challenger", report
    assert "params.yaml train.init_from modified, train.learning_rate modified" in report
    assert "# Retraining: tiny-model v3 kept as challenger" in report
    assert "champion v2 (before)" in report and ": fail" in report
    assert "Trained from: tiny-model v2 (champion) (`train.init_from`)" in report

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    assert client.get_model_version_by_alias("tiny-model", "champion").version == 2
    assert client.get_model_version_by_alias("tiny-model", "challenger").version == 3
    assert client.get_model_version("tiny-model", "3").tags["param.train.learning_rate"] == "1e-09"
    assert client.get_model_version("tiny-model", "3").tags["parent"] == "tiny-model v2 (champion)"
    assert json.loads((project / "models/parent/manifest.json").read_text())["version"] == "2"
    # Every output the lock names is in the remote, for another clone to `dvc pull`.
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["stages"].values()
    uncached = {path for stage in declared for key in ("outs", "metrics", "plots") for out in stage.get(key, [])
                if isinstance(out, dict) for path, options in out.items() if options.get("cache") is False}
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outputs = {out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])
               if out["path"] not in uncached}
    pushed = {f"{entry.parent.name}{entry.name}" for entry in (remote / "files" / "md5").glob("*/*")}
    assert outputs and outputs <= pushed, sorted(outputs - pushed)
    assert worse["dvc_push"].startswith("'shared': ")


def test_second_trigger_while_one_runs_exits_and_touches_nothing(project, harness):
    from prefect.settings import PREFECT_API_URL

    from flows.retrain import retrain

    landed(project, qa_rows(24))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from flows.common import project_lock\n"
         "with project_lock(Path(sys.argv[1]), who='flows.pipeline'):\n    print('held', flush=True); time.sleep(60)",
         str(project)],
        cwd=project, env=stage_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = retrain(project_dir=project, lock_wait_s=1)  # as a deployment run calls it
        assert result["status"] == "busy" and time.monotonic() - started >= 1
        assert f"another run of {project} is running (flows.pipeline pid {holder.pid} since" in result["message"]
        assert "# Retraining skipped" in latest_artifact("retrain-report")
        cli = subprocess.run([sys.executable, "-m", "flows.retrain", "--project-dir", str(project)], cwd=project,
                             env={**stage_env(), "PREFECT_API_URL": PREFECT_API_URL.value()},
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == BUSY_EXIT, cli.stderr
        assert cli.stderr.splitlines() == [f"error: {result['message']}"]  # one line, before Prefect starts
        assert not (project / "dvc.lock").exists() and not (project / "models" / "base").exists()
    finally:
        holder.kill()
        holder.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout_s:.0f} s")


def start_prefect_server(port: int, env: dict[str, str]) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:`port` in its own process group (stop it with stop_group)."""
    return subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_unreachable_mlflow_server_is_retried_with_backoff(finished_project, harness, monkeypatch, tmp_path):
    """The tracking server is down when the flow starts and comes up after the first failed attempt
    (the outputs are up to date, so only register runs, into the server's empty store)."""
    import mlflow

    import flows.retrain as retrain_module

    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once: the flow does the backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    project = finished_project
    from ftpipe.tracking import dvc_lock_hashes

    trained = dvc_lock_hashes(project)["train:models/adapter"]
    # Short equal waits, so the run does not sit out a long delay while the server starts.
    set_param(project, "retrain", "registry_retry_delays_s", [3] * 8)
    servers, attempts = [], []
    real = retrain_module.registry_state

    def registry_state(project_dir):
        attempts.append(time.monotonic())
        try:
            return real(project_dir)
        except Exception:
            if not servers:
                servers.append(subprocess.Popen(
                    [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                     "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--workers", "1"],
                    env={**stage_env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # its 8 job processes: unused
                    start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            raise

    monkeypatch.setattr(retrain_module, "registry_state", registry_state)
    try:
        result = retrain_module.retrain(project_dir=project)
        versions = mlflow.MlflowClient(f"http://127.0.0.1:{port}").search_model_versions("name = 'tiny-model'")
    finally:
        for server in servers:
            stop_group(server, signal.SIGTERM, timeout=20)
    assert servers and len(attempts) >= 2 and attempts[1] - attempts[0] >= 2.4  # 3 s, give or take 20 % jitter
    assert result["registration"]["version"] == "1"
    assert [str(v.version) for v in versions] == ["1"]
    assert result["registration"]["tracking_uri"] == f"http://127.0.0.1:{port}"
    # A registry that has never seen these outputs: register is forced, nothing is retrained.
    assert "no registered version of tiny-model yet" in result["report"]
    assert dvc_lock_hashes(project)["train:models/adapter"] == trained


@pytest.mark.slow
def test_served_deployment_runs_on_its_cron_schedule(finished_project, prefect_home):
    """A real Prefect server, the deployment served with a cron schedule, one scheduled run completed.
    The project is a finished run, so the scheduled run finds nothing changed (retraining itself is
    the three-triggers test's)."""
    import urllib.request

    project = finished_project
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**stage_env(), "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    server = start_prefect_server(port, env)
    served = None
    try:
        wait_http(f"{api}/health", 120, server)
        # A sixth cron field is seconds (croniter's): every 10 s, so the test does not wait for a minute.
        served = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--serve", "--cron", "* * * * * */10",
                                   "--project-dir", str(project)], cwd=project, env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        query = json.dumps({"flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED"]}}},
                            "sort": "START_TIME_DESC", "limit": 5}).encode()
        deadline, runs = time.monotonic() + 540, []
        while time.monotonic() < deadline and not runs:
            assert served.poll() is None, f"serve exited with {served.returncode}"
            time.sleep(5)
            request = urllib.request.Request(f"{api}/flow_runs/filter", data=query,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                runs = json.loads(response.read())
        assert runs, "no scheduled run finished in 9 minutes"
        assert runs[0]["state_type"] == "COMPLETED" and runs[0]["deployment_id"]
        assert runs[0]["auto_scheduled"] is True
        assert json.loads((project / "reports" / "registration.json").read_text())["version"] == "1"
        assert runs[0]["name"] and versions_registered(project) == 1  # nothing changed: nothing registered
    finally:
        if served is not None:
            stop_group(served, signal.SIGTERM, timeout=20)
        stop_group(server, signal.SIGTERM, timeout=20)


def test_data_path_must_land_in_data_raw_and_bad_cron_is_refused(project, capsys):
    from flows.retrain import main, use_data_path
    from ftpipe.errors import PipelineError

    with pytest.raises(PipelineError, match="put the data under data/raw/, where DVC hashes it"):
        use_data_path(project, "elsewhere/train.jsonl")
    with pytest.raises(PipelineError, match="put the data under data/raw/"):
        use_data_path(project, "data/raw/../../elsewhere.jsonl")
    landed(project, qa_rows(4))
    assert use_data_path(project, DATA) is True
    assert use_data_path(project, str(project / DATA)) is False  # the same file, absolute: no change
    params = yaml.safe_load((project / "params.yaml").read_text())["prepare_data"]
    assert (params["source"], params["path"]) == ("file", DATA)
    assert main(["--serve", "--cron", "every day", "--project-dir", str(project)]) == 2
    assert capsys.readouterr().err.strip() == "error: cron 'every day': not a valid cron expression"


def test_report_shows_the_champion_scored_on_this_split_and_the_gate_interval(tmp_path):
    from flows.retrain_report import retrain_report

    block = {"bleu": 1.0, "rouge1": 0.2, "rouge2": 0.1, "rougeL": 0.2, "rougeLsum": 0.2, "perplexity": 9.0}
    interval = {"metric": "rougeL", "confidence": 0.95, "examples": 8, "samples": 2000, "method": "BCa"}
    registration = {
        "model_name": "tiny-model", "version": "2", "model_uri": "models:/tiny-model/2", "experiment": "tiny-test",
        "pipeline_run_id": "p", "base_run_id": "b", "fewshot_run_id": "f", "finetuned_run_id": "t",
        "tracking_uri": "sqlite:///mlruns.db", "aliases": ["challenger", "champion"],
        "promotion": {"promote": True, "reasons": ["a reason"], "metric": "rougeL", "min_improvement": 0.0, "intervals": {
            "base": {**interval, "estimate": 0.15, "low": 0.1, "high": 0.2},
            "champion": {**interval, "estimate": 0.05, "low": 0.01, "high": 0.09}}},
        "champion": {"version": "1", "scored": "generated again on this test split", "run_id": "r1",
                     "metrics": {**block, "rougeL": 0.15}, "logged_metrics": {**block, "rougeL": 0.9}},
    }
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "registration.json").write_text(json.dumps(registration))
    (reports / "metrics.json").write_text(json.dumps({
        "examples": 8, "base": {**block, "rougeL": 0.05}, "fewshot": block, "finetuned": block, "delta": {},
        "forgetting": 0.0, "training": {}, "few_shot_ids": [], "general_text": {"path": "g.txt", "tokens": 9},
        "bleu_signature": "sig", "intervals": {}, "settings": {}}))
    (reports / "data.json").write_text(json.dumps({
        "source": "file", "rows_in": 80, "rows_out": 80, "splits": {"train": 64, "val": 8, "test": 8}, "rules": {},
        "near_duplicate_clusters": 0, "split_groups": 80, "leaks": {"total": 0}, "leak_action": "fail",
        "train_rows_dropped_for_leaks": 0, "token_filters": True}))
    (reports / "train.json").write_text(json.dumps({
        "method": "lora", "parent": "tiny-model v1 (champion)", "steps": 6, "epochs": 0.4, "resumed_from_step": 0,
        "early_stopped": False, "train_loss_final": 5.9, "val_loss_final": 5.9, "val_loss_last_eval": 5.9,
        "val_loss_best": 5.9, "best_step": 6, "kept_step": 6, "train_val_gap": 0.0, "runtime_s": 1.0, "train_s": 1.0,
        "tokens_per_s": 900.0, "precision": "fp32", "attention": "eager", "optimizer": "adamw_torch", "parameters": 1,
        "trainable_parameters": 1, "rows": {"train": 64, "val": 8}, "packing": True, "shared_prefix_tokens": 0,
        "dropped_too_long": {"train": 0, "val": 0}}))
    change = {"reasons": ["prepare_data: changed deps"], "champion": {"version": "1", "metrics": {"rougeL": 0.9}}}
    report, _ = retrain_report(tmp_path, change, {"register": 1.0})
    assert "Trained from: tiny-model v1 (champion) (`train.init_from`), method `lora`, 6 steps." in report
    assert "| rougeL | 0.0500 | 0.1500 | 0.2000 |" in report  # the re-scored 0.15, not the logged 0.9
    assert "| metric | base | champion v1 (before) | challenger v2 |" in report
    assert "The champion is scored on this test split: the same rows and greedy settings as the challenger" in report
    assert "logged when it was registered" not in report
    assert ("+0.1500 rougeL, 95 % CI [+0.1000, +0.2000] over base; +0.0500 rougeL, 95 % CI [+0.0100, +0.0900] "
            "over champion v1: promoted") in report


@pytest.mark.parametrize(("stage", "failures", "calls", "ends"), [
    ("train", [StageFailed("train", -9, "killed")], 2, "done"),  # a signal: resumed from its checkpoints
    ("train", [StageFailed("train", 137, "killed")], 2, "done"),  # the shell's 128 + SIGKILL
    ("train", [StageFailed("train", 1, "crashed")], 1, "failed"),  # failed by itself: would fail again
    ("train", [StageFailed("train", 2, "bad input")], 1, "failed"),
    ("prepare_base", [StageFailed("prepare_base", 1, "hub timeout")] * 2, 3, "done"),  # transient I/O
    ("prepare_base", [StageFailed("prepare_base", 2, "no such model")], 1, "failed"),  # user error: once
    ("register", [StageFailed("register", -9, "killed")], 1, "failed"),  # never twice: it could register twice
])
def test_the_flows_retry_killed_and_transient_stages_never_bad_input_or_register(harness, stage, failures, calls,
                                                                                 ends):
    """Prefect's engine applies each stage task's retry rule as the retraining flow configures it
    (flows.retrain.retrain_task): the task's body here stands in for `dvc repro <stage>`."""
    from prefect import flow, task

    from flows.retrain import retrain_task

    configured = retrain_task(stage)
    seen = []

    def body() -> str:
        seen.append(1)
        if len(seen) <= len(failures):
            raise failures[len(seen) - 1]
        return "done"

    attempt = task(body, name=f"{stage}-rule", retries=configured.retries, retry_delay_seconds=0,
                   retry_condition_fn=configured.retry_condition_fn)

    @flow
    def one_stage() -> str:
        try:
            return attempt()
        except StageFailed:
            return "failed"

    assert one_stage() == ends and len(seen) == calls
