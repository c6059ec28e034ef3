"""The hyperparameter search: trials as DVC experiments and MLflow runs, the best one applied and
registered through the gate, a stopped search resumed, and its params checked like every section."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import set_param, stage_env

from ftpipe.errors import PipelineError
from ftpipe.params import load_section

SPACE = {"train.learning_rate": {"low": 1e-3, "high": 2e-2, "log": True}, "train.lora_r": {"choices": [8, 16]}}


def tune_env(prefect_home: Path, server) -> dict[str, str]:
    """The search's processes talk to the session's Prefect server (conftest's prefect_server): each
    would otherwise start a temporary one (~6 s), and this test is not about that."""
    return {**stage_env(), "PREFECT_HOME": str(prefect_home), "PREFECT_API_URL": server.url}


def tune(proj: Path, env: dict[str, str], trials: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.tune", "--project-dir", str(proj), "--trials", str(trials)],
                          cwd=proj, env=env, capture_output=True, text=True, timeout=900)


def study(proj: Path):
    import optuna

    from flows.tune import STUDY_DIR, study_name

    name = study_name(proj / "params.yaml")
    return optuna.load_study(study_name=name, storage=f"sqlite:///{proj / STUDY_DIR / name}.db")


def finished(proj: Path) -> list:
    from optuna.trial import TrialState

    return study(proj).get_trials(states=(TrialState.COMPLETE,))


@pytest.mark.slow
def test_a_search_runs_trials_as_experiments_registers_the_best_and_resumes(finished_project, tmp_path,
                                                                           prefect_server):
    proj, env = finished_project, tune_env(tmp_path / "prefect-home", prefect_server)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    set_param(proj, "tune", "space", SPACE)

    first = tune(proj, env, 1)
    assert first.returncode == 0, first.stderr[-3000:]
    trials = finished(proj)
    assert len(trials) == 1
    # Trial 0 is the pipeline as configured; the sampler draws the next.
    assert trials[0].params == {"train.learning_rate": params["train"]["learning_rate"],
                                "train.lora_r": params["train"]["lora_r"]}

    # Resumed: only the missing trial runs.
    second = tune(proj, env, 2)
    assert second.returncode == 0, second.stderr[-3000:]
    trials = finished(proj)
    assert [t.number for t in trials] == [0, 1]
    assert trials[1].params != trials[0].params  # drawn by the sampler
    best = min(trials, key=lambda t: t.value)
    names = [t.user_attrs["dvc_experiment"] for t in trials]
    listed = subprocess.run([sys.executable, "-m", "dvc", "exp", "list", "--name-only"], cwd=proj, env=env,
                            capture_output=True, text=True).stdout.split()
    assert set(names) <= set(listed)
    # Each trial's own val loss is the objective.
    for trial in trials:
        assert trial.value > 0

    # The best trial is in the workspace and went through the gate.
    applied = yaml.safe_load((proj / "params.yaml").read_text())["train"]
    assert applied["learning_rate"] == pytest.approx(best.params["train.learning_rate"])
    assert applied["lora_r"] == best.params["train.lora_r"]
    train_report = json.loads((proj / "reports" / "train.json").read_text())
    assert train_report["val_loss_final"] == pytest.approx(best.value)
    registration = json.loads((proj / "reports" / "registration.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    tuned = client.get_run(registration["finetuned_run_id"])
    assert float(tuned.data.params["train.learning_rate"]) == pytest.approx(best.params["train.learning_rate"])
    assert f"from trial {best.number}" in second.stdout

    # In MLflow: the study's run, a nested run per trial with its params and objective.
    experiment = client.get_experiment_by_name(registration["experiment"])
    runs = client.search_runs([experiment.experiment_id], "tags.role = 'trial'")
    assert sorted(r.data.tags["dvc_experiment"] for r in runs if r.info.status == "FINISHED") == sorted(names)
    parent = client.search_runs([experiment.experiment_id], "tags.role = 'study'")
    assert len(parent) == 1 and {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent[0].info.run_id}
    by_name = {r.data.tags["dvc_experiment"]: r for r in runs}
    for trial in trials:
        run = by_name[trial.user_attrs["dvc_experiment"]]
        assert run.data.metrics["val_loss_final"] == pytest.approx(trial.value)
        assert float(run.data.params["train.learning_rate"]) == pytest.approx(trial.params["train.learning_rate"])
    assert parent[0].data.tags["best_dvc_experiment"] == best.user_attrs["dvc_experiment"]

    # Stopped while a trial runs: that trial is marked failed when the search resumes, then it finishes.
    proc = subprocess.Popen([sys.executable, "-m", "flows.tune", "--project-dir", str(proj), "--trials", "3"],
                            cwd=proj, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    from optuna.trial import TrialState

    deadline = time.monotonic() + 300
    while not study(proj).get_trials(states=(TrialState.RUNNING,)):
        assert proc.poll() is None and time.monotonic() < deadline, "no trial started"
        time.sleep(0.5)
    time.sleep(3)  # inside its dvc exp run
    proc.send_signal(signal.SIGTERM)  # as `kill` does: the flow stops DVC's process group, then exits
    try:
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert [t.state for t in study(proj).trials][-1] == TrialState.RUNNING
    resumed = tune(proj, env, 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trial 2 was stopped before it finished: marked failed" in resumed.stderr
    assert len(finished(proj)) == 3 and study(proj).trials[2].state == TrialState.FAIL


def test_the_search_space_names_train_keys_and_proper_ranges(tmp_path):
    path = tmp_path / "params.yaml"
    cases = [({"train.learning_rat": {"low": 1, "high": 2}}, r"tune.space: .*'train.learning_rat': the search tunes "
                                                             r"train params"),
             ({"train.learning_rate": {"low": 2e-3, "high": 1e-3}}, r"tune.space.train.learning_rate.high: must be "
                                                                    r"above low"),
             ({"train.learning_rate": {"low": 0, "high": 1e-3, "log": True}}, r"low: must be above 0 for a log"),
             ({"train.lora_r": {"choices": [8], "low": 1, "high": 2}}, r"choices: give choices, or low and high"),
             ({"train.lora_r": {"low": 1}}, r"low: give low and high")]
    from ftpipe.params import TuneParams

    for space, message in cases:
        path.write_text(yaml.safe_dump({"tune": {"trials": 2, "space": space}}))
        with pytest.raises(PipelineError, match=message):
            load_section("tune", TuneParams, path)


def test_the_study_is_the_same_for_more_trials_and_another_for_another_search(tmp_path):
    from flows.tune import study_name

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    path = tmp_path / "params.yaml"

    def name_with(section: str, key: str, value) -> str:
        changed = {**params, section: {**params[section], key: value}}
        path.write_text(yaml.safe_dump(changed, sort_keys=False))
        return study_name(path)

    first = name_with("tune", "trials", 8)
    assert name_with("tune", "trials", 12) == first and name_with("tune", "prune", False) == first
    assert name_with("train", "learning_rate", 5e-4) == first  # searched: a trial's value, not the study's
    assert name_with("tune", "seed", 1) != first
    assert name_with("train", "epochs", 2) != first and name_with("prepare_data", "seed", 7) != first


def test_trials_draw_integer_float_and_choice_values_and_start_from_the_current_params():
    import optuna

    from flows.tune import current_values, suggest
    from ftpipe.params import SearchRange

    space = {"train.learning_rate": SearchRange(low=1e-4, high=1e-2, log=True),
             "train.epochs": SearchRange(low=1, high=3), "train.lora_r": SearchRange(choices=[8, 16])}
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(5):
        values = suggest(study.ask(), space)
        assert 1e-4 <= values["train.learning_rate"] <= 1e-2 and isinstance(values["train.learning_rate"], float)
        assert values["train.epochs"] in (1, 2, 3) and isinstance(values["train.epochs"], int)
        assert values["train.lora_r"] in (8, 16)
    train = {"learning_rate": 1e-3, "epochs": 2, "lora_r": 16}
    assert current_values(space, train) == {"train.learning_rate": 1e-3, "train.epochs": 2, "train.lora_r": 16}
    assert current_values(space, {**train, "lora_r": 32}) is None  # outside the space: no trial 0 from it


def test_a_running_trial_worse_than_the_median_is_pruned_from_its_live_losses(tmp_path, capsys, monkeypatch):
    import optuna

    from flows.tune import Pruning
    from ftpipe.live import STAGE_TAG

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    experiment_id = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for losses in ([2.0, 1.5], [2.2, 1.7]):  # two finished trials, validated at steps 10 and 20
        done = study.ask()
        for step, loss in zip((10, 20), losses):
            done.report(loss, step)
        study.tell(done, losses[-1])

    def live_run(experiment: str, losses: list[float]) -> str:
        run = client.create_run(experiment_id, tags={"dvc_experiment": experiment, STAGE_TAG: "train"})
        for step, loss in zip((10, 20), losses):
            client.log_metric(run.info.run_id, "val_loss", loss, step=step)
        return run.info.run_id

    live_run("good", [1.9])
    good = Pruning(client, experiment_id, study.ask(), "good")
    good()  # below the median at step 10: goes on
    assert good.seen == {10: 1.9}
    live_run("bad", [3.0])
    bad = Pruning(client, experiment_id, study.ask(), "bad")
    with pytest.raises(optuna.TrialPruned, match="val_loss 3.0000 at step 10, worse than the finished"):
        bad()
    # Not yet logged: nothing to judge; a store that cannot be read: one warning, never a failure.
    waiting = Pruning(client, experiment_id, study.ask(), "not-started")
    waiting()
    assert waiting.seen == {} and waiting.run_id is None
    down = Pruning(mlflow.MlflowClient("http://127.0.0.1:9"), experiment_id, study.ask(), "x")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    down()
    down()  # a store that failed is not read again for this trial (each try costs its timeout)
    assert capsys.readouterr().err.count("no pruning for this trial") == 1 and down.next_read == float("inf")
