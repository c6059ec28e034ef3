"""The retraining deployment in a Prefect work pool: deployed to a real local server, run by
`prefect worker start`, and the one-line errors of a missing pool or API."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import stage_env
from test_retrain import free_port, start_prefect_server, wait_http

from ftpipe.processes import stop_group

POOL = "retrain-pool"


def api_call(api: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{api}{path}", data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def prefect_processes(home: Path) -> list[int]:
    """Processes started with this PREFECT_HOME: the server, the worker and the runs it started."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("PREFECT_HOME") == str(home):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def test_deploy_without_api_or_with_an_unreachable_one_fails_in_one_line(project, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.retrain import main

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["--deploy", "--pool", POOL, "--project-dir", str(project)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: PREFECT_API_URL is not set: --deploy needs a running Prefect server's API, "
        "e.g. PREFECT_API_URL=http://127.0.0.1:4200/api"]
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with temporary_settings(updates={PREFECT_API_URL: api}):
        assert main(["--deploy", "--pool", POOL, "--project-dir", str(project)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: PREFECT_API_URL={api}: the Prefect API does not answer ("), err


@pytest.mark.slow
def test_deployment_in_a_process_pool_is_run_by_a_worker(finished_project, tmp_path, prefect_home):
    """A real server, a process work pool, the flow deployed from the project folder, a worker that
    runs a triggered run to Completed with its report readable through the API; nothing left after."""
    project, home = finished_project, prefect_home
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**stage_env(), "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1"}  # the worker polls every 10 s by default

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=project, env=env, capture_output=True, text=True,
                              timeout=120)

    server = start_prefect_server(port, env)
    worker = None
    try:
        wait_http(f"{api}/health", 120, server)
        created = cli("prefect", "work-pool", "create", "--type", "process", POOL)
        assert created.returncode == 0, created.stderr[-2000:]

        missing = cli("flows.retrain", "--deploy", "--pool", "no-such-pool")
        assert missing.returncode == 2 and missing.stderr.splitlines() == [
            f"error: --pool no-such-pool: no such work pool at PREFECT_API_URL={api} "
            f"(create it: prefect work-pool create --type process no-such-pool)"]

        deployed = cli("flows.retrain", "--deploy", "--pool", POOL)
        assert deployed.returncode == 0, deployed.stderr[-2000:]
        deployment = api_call(api, "/deployments/name/scheduled-retrain/scheduled-retrain")
        assert deployment["work_pool_name"] == POOL
        assert deployment["global_concurrency_limit"]["limit"] == 1
        cron = yaml.safe_load((project / "params.yaml").read_text())["retrain"]["cron"]
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == [cron]
        assert deployment["parameters"]["project_dir"] == str(project.resolve())
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(project.resolve())}}]

        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], cwd=tmp_path,
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        triggered = cli("prefect", "deployment", "run", "scheduled-retrain/scheduled-retrain")
        assert triggered.returncode == 0, triggered.stderr[-2000:]
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", triggered.stdout).group(1)
        deadline, run = time.monotonic() + 180, {}
        while time.monotonic() < deadline:
            assert worker.poll() is None, f"worker exited with {worker.returncode}"
            run = api_call(api, f"/flow_runs/{run_id}")
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            time.sleep(1)
        assert run.get("state_type") == "COMPLETED", run.get("state")
        artifacts = api_call(api, "/artifacts/filter", {
            "artifacts": {"key": {"any_": ["retrain-report"]}, "flow_run_id": {"any_": [run_id]}}})
        assert len(artifacts) == 1 and artifacts[0]["type"] == "markdown"
        assert "# No change: no training" in artifacts[0]["data"]  # the finished project is up to date
        assert {server.pid, worker.pid} <= set(prefect_processes(home))  # the check below sees them
    finally:
        if worker is not None:
            stop_group(worker, signal.SIGTERM, timeout=20)
        stop_group(server, signal.SIGTERM, timeout=20)
    assert prefect_processes(home) == []
