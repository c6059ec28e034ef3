"""Off the happy path through `dvc repro` and the flows: bad params stop before DVC touches any
output, a signal stops the whole process tree and keeps the previous results, a new tracking store
gets its registration, and credentials never reach the output or Prefect's database. Flows that a
test does not run under Prefect's temporary server use the session's one (conftest's prefect_server)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import dvc, prefect_files, set_param, stage, stage_env

SECRET, TOKEN = "s3cret-pw", "tok123secret"


def outputs(proj: Path) -> dict[str, bytes]:
    """Every stage output's bytes, by path."""
    files = {}
    for folder in ("models", "data/prepared", "reports"):
        for path in sorted((proj / folder).rglob("*")):
            if path.is_file():
                files[str(path.relative_to(proj))] = path.read_bytes()
    return files


def leftovers(proj: Path) -> list[str]:
    return [str(p) for folder in ("models", "data", "reports") for p in (proj / folder).glob(".*.tmp-*")]


def flow_env(tmp_path: Path, server=None, **extra: str) -> dict[str, str]:
    """A flow process with its own Prefect home: without `server` (conftest's prefect_server) it starts
    Prefect's temporary server, whose database lives there (tests that run such a flow ask for the
    `prefect_home` fixture, a migrated copy in that place)."""
    env = {**stage_env(), "PREFECT_HOME": str(tmp_path / "prefect-home"), **extra}
    env.pop("PREFECT_API_URL", None)
    if server is not None:
        env["PREFECT_API_URL"] = server.url
    return env


def run_flow(proj: Path, tmp_path: Path, server=None, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.pipeline", "--project-dir", str(proj)], cwd=proj,
                          env=flow_env(tmp_path, server, **extra), capture_output=True, text=True, timeout=600)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_rejected_params_keep_every_previous_result(finished_project, tmp_path, prefect_home):
    proj = finished_project
    before = outputs(proj)
    assert "models/adapter/adapter_model.safetensors" in before and "reports/loss.png" in before

    # A bad value: DVC runs the validate stage first, which stops the run before train is touched.
    text = (proj / "params.yaml").read_text()
    (proj / "params.yaml").write_text(text.replace("learning_rate: 0.005", "learning_rate: -0.005"))
    rejected = dvc(proj, "repro", "train")
    assert rejected.returncode != 0 and "Running stage 'train'" not in rejected.stdout
    assert re.search(r"error: params.yaml:\d+: train.learning_rate: Input should be greater than 0",
                     rejected.stderr), rejected.stderr[-2000:]
    assert outputs(proj) == before

    # A mistyped key that no stage lists: DVC alone would report "didn't change, skipping".
    (proj / "params.yaml").write_text(text.replace("  learning_rate: 0.005", "  learning_rat: 0.005\n"
                                                   "  learning_rate: 0.005"))
    typo = dvc(proj, "repro")
    assert typo.returncode != 0
    line = (proj / "params.yaml").read_text().splitlines().index("  learning_rat: 0.005") + 1
    assert re.search(r"error: params.yaml:\d+: train.learning_rat: unknown key", typo.stderr), typo.stderr[-2000:]
    flow = run_flow(proj, tmp_path)
    assert flow.returncode == 2
    assert error_lines(flow.stderr) == [f"error: {proj / 'params.yaml'}:{line}: train.learning_rat: unknown key"]
    assert "Traceback" not in flow.stderr  # checked before Prefect starts: one line, nothing else
    assert "Running stage" not in flow.stdout + flow.stderr
    assert outputs(proj) == before

    # Fixed again: nothing downstream reruns (validate's output does not change with values).
    (proj / "params.yaml").write_text(text)
    again = dvc(proj, "repro")
    assert again.returncode == 0, again.stderr[-2000:]
    assert set(re.findall(r"Running stage '([a-z_]+)'", again.stdout)) <= {"validate"}
    assert outputs(proj) == before


def test_data_outside_the_landing_folder_is_refused(finished_project, tmp_path):
    proj = finished_project
    before = outputs(proj)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text((proj / "data" / "raw" / "tiny.jsonl").read_text())
    set_param(proj, "prepare_data", "path", str(outside))
    result = dvc(proj, "repro")
    assert result.returncode != 0
    assert "outside data/raw/" in result.stderr and "put the data under data/raw/" in result.stderr
    (proj / "data" / "raw" / "link.jsonl").symlink_to(outside)  # a link out of the project is no better
    set_param(proj, "prepare_data", "path", "data/raw/link.jsonl")
    assert "outside data/raw/" in dvc(proj, "repro").stderr
    assert outputs(proj) == before


def test_a_killed_writers_leftovers_are_swept_when_a_stage_starts(finished_project):
    proj = finished_project
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid whose process has ended
    stale = [proj / "models" / f".adapter.tmp-{gone.pid}", proj / "reports" / f".train.json.tmp-{gone.pid}"]
    stale[0].mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    stale[1].write_text("{")
    alive = proj / "models" / f".adapter.tmp-{os.getpid()}"  # a writer still at work is left alone
    alive.mkdir()
    assert stage(proj, "validate").returncode == 0
    assert not any(p.exists() for p in stale) and alive.is_dir()


def test_jsonl_with_a_byte_order_mark_reads(tmp_path):
    from ftpipe.io import read_jsonl

    path = tmp_path / "bom.jsonl"
    path.write_bytes('\ufeff{"prompt": "hi", "response": "hello"}\n{"prompt": "a", "response": "b"}\n'.encode())
    assert read_jsonl(path)[0] == {"prompt": "hi", "response": "hello"}


def test_pipeline_flow_registers_into_a_new_tracking_store(finished_project, tmp_path, prefect_server):
    """Outputs up to date, registry empty: register runs again instead of the flow reporting the
    old registration.json."""
    proj = finished_project
    store = f"sqlite:///{tmp_path / 'new-store.db'}"
    old = json.loads((proj / "reports" / "registration.json").read_text())
    result = run_flow(proj, tmp_path, prefect_server, MLFLOW_TRACKING_URI=store)
    assert result.returncode == 0, result.stderr[-3000:]
    registration = json.loads((proj / "reports" / "registration.json").read_text())
    assert registration["tracking_uri"] == store and registration["pipeline_run_id"] != old["pipeline_run_id"]
    import mlflow

    versions = mlflow.MlflowClient(store).search_model_versions("name = 'tiny-model'")
    assert [str(v.version) for v in versions] == ["1"]
    assert "Registered models:/tiny-model/1" in result.stdout
    # And again: the store now holds these outputs, so nothing is registered twice.
    assert run_flow(proj, tmp_path, prefect_server, MLFLOW_TRACKING_URI=store).returncode == 0
    assert len(mlflow.MlflowClient(store).search_model_versions("name = 'tiny-model'")) == 1


def test_credentials_in_the_tracking_uri_never_reach_output_or_prefect(finished_project, tmp_path, prefect_server):
    proj = finished_project
    uri = f"http://alice:{SECRET}@127.0.0.1:9/?token={TOKEN}"
    started = time.monotonic()
    result = run_flow(proj, tmp_path, prefect_server, MLFLOW_TRACKING_URI=uri)
    assert time.monotonic() - started < 240  # bounded MLflow retries, no retry of register by the flow
    assert result.returncode != 0
    printed = result.stdout + result.stderr
    assert SECRET not in printed and TOKEN not in printed
    assert "127.0.0.1:9" in error_lines(result.stderr)[-1]
    assert_no_secret_stored(tmp_path / "prefect-home", prefect_server.home)


def assert_no_secret_stored(*homes: Path) -> None:
    """Neither secret in any file of the Prefect homes: the flow's own and the server's (whose
    database holds every test's runs on this test process, this one's included)."""
    stored = prefect_files(*homes)
    assert any(p.name == "prefect.db" for p in stored)
    assert not any(SECRET.encode() in p.read_bytes() or TOKEN.encode() in p.read_bytes() for p in stored)


def descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def command(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
        return ""


def running(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_stops_the_flow_and_every_child_and_a_rerun_works(finished_project, tmp_path, prefect_home):
    import psutil

    proj = finished_project
    before = outputs(proj)
    text = (proj / "params.yaml").read_text()
    set_param(proj, "train", "max_steps", 100000)  # long enough to be stopped mid-training
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--project-dir", str(proj)], cwd=proj,
                            env=flow_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    names: dict[int, str] = {}

    def look() -> None:
        for child in descendants(flow.pid):
            seen.setdefault(child.pid, child)
            names[child.pid] = names.get(child.pid) or command(child)

    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and flow.poll() is None:
            look()
            if any("stages.train" in name for name in names.values()):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"train never started: {flow.communicate()[1][-3000:]}")
        time.sleep(3)  # into the training loop
        look()
        flow.send_signal(signal.SIGTERM)
        out, err = flow.communicate(timeout=120)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
    assert flow.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err
    assert any("uvicorn" in c for c in names.values()), names  # Prefect's temporary server
    assert any("dvc repro" in c for c in names.values()) and any("stages.train" in c for c in names.values())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(running(p) for p in seen.values()):
        time.sleep(0.5)
    assert not [names[pid] for pid, p in seen.items() if running(p)]
    assert outputs(proj) == before and not leftovers(proj)
    # The lock still describes the kept outputs: with the params back, only the (cheap) params
    # check is stale, since it last ran on the longer run's params.
    (proj / "params.yaml").write_text(text)
    status = dvc(proj, "status", "--json")
    assert status.returncode == 0 and set(json.loads(status.stdout)) <= {"validate"}, status.stdout
    rerun = dvc(proj, "repro")
    assert rerun.returncode == 0 and set(re.findall(r"Running stage '([a-z_]+)'", rerun.stdout)) <= {"validate"}
    assert outputs(proj) == before


def test_outputs_are_put_in_place_together_or_not_at_all(tmp_path):
    """A SIGTERM while a stage writes (a cancelled flow) leaves the previous outputs, all of them."""
    from ftpipe.errors import Terminated, terminate
    from ftpipe.io import all_or_nothing, atomic_dir, write_json, write_text

    report, model = tmp_path / "report.json", tmp_path / "model"
    report.write_text("old")
    model.mkdir()
    (model / "weights").write_text("old")
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(Terminated), all_or_nothing():
            with atomic_dir(model) as tmp:
                (tmp / "weights").write_text("new")
            write_json(report, {"new": True})
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert report.read_text() == "old" and (model / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "report.json"]  # no temporary left
    with all_or_nothing():
        with atomic_dir(model) as tmp:
            (tmp / "weights").write_text("new")
        write_text(report, "new")
        assert report.read_text() == "old"  # nothing moves before the block ends
    assert report.read_text() == "new" and (model / "weights").read_text() == "new"


def test_a_signal_during_the_final_renames_waits_for_them(tmp_path, monkeypatch):
    """SIGTERM while the outputs are being put in place is delivered after the last one."""
    import ftpipe.io as io
    from ftpipe.errors import Terminated, terminate

    report, model = tmp_path / "report.json", tmp_path / "model"
    report.write_text("old")
    model.mkdir()
    put = io._put_in_place

    def put_then_signal(tmp, target):
        put(tmp, target)
        if io._staged is None and target == model:  # between the two renames of the commit
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(io, "_put_in_place", put_then_signal)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with pytest.raises(Terminated), io.all_or_nothing():
            with io.atomic_dir(model) as tmp:
                (tmp / "weights").write_text("new")
            io.write_text(report, "new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (model / "weights").read_text() == "new" and report.read_text() == "new"
    assert signal.getsignal(signal.SIGTERM) is previous


def test_credentials_never_reach_the_retraining_flows_output_or_prefect(finished_project, tmp_path, prefect_server):
    """The same through `flows.retrain`, whose registry read Prefect retries (and logs) as
    params.yaml retrain.registry_retry_delays_s says."""
    proj = finished_project
    set_param(proj, "retrain", "registry_retry_delays_s", [0.5, 1])  # two retries, no long waits
    uri = f"http://alice:{SECRET}@127.0.0.1:9/?token={TOKEN}"
    result = subprocess.run([sys.executable, "-m", "flows.retrain", "--project-dir", str(proj)], cwd=proj,
                            env=flow_env(tmp_path, prefect_server, MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    printed = result.stdout + result.stderr
    assert SECRET not in printed and TOKEN not in printed
    # Prefect retried the read as params.yaml says, logging each try.
    retries = re.findall(r"Retry (\d/\d) will start ([\d.]+) second", printed)
    assert [try_ for try_, _ in retries] == ["1/2", "2/2"], printed[-3000:]
    assert 0.3 < float(retries[0][1]) < 0.7 and 0.7 < float(retries[1][1]) < 1.3  # the delays, give or take jitter
    assert re.fullmatch(r"error: MLflow tracking server http://\*\*\*@127\.0\.0\.1:9/\?token=\*\*\* .*",
                        error_lines(result.stderr)[-1])
    assert_no_secret_stored(tmp_path / "prefect-home", prefect_server.home)
