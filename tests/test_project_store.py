"""The project's MLflow store belongs to the project: DVC experiments run in temporary workspaces
record there (tagged with the experiment's name), and a copied project records into its own folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import register_in_process, set_param, stage_env

from ftpipe.errors import PipelineError

MODEL = "tiny-model"


def client(proj: Path):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")


def files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def dvc(proj: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=proj, env=stage_env(), capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_a_copied_project_registers_into_its_own_folder(finished_project, tmp_path, capsys):
    from ftpipe import tracking

    original = finished_project
    tracking.tracking_uri(original)  # the fixture is itself a copy: make its store its own first
    before = files(original / "mlartifacts")
    # A folder name with a space: the store records it percent-encoded (file:///.../second%20checkout).
    copy = Path(shutil.copytree(original, tmp_path / "second checkout", symlinks=True))
    registered = register_in_process(copy)
    assert f"recorded its artifacts in {original / 'mlartifacts'}" in capsys.readouterr().err
    tracking.tracking_uri(copy)
    assert "recorded its artifacts" not in capsys.readouterr().err  # its own now: said once
    assert files(original / "mlartifacts") == before  # nothing written into the original's folder
    store = client(copy)
    version = store.get_model_version(MODEL, registered["version"])
    assert store.get_run(version.run_id).info.artifact_uri.startswith((copy / "mlartifacts").as_uri())
    assert store.get_experiment_by_name("tiny-test").artifact_location.startswith((copy / "mlartifacts").as_uri())
    # The copy's earlier versions load from the copy's own files.
    uri = store.get_logged_model(store.get_model_version(MODEL, "1").source.removeprefix("models:/")).artifact_location
    assert uri.startswith((copy / "mlartifacts").as_uri())


def test_a_store_copied_without_its_artifacts_is_refused_naming_both_folders(finished_project, tmp_path):
    from ftpipe import tracking

    tracking.tracking_uri(finished_project)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "mlruns.db").write_bytes((finished_project / "mlruns.db").read_bytes())
    with pytest.raises(PipelineError, match=rf"^{lone / 'mlruns.db'}: its runs' artifacts are in "
                                            rf"{finished_project / 'mlartifacts'}, and this project \({lone}\) has no"):
        tracking.tracking_uri(lone)


def test_queued_experiments_register_in_the_project_store(finished_project):
    """The README's sweep: experiments queued, then run one after another in DVC's temporary
    workspaces; their runs and versions land in the project's store, tagged with their names. A
    training param reruns training and the tuned model's scoring, never the base model's."""
    proj = finished_project
    set_param(proj, "train", "max_steps", 2)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(git + ["add", "-A"], cwd=proj, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "finished run"], cwd=proj, check=True)
    before = {v.version for v in client(proj).search_model_versions(f"name = '{MODEL}'")}
    for lr in ("1e-3", "2e-3"):
        dvc(proj, "exp", "run", "--queue", "--name", f"lr-{lr}", "-S", f"train.learning_rate={lr}")
    swept = dvc(proj, "exp", "run", "--run-all").stdout  # each experiment's `dvc repro` output
    assert swept.count("Running stage 'train'") == swept.count("Running stage 'evaluate'") == 2, swept[-3000:]
    assert "Running stage 'score_base'" not in swept
    assert swept.count("Stage 'score_base' didn't change, skipping") == 2
    versions = [v for v in client(proj).search_model_versions(f"name = '{MODEL}'") if v.version not in before]
    assert sorted(v.tags.get("dvc_experiment") for v in versions) == ["lr-1e-3", "lr-2e-3"]
    for version in versions:
        run = client(proj).get_run(version.run_id)
        assert run.data.tags["dvc_experiment"] == version.tags["dvc_experiment"]
        assert run.info.artifact_uri.startswith((proj / "mlartifacts").as_uri())
    assert not list((proj / ".dvc" / "tmp").rglob("mlruns.db"))  # nothing recorded in a throw-away store


def test_dvc_root_names_the_project_only_from_one_of_its_experiment_workspaces(tmp_path, monkeypatch):
    from ftpipe.tracking import project_root

    project, other = tmp_path / "project", tmp_path / "other"
    for folder in (project, other):
        (folder / ".dvc").mkdir(parents=True)
    workspace = project / ".dvc" / "tmp" / "exps" / "tmpabc123"
    workspace.mkdir(parents=True)
    monkeypatch.setenv("DVC_ROOT", str(project))
    assert project_root(workspace) == project.resolve()  # a queued experiment records in its project
    assert project_root(project) == project.resolve()
    monkeypatch.setenv("DVC_ROOT", str(other))  # left in a shell, or another project's run
    assert project_root(project) == project.resolve()
    assert project_root(workspace) == workspace.resolve()
