"""The team stack (services/stack.py) for real: PostgreSQL (pgserver), moto's S3 server and an MLflow server,
started on 127.0.0.1 by `python -m services.stack`. The tiny project's register stage writes into it with
nothing but MLFLOW_TRACKING_URI set; a fresh process loads the champion from S3; a stop and start keeps
versions, aliases, metrics and artifacts; a stack that is down fails in one line; a DVC remote on its S3
is pushed from the project and pulled into a clone that then reruns nothing.

One stack serves the module (free ports); its teardown stops it and checks that no server survives.
Its folder is made with mkdtemp, outside pytest's tmp tree: as root, pgserver opens every folder above
PostgreSQL's data to the unprivileged user the server runs as, and pytest closes its own tree again.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import ROOT, stage_env

from services import stack as team

MODEL = "tiny-model"
PROBE = """
import json, os, sys
import mlflow
from ftpipe import registry
client = registry.connect(os.environ["MLFLOW_TRACKING_URI"])
version = client.get_model_version_by_alias(sys.argv[1], "champion").version
model = mlflow.transformers.load_model(f"models:/{sys.argv[1]}@champion", return_type="components")["model"]
again, _ = registry.load_model(client, sys.argv[1], str(version))  # the reader register scores a champion with
print(json.dumps({"version": str(version), "sums": {n: float(p.double().sum()) for n, p in model.state_dict().items()},
                  "same": all(p.equal(q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))}))
"""


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def stack_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.stack", *args], cwd=ROOT, env=stage_env(),
                          capture_output=True, text=True, timeout=400)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def tracked_env(uri: str) -> dict[str, str]:
    return {**stage_env(), "MLFLOW_TRACKING_URI": uri}


def server_processes(state: team.Stack) -> list:
    """Every process of the stack: each recorded server and all it forked."""
    import psutil

    procs = []
    for entry in state.processes.values():
        try:
            parent = psutil.Process(int(entry["pid"]))
            procs += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return procs


def alive(procs: list) -> list:
    import psutil

    def running(proc) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return [proc for proc in procs if running(proc)]


@pytest.fixture(scope="module")
def stack():
    folder = Path(tempfile.mkdtemp(prefix="ftpipe-stack-"))
    postgres, s3, mlflow = free_ports(3)
    try:
        started = stack_cli("start", "--dir", str(folder), "--postgres-port", str(postgres), "--s3-port", str(s3),
                            "--mlflow-port", str(mlflow), "--workers", "1")
        assert started.returncode == 0, started.stderr[-3000:]
        state = team.load(folder)
        yield state, started.stdout
    finally:
        state = team.load(folder)
        if state is not None:  # None: start failed before recording anything
            procs = server_processes(state)
            stopped = stack_cli("stop", "--dir", str(folder))
            assert stopped.returncode == 0, stopped.stderr[-3000:]
            assert not alive(procs), f"still running after stop: {alive(procs)}"
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def registered(stack, built_project, tmp_path_factory) -> Path:
    """A copy of the finished tiny project whose register stage has run again, into the stack. The gate's
    inputs are set so the challenger is promoted (the tiny model's greedy answers all score ROUGE-L 0)."""
    state, _ = stack
    proj = Path(shutil.copytree(built_project, tmp_path_factory.mktemp("stack-registered") / "project", symlinks=True))
    metrics = json.loads((proj / "reports" / "metrics.json").read_text())
    metrics["base"].update(rougeL=0.1)
    metrics["finetuned"].update(rougeL=0.9)
    (proj / "reports" / "metrics.json").write_text(json.dumps(metrics))
    rows = [json.loads(line) for line in (proj / "reports" / "generations.jsonl").read_text().splitlines()]
    (proj / "reports" / "generations.jsonl").write_text(
        "".join(json.dumps({**row, "rougeL_base": 0.1, "rougeL_finetuned": 0.9}) + "\n" for row in rows))
    shutil.rmtree(proj / "mlartifacts")  # the local store of the first run: the stack is the store now
    (proj / "mlruns.db").unlink()
    result = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "--single-item", "register"], cwd=proj,
                            env=tracked_env(state.tracking_uri), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return proj


def registry_view(uri: str) -> dict:
    """Versions, aliases, the fine-tuned run's metrics and its model's artifact files, read through the server."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    latest = max(versions, key=lambda v: int(v.version))
    model = client.get_logged_model(latest.source.removeprefix("models:/"))  # MLflow 3: the version's logged model
    return {
        "versions": sorted(v.version for v in versions),
        "aliases": dict(client.get_registered_model(MODEL).aliases),
        "metrics": client.get_run(latest.run_id).data.metrics,
        "tags": latest.tags,
        "artifact_location": client.get_experiment(model.experiment_id).artifact_location,
        "files": sorted(f.path for f in client.list_logged_model_artifacts(model.model_id, "model")),
    }


def s3_objects(state: team.Stack) -> dict[str, dict[str, str]]:
    s3 = team.s3_client(state)
    return {bucket: {obj["Key"]: obj["ETag"] for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", [])}
            for bucket in (team.MLFLOW_BUCKET, team.DVC_BUCKET)}


@pytest.mark.slow
def test_start_binds_loopback_only_and_prints_no_credential(stack):
    import psutil

    state, printed = stack
    assert f"export MLFLOW_TRACKING_URI={state.tracking_uri}" in printed.splitlines()
    password = urlsplit(state.postgres_uri).password
    assert password not in printed and "postgresql://***@127.0.0.1" in printed
    assert (state.dir / team.STATE_FILE).stat().st_mode & 0o077 == 0
    for proc in psutil.process_iter():  # the password never sits in a command line (`ps` shows those)
        try:
            assert password not in " ".join(proc.cmdline())
        except psutil.Error:
            continue
    listening = {(conn.laddr.ip, conn.laddr.port) for proc in server_processes(state)
                 for conn in proc.net_connections("inet") if conn.status == psutil.CONN_LISTEN}
    assert {port for _, port in listening} == set(state.ports.values())
    assert {ip for ip, _ in listening} == {"127.0.0.1"}
    assert stack_cli("start", "--dir", str(state.dir)).returncode == 0  # already running: nothing started
    assert team.load(state.dir).processes == state.processes


@pytest.mark.slow
def test_register_goes_to_the_stack_and_the_champion_loads_from_s3(stack, registered):
    import safetensors.torch

    from ftpipe.tracking import lineage

    state, _ = stack
    view = registry_view(state.tracking_uri)
    assert view["versions"] == ["1"] and view["aliases"] == {"challenger": "1", "champion": "1"}
    expected = lineage(registered, method="lora")
    assert {key: view["tags"][key] for key in expected} == expected
    assert "unknown" not in expected.values()
    assert view["metrics"]["rougeL"] == 0.9 and "val_loss_final" in view["metrics"]
    # Artifacts went through the server into S3, none into the project's local artifact folder.
    assert view["artifact_location"].startswith("mlflow-artifacts:")
    assert "model/model.safetensors" in view["files"]
    stored = s3_objects(state)[team.MLFLOW_BUCKET]
    assert any(key.endswith("/artifacts/model/model.safetensors") for key in stored)
    assert any(key.endswith("/artifacts/reports/metrics.json") for key in stored)
    assert not (registered / "mlartifacts").exists() and not (registered / "mlruns.db").exists()

    # A fresh process with only the tracking URI loads models:/tiny-model@champion: the merged weights.
    probe = subprocess.run([sys.executable, "-c", PROBE, MODEL], cwd=registered, env=tracked_env(state.tracking_uri),
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    loaded = json.loads(probe.stdout.strip().splitlines()[-1])
    assert loaded["version"] == "1" and loaded["same"]
    merged = safetensors.torch.load_file(registered / "models" / "adapter" / "merged" / "model.safetensors")
    assert set(merged) <= set(loaded["sums"])
    for name, tensor in merged.items():
        assert loaded["sums"][name] == pytest.approx(float(tensor.double().sum()), rel=1e-6, abs=1e-6), name


@pytest.mark.slow
def test_compare_view_screenshot_works_against_the_stack(stack, registered, tmp_path, monkeypatch):
    """scripts/mlflow_screenshot opens the stack's own MLflow UI (no server of its own) on the
    candidates registered there."""
    from scripts.mlflow_screenshot import run

    state, _ = stack
    monkeypatch.setenv("MLFLOW_TRACKING_URI", state.tracking_uri)
    registration = json.loads((registered / "reports" / "registration.json").read_text())
    out = tmp_path / "compare.png"
    result = run(project_dir=registered, out=out, experiment=registration["experiment"])
    assert result["url"].startswith(f"{state.tracking_uri}/#/compare-runs")
    assert result["runs"] == {"base": registration["base_run_id"], "fewshot": registration["fewshot_run_id"],
                              "finetuned": registration["finetuned_run_id"]}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["metrics_shown"] == ["bleu", "rougeL", "perplexity"]


@pytest.mark.slow
def test_restart_keeps_everything_and_a_stack_that_is_down_fails_in_one_line(stack, registered):
    from mlflow import MlflowClient

    state, _ = stack
    uri = state.tracking_uri
    big = bytes(range(256)) * (9 * 4096)  # 9 MiB: over boto3's 8 MB multipart threshold
    team.s3_client(state).put_object(Bucket=team.DVC_BUCKET, Key="big/object", Body=big)
    before, objects = registry_view(uri), s3_objects(state)
    procs = server_processes(state)

    stopped = stack_cli("stop", "--dir", str(state.dir))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not alive(procs)
    down = one_error_line(stack_cli("status", "--dir", str(state.dir)))
    assert down == (f"error: team stack in {state.dir}: postgres, s3, mlflow not running; "
                    f"start it with: python -m services.stack start --dir {state.dir}")
    started = time.monotonic()
    register = subprocess.run([sys.executable, "-m", "stages.register"], cwd=registered, env=tracked_env(uri),
                              capture_output=True, text=True, timeout=300)
    assert time.monotonic() - started < 60  # MLflow's HTTP retries are bounded (ftpipe.tracking)
    assert one_error_line(register) == (f"error: MLflow tracking server {uri} unreachable or failing "
                                        f"(reading {MODEL}@champion: Connection refused)")

    restarted = stack_cli("start", "--dir", str(state.dir), "--workers", "1")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert team.load(state.dir).ports == state.ports
    assert registry_view(uri) == before
    after = s3_objects(state)
    assert {bucket: set(keys) for bucket, keys in after.items()} == {bucket: set(keys) for bucket, keys in objects.items()}
    # The same bytes (a multipart upload's ETag depends on its part size, so the big object is read back).
    assert all(after[bucket][key] == etag for bucket, keys in objects.items() for key, etag in keys.items()
               if "-" not in after[bucket][key])
    assert team.s3_client(state).get_object(Bucket=team.DVC_BUCKET, Key="big/object")["Body"].read() == big
    run_id = MlflowClient(uri).get_model_version(MODEL, "1").run_id
    parent = MlflowClient(uri).get_run(run_id).data.tags["mlflow.parentRunId"]
    metrics_file = MlflowClient(uri).download_artifacts(parent, "reports/metrics.json", str(registered / "back"))
    assert Path(metrics_file).read_text() == (registered / "reports" / "metrics.json").read_text()
    # The S3 copy on disk is complete: the next save copies nothing.
    assert stack_cli("save", "--dir", str(state.dir)).stdout.strip().endswith("(0 copied now)")


@pytest.mark.slow
def test_dvc_remote_on_the_stack_round_trips_through_a_clone(stack, built_project, tmp_path):
    from flows.retrain import dvc_push
    from ftpipe.errors import PipelineError

    state, _ = stack
    proj = Path(shutil.copytree(built_project, tmp_path / "project", symlinks=True))
    remote = stack_cli("remote", "--dir", str(state.dir), "--project", str(proj))
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert team.S3_SECRET_KEY not in (proj / ".dvc" / "config").read_text()
    assert team.S3_SECRET_KEY in (proj / ".dvc" / "config.local").read_text()
    assert dvc_push(proj).endswith(" files pushed")
    assert any(key.startswith("files/md5/") for key in s3_objects(state)[team.DVC_BUCKET])
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    for command in (git + ["add", "-A"], git + ["commit", "-q", "-m", "a run"],
                    ["git", "clone", "-q", str(proj), str(tmp_path / "clone")]):
        subprocess.run(command, cwd=proj, check=True, capture_output=True)
    clone = tmp_path / "clone"
    assert "config.local" not in subprocess.run(["git", "ls-files", ".dvc"], cwd=proj, capture_output=True,
                                                text=True).stdout

    def dvc(project: Path, *args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=stage_env(),
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    assert stack_cli("remote", "--dir", str(state.dir), "--project", str(clone)).returncode == 0  # its credentials
    dvc(clone, "pull")
    assert dvc(clone, "status").strip() == "Data and pipelines are up to date."
    assert "Running stage" not in dvc(clone, "repro")
    assert dvc(clone, "metrics", "show", "--json") == dvc(proj, "metrics", "show", "--json")

    dead = free_ports(1)[0]
    dvc(clone, "remote", "modify", "--local", "stack", "endpointurl", f"http://127.0.0.1:{dead}")
    with pytest.raises(PipelineError) as failed:
        dvc_push(clone)
    message = str(failed.value)
    assert message.startswith("dvc push to remote 'stack' failed: ") and f"127.0.0.1:{dead}" in message
    assert "\n" not in message


def test_postgres_uri_that_refuses_stops_start_before_anything_runs(tmp_path):
    secret = "hunter2-not-printed"
    dead, s3, mlflow = free_ports(3)
    result = stack_cli("start", "--dir", str(tmp_path / "stack"), "--s3-port", str(s3), "--mlflow-port", str(mlflow),
                       "--postgres-uri", f"postgresql://mlflow:{secret}@127.0.0.1:{dead}/mlflow")
    line = one_error_line(result)
    assert line.startswith(f"error: PostgreSQL --postgres-uri postgresql://***@127.0.0.1:{dead}/mlflow refused the "
                           f"connection: connection to server at \"127.0.0.1\", port {dead} failed: Connection refused")
    assert secret not in result.stdout + result.stderr
    assert team.load(tmp_path / "stack") is None  # refused before anything was started or recorded
    assert one_error_line(stack_cli("status", "--dir", str(tmp_path / "none"))) == (
        f"error: no team stack in {tmp_path / 'none'} (stack.json missing): start one with: "
        f"python -m services.stack start --dir {tmp_path / 'none'}")
