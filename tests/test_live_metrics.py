"""Live training metrics (ftpipe/live.py): the train stage logs its curves into a real MLflow server
on 127.0.0.1 while it trains, register adopts that run as the fine-tuned candidate, and a store that
is down costs one warning line, never the training.

The tests share one tiny project with its base model and data prepared (each copies it) and one
MLflow server; the stages run as their own processes, as DVC runs them.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import make_project, qa_rows, set_param, stage_env

from ftpipe.errors import PipelineError
from ftpipe.schemas import TrainReport

EXPERIMENT = "tiny-test"  # tiny_params' register.experiment
STEPS = 6  # tiny_params' train.max_steps, logged at every step (logging_steps 1), evaluated at 3 and 6
# The tiny model trains 6 steps in half a second: a run long enough for the test to see its history
# grow (a few seconds), evaluated twice.
LONG_STEPS, LONG_EVAL = 100, 50  # long enough for a flush (ftpipe.live.FLUSH_S) before the last step


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_model_dir, tiny_data) -> Path:
    """A tiny project with prepare_base and prepare_data run (their main(), in this process: here they
    only make the inputs) and live metrics turned on."""
    from stages import prepare_base, prepare_data

    proj = make_project(tmp_path_factory.mktemp("live") / "project", tiny_model_dir, tiny_data)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(proj)
        prepare_base.main()
        prepare_data.main()
    set_param(proj, "train", "live_metrics", True)
    return proj


@pytest.fixture
def proj(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "project", symlinks=True))


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> str:
    """`mlflow server` on 127.0.0.1 over a sqlite store of its own; its URL. Stopped after the module."""
    from scripts.mlflow_screenshot import mlflow_server

    folder = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server(f"sqlite:///{folder / 'server.db'}", str(folder / "artifacts")) as url:
        yield url


def run_stage(proj: Path, name: str, tracking_uri: str, log: Path, **env: str) -> subprocess.Popen:
    """`python -m stages.<name>` in `proj` against `tracking_uri`, its stdout and stderr into files."""
    env = {**stage_env(), "MLFLOW_TRACKING_URI": tracking_uri, **env}
    return subprocess.Popen([sys.executable, "-m", f"stages.{name}"], cwd=proj, env=env,
                            stdout=log.with_suffix(".out").open("w"), stderr=log.with_suffix(".err").open("w"))


def finished(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[str, str]:
    """(stdout, stderr) of a process started by run_stage, which must have succeeded."""
    code = proc.wait(timeout=timeout)
    out, err = log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text()
    assert code == 0, err[-3000:]
    return out, err


def live_train_run(client) -> str | None:
    """The id of the run the train stage is logging into, once it exists."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], "tags.`ftpipe.stage` = 'train'") if experiment else []
    return runs[0].info.run_id if runs else None


def watch_train_loss(client, proc: subprocess.Popen) -> tuple[str, list[int]]:
    """Poll the store while the stage runs: (the live run's id, the number of train_loss points seen
    at each poll before the process ended)."""
    run_id, seen = None, []
    while proc.poll() is None:
        run_id = run_id or live_train_run(client)
        if run_id:
            points = len(client.get_metric_history(run_id, "train_loss"))
            if proc.poll() is None:  # still training or writing its outputs when this was read
                seen.append(points)
        time.sleep(0.5)  # the stage sends every ftpipe.live.FLUSH_S (5 s)
    return run_id, seen


def test_train_logs_live_and_register_adopts_the_run(proj, server, tmp_path):
    from mlflow import MlflowClient

    client = MlflowClient(server)
    set_param(proj, "train", "max_steps", LONG_STEPS)
    set_param(proj, "train", "eval_steps", LONG_EVAL)
    train = run_stage(proj, "train", server, tmp_path / "train")
    run_id, seen = watch_train_loss(client, train)
    out, err = finished(train, tmp_path / "train")
    assert "live metrics off" not in err, err[-3000:]
    # The history grew while the stage ran: points arrived before its last step, not all at its end (a
    # flush every ftpipe.live.FLUSH_S).
    assert max(seen) >= 2 and any(0 < n < LONG_STEPS for n in seen), seen
    report = TrainReport.read(proj / "reports" / "train.json")
    assert report.live_run_id == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "train"
    history = {key: client.get_metric_history(run_id, key)
               for key in ("train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_per_s")}
    assert [m.step for m in history["train_loss"]] == list(range(1, LONG_STEPS + 1))
    assert [m.step for m in history["val_loss"]] == [LONG_EVAL, LONG_STEPS]
    losses = (proj / "reports" / "train_loss.csv").read_text().splitlines()[1:]
    assert [round(m.value, 6) for m in history["train_loss"]] == [float(line.split(",")[1]) for line in losses]
    for key in ("learning_rate", "grad_norm", "tokens_per_s"):
        assert [m.step for m in history[key]] == list(range(1, LONG_STEPS + 1)), key
    assert all(m.value > 0 for m in history["tokens_per_s"])
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's own system metrics

    for name in ("score_base", "evaluate", "register"):
        step = run_stage(proj, name, server, tmp_path / name)
        finished(step, tmp_path / name)
    registration = json.loads((proj / "reports" / "registration.json").read_text())
    assert registration["finetuned_run_id"] == run_id  # adopted, not a new run
    adopted = client.get_run(run_id)
    assert adopted.info.run_name == "finetuned" and adopted.info.status == "FINISHED"
    assert adopted.data.tags["mlflow.parentRunId"] == registration["pipeline_run_id"]
    assert adopted.data.tags["role"] == "candidate" and "rougeL" in adopted.data.metrics
    # The curves are the live ones, not logged a second time from reports/.
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == list(range(1, LONG_STEPS + 1))
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [LONG_EVAL, LONG_STEPS]
    version = client.get_model_version("tiny-model", registration["version"])
    assert version.run_id == run_id

    # Register again on the same training: the run is taken, so a new one gets the curves from reports/.
    again = run_stage(proj, "register", server, tmp_path / "again")
    out, _ = finished(again, tmp_path / "again")
    second = json.loads((proj / "reports" / "registration.json").read_text())
    assert second["finetuned_run_id"] != run_id
    assert [m.step for m in client.get_metric_history(second["finetuned_run_id"], "train_loss")] == list(
        range(1, LONG_STEPS + 1))
    assert "live run" not in out  # taken is not gone: no note


def test_a_live_run_that_is_gone_is_one_note_and_a_fault_is_an_error(server, capsys):
    """register's adoption check: a run that does not exist is said in a line and not adopted; a
    store that does not answer is the stage's usual one-line error, not "nothing there"."""
    from mlflow import MlflowClient

    from ftpipe import registry
    from stages import register

    client = MlflowClient(server)
    experiment = client.get_experiment_by_name("gone-test") or client.get_experiment(
        client.create_experiment("gone-test"))
    missing = "0" * 32
    assert register._adoptable(client, experiment.experiment_id, missing, "train") is False
    assert capsys.readouterr().out == (f"register: train's live run {missing} is gone from this experiment: "
                                       "the curves go into a new run\n")
    fresh = client.create_run(experiment.experiment_id).info.run_id
    assert register._adoptable(client, experiment.experiment_id, fresh, "train") is True
    client.delete_run(fresh)
    assert register._adoptable(client, experiment.experiment_id, fresh, "train") is False

    down = f"http://127.0.0.1:{closed_port()}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        with pytest.raises(PipelineError, match="unreachable or failing"), registry.errors(down, "registering"):
            register._adoptable(MlflowClient(down), experiment.experiment_id, fresh, "train")


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("down", ["refused", "silent"])
def test_a_store_that_is_down_costs_one_warning_line_and_training_goes_on(proj, tmp_path, down):
    """refused: nothing listens on the port. silent: a socket that takes connections and never answers,
    with MLflow's HTTP timeout at 120 s, so only the logger's own bounded wait ends the stage in time."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel's queue; nobody reads them
        port = closed_port() if down == "refused" else silent.getsockname()[1]
        started = time.monotonic()
        env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "120"} if down == "silent" else {}
        train = run_stage(proj, "train", f"http://alice:s3cret@127.0.0.1:{port}/", tmp_path / "train", **env)
        out, err = finished(train, tmp_path / "train")
    assert time.monotonic() - started < 90
    reason = "Connection refused" if down == "refused" else "no answer within 5 s"
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warnings == [f"warning: live metrics off: MLflow tracking store http://***@127.0.0.1:{port}/ unreachable "
                        f"or failing ({reason}); training goes on, and register logs the curves from reports/"], err[-3000:]
    assert "s3cret" not in out + err and "Traceback" not in err
    report = TrainReport.read(proj / "reports" / "train.json")
    assert report.live_run_id is None and report.steps == STEPS


def test_dpo_logs_its_curves_live_and_register_would_adopt_both_runs(server, tmp_path, tiny_model_dir, monkeypatch):
    """The dpo stage in this process (DPO from the base on a few pairs) against the server: the DPO
    losses and validation rewards under the names register gives them, the test pairs' scores kept
    off the validation curves; register maps the SFT and DPO live runs to its `sft` and `dpo` runs."""
    from mlflow import MlflowClient
    from test_dpo import pairs_file, prepared

    from ftpipe import live
    from ftpipe.params import DpoParams, PrepareDataParams, PreparePrefsParams
    from ftpipe.tracking import HTTP_DEFAULTS
    from stages import dpo, prepare_prefs, register

    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    for name, value in HTTP_DEFAULTS.items():  # the logger sets them: undone after the test
        monkeypatch.setenv(name, value)
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    pairs_file(raw / "prefs.jsonl", qa_rows(40))
    prepare_prefs.run(params=PreparePrefsParams(source="file", path="data/raw/prefs.jsonl"),
                      data=PrepareDataParams(source="file", path="x"), enabled=True, base_dir=tiny_model_dir,
                      prepared_dir=prepared(tmp_path / "prepared"), out_dir=tmp_path / "prefs",
                      report_path=tmp_path / "preferences.json", project_dir=tmp_path)
    params = DpoParams(enabled=True, init_from="base", max_steps=4, batch_size=4, eval_steps=2, logging_steps=1,
                       max_length=64, precision="fp32")
    report = dpo.run(params=params, base_dir=tiny_model_dir, adapter_dir=tmp_path / "none", prefs_dir=tmp_path / "prefs",
                     out_dir=tmp_path / "dpo", report_path=tmp_path / "dpo.json",
                     live_to=live.Target(tmp_path, "dpo-live"), checkpoint_root=tmp_path / "checkpoints")
    client = MlflowClient(server)
    run = client.get_run(report.live_run_id)
    assert run.info.run_name == "dpo" and run.info.status == "FINISHED"
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert history("dpo_train_loss") == [(p["step"], pytest.approx(p["loss"])) for p in report.train_curve]
    for key in ("loss", "reward_accuracy", "reward_margin"):  # the validation pairs only, not the test pairs
        assert history(f"dpo_val_{key}") == [(v["step"], pytest.approx(v[key])) for v in report.val_curve], key
    for key in ("dpo_learning_rate", "dpo_grad_norm", "dpo_tokens_per_s"):
        assert [step for step, _ in history(key)] == [1, 2, 3, 4], key
    assert all(value > 0 for _, value in history("dpo_tokens_per_s"))  # from TRL's own token count

    sft = client.create_run(run.info.experiment_id).info.run_id
    reports = SimpleNamespace(train=SimpleNamespace(live_run_id=sft), dpo=report)
    assert register._live_runs(client, run.info.experiment_id, reports) == {"sft": sft, "dpo": run.info.run_id}


class Sent:
    """What a callback hands to its LiveRun (the callback's side only; the store is the other tests')."""

    def __init__(self) -> None:
        self.logged, self.failures = [], []

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, metrics))

    def fail(self, exc: BaseException) -> None:
        self.failures.append(exc)


def test_a_resumed_run_sends_the_steps_before_its_checkpoint_and_speed_counts_step_time_only():
    from transformers import TrainerControl, TrainerState

    from ftpipe.callbacks import TRAIN_KEYS, live_metrics_callback

    sent = Sent()
    callback = live_metrics_callback(sent, keys=TRAIN_KEYS, tokens_per_epoch=1000)
    restored = [{"loss": 2.0, "grad_norm": 1.5, "learning_rate": 1e-3, "epoch": 0.25, "step": 2},
                {"eval_loss": 2.5, "eval_runtime": 0.1, "epoch": 0.25, "step": 2}]
    state, control = TrainerState(epoch=0.25, global_step=2, log_history=restored), TrainerControl()
    callback.on_train_begin(None, state, control)
    assert sent.logged == [(2, {"train_loss": 2.0, "learning_rate": 1e-3, "grad_norm": 1.5}), (2, {"val_loss": 2.5})]
    callback.on_step_begin(None, state, control)
    time.sleep(0.05)
    callback.on_step_end(None, state, control)
    time.sleep(1.0)  # between steps (evaluating, saving): not training time
    state.epoch, state.global_step = 0.5, 3
    callback.on_log(None, state, control, logs={"loss": 1.0, "learning_rate": 5e-4, "grad_norm": None, "epoch": 0.5})
    step, values = sent.logged[-1]
    assert step == 3 and set(values) == {"train_loss", "learning_rate", "tokens_per_s"}
    # 0.25 epoch of 1000 tokens in about 0.05 s of steps: 5000 tokens/s; with the pause, under 250.
    assert 250 < values["tokens_per_s"] <= 250 / 0.05
    callback.on_log(None, state, control, logs={"loss": "not a number"})
    assert [type(exc) for exc in sent.failures] == [ValueError]  # handed to the run, not raised into training
