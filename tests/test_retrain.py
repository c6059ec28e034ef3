"""The retraining flow on the tiny model: no change, better data, a worse model, one run at a time, retries,
and a deployment served on a schedule by a real Prefect server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import qa_rows, set_param, stage_env, write_jsonl

from flows.retrain import BUSY_EXIT, STAGES

DATA = "data/raw/train.jsonl"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


def commit(project: Path, message: str) -> None:
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git + ["add", "-A"], cwd=project, check=True)
    subprocess.run(git + ["commit", "-q", "-m", message], cwd=project, check=True)


def landed(project: Path, rows: list[dict]) -> Path:
    """Training data in the landing folder, trained by epochs so that more data means more steps."""
    write_jsonl(project / DATA, rows)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"].update(max_steps=-1, epochs=2)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    commit(project, "data in data/raw")
    return project


def append(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in rows)


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


def test_three_triggers_no_change_better_data_worse_model(project, harness):
    import mlflow

    from flows.retrain import retrain

    landed(project, qa_rows(24))
    first = retrain(project_dir=project, data_path=DATA)
    assert first["status"] in ("promoted", "challenger") and first["registration"]["version"] == "1"
    assert "no registered version of tiny-model yet" in first["report"]

    # 1. Nothing changed: no stage runs, the report says why.
    lock = (project / "dvc.lock").read_text()
    unchanged = retrain(project_dir=project, data_path=DATA)
    assert unchanged["status"] == "unchanged" and unchanged["latest_version"] == "1"
    assert (project / "dvc.lock").read_text() == lock
    assert "# No change: no training" in latest_artifact("retrain-report")

    # 2. More data appended to the file: DVC sees data/raw change; the new version beats v1 and the base.
    append(project / DATA, qa_rows(96, offset=24))
    better = retrain(project_dir=project, data_path=DATA)
    report = latest_artifact("retrain-report")
    assert better["status"] == "promoted", report
    assert "prepare_data: changed deps: data/raw modified" in report
    assert "# Retraining: tiny-model v2 promoted to champion" in report
    assert "| metric | base | champion v1 (before) | challenger v2 |" in report
    assert set(better["timings_s"]) == set(STAGES)

    # 3. A learning rate too small to move the adapter: the model stays the base model, so it cannot
    #    beat the base or the champion, and stays challenger.
    set_param(project, "train", "learning_rate", 1e-9)
    worse = retrain(project_dir=project)
    report = latest_artifact("retrain-report")
    assert worse["status"] == "challenger", report
    assert "params.yaml train.learning_rate modified" in report
    assert "# Retraining: tiny-model v3 kept as challenger" in report
    assert "champion v2 (before)" in report and ": fail" in report

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlruns.db'}")
    assert client.get_model_version_by_alias("tiny-model", "champion").version == "2"
    assert client.get_model_version_by_alias("tiny-model", "challenger").version == "3"
    assert client.get_model_version("tiny-model", "3").tags["param.train.learning_rate"] == "1e-09"


def test_second_trigger_while_one_runs_exits_and_touches_nothing(project, harness):
    from prefect.settings import PREFECT_API_URL

    from flows.retrain import retrain

    landed(project, qa_rows(24))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from flows.retrain import project_lock\n"
         "with project_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)", str(project)],
        cwd=project, env=stage_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = retrain(project_dir=project, lock_wait_s=1)
        assert result["status"] == "busy" and time.monotonic() - started >= 1
        assert f"(pid {holder.pid} since" in result["message"]
        assert "# Retraining skipped" in latest_artifact("retrain-report")
        cli = subprocess.run([sys.executable, "-m", "flows.retrain", "--project-dir", str(project)], cwd=project,
                             env={**stage_env(), "PREFECT_API_URL": PREFECT_API_URL.value()},
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == BUSY_EXIT and "busy: another retraining of" in cli.stderr
        assert not (project / "dvc.lock").exists() and not (project / "models" / "base").exists()
    finally:
        holder.kill()
        holder.wait()
