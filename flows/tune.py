"""Hyperparameter search: an Optuna study over train params whose trials are DVC experiments and MLflow runs.

A trial is `dvc exp run train -S train.<key>=<value> ... --name <study>-<n>`, judged by its final validation loss
(the test split is left to the gate): trial 0 is the train section as it stands, the rest Optuna's seeded TPE over
`tune.space`; `tune.prune` stops clearly worse trials early. The study (.dvc/tmp/tune/<study>.db) resumes after a
kill. The best trial is applied (`dvc exp apply`) and the pipeline flow evaluates, registers and gates it.
Run: python -m flows.tune [--trials N] [--project-dir DIR] [--wait S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.exceptions import TerminationSignal

from flows.common import (
    STAGES,
    ProjectBusy,
    StageFailed,
    error_exit,
    install_sigterm,
    prefect_api,
    project_lock,
    registry_behind,
    run_dvc,
    say,
    stage_task,
    stopped,
    validate_project,
)
from ftpipe import paths
from ftpipe.errors import PipelineError, Terminated

STUDY_DIR = Path(".dvc/tmp/tune")
MAX_FAILED_IN_A_ROW = 3  # trials that fail one after another: the search itself is broken
WATCH_S = 5.0  # how often a running trial's live validation losses are read for pruning
FINISHED = ("COMPLETE", "PRUNED")  # trial states that count toward tune.trials


class Pruning:
    """Called while a trial's `dvc exp run` prints: every WATCH_S seconds the validation losses the
    train stage has logged so far into its live MLflow run (tagged with the trial's DVC experiment)
    go to Optuna, and optuna.TrialPruned is raised when its pruner says the trial is clearly worse
    than the finished ones at the same step. A store that cannot be read only means no pruning (the
    trial's own result does not depend on it): one warning line."""

    def __init__(self, client, experiment_id: str, trial, experiment: str) -> None:
        self.client, self.experiment_id, self.trial, self.experiment = client, experiment_id, trial, experiment
        self.run_id: str | None = None
        self.seen: dict[int, float] = {}
        self.next_read = 0.0

    def __call__(self) -> None:
        import time

        import optuna

        if time.monotonic() < self.next_read:
            return
        self.next_read = time.monotonic() + WATCH_S
        if not self.read():
            return
        if self.seen and self.trial.should_prune():
            step = max(self.seen)
            raise optuna.TrialPruned(f"val_loss {self.seen[step]:.4f} at step {step}, worse than the finished "
                                     "trials' median there")

    def read(self) -> bool:
        """Report the losses logged since the last read; False when the store cannot be read, after
        which this trial reads it no more (each failed read costs the store's timeout, while DVC's
        output waits)."""
        try:
            history = self._history()
        except Exception as exc:  # noqa: BLE001 - any store failure: no pruning, never a failed trial
            say(f"tune: warning: the live validation losses cannot be read ({type(exc).__name__}): "
                "no pruning for this trial")
            self.next_read = float("inf")
            return False
        for point in history:
            if point.step not in self.seen:
                self.seen[point.step] = point.value
                self.trial.report(point.value, point.step)
        return True

    def _history(self) -> list:
        from ftpipe.live import STAGE_TAG

        if self.run_id is None:
            found = [r for r in self.client.search_runs([self.experiment_id],
                                                        f"tags.dvc_experiment = '{self.experiment}'")
                     if r.data.tags.get(STAGE_TAG) == "train"]
            if not found:
                return []
            self.run_id = found[0].info.run_id
        return self.client.get_metric_history(self.run_id, "val_loss")


def study_name(params_file: Path) -> str:
    """`tune-<hash>` of what a trial's result depends on besides its sampled values: the search (not
    its budget: more trials resume the same study), the other train params, the data and the base."""
    from ftpipe.params import PrepareBaseParams, PrepareDataParams, TrainParams, TuneParams, load_section

    search = load_section("tune", TuneParams, params_file)
    train = load_section("train", TrainParams, params_file).model_dump()
    fixed = {k: v for k, v in train.items() if f"train.{k}" not in search.space}
    key = json.dumps({"tune": search.model_dump(exclude={"trials", "prune"}), "train": fixed,
                      "data": load_section("prepare_data", PrepareDataParams, params_file).model_dump(),
                      "base": load_section("prepare_base", PrepareBaseParams, params_file).model_dump()},
                     sort_keys=True, default=str)
    return "tune-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's value of every searched key, drawn by Optuna from `space` (TuneParams.space)."""
    values = {}
    for key, spec in space.items():
        if spec.choices is not None:
            values[key] = trial.suggest_categorical(key, spec.choices)
        elif isinstance(spec.low, int) and isinstance(spec.high, int):
            values[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    return values


def current_values(space: dict[str, Any], train: dict[str, Any]) -> dict[str, Any] | None:
    """The train section's own values of the searched keys, when every one lies in its range."""
    values = {key: train[key.split(".", 1)[1]] for key in space}
    for key, spec in space.items():
        inside = (values[key] in spec.choices if spec.choices is not None
                  else spec.low <= values[key] <= spec.high)
        if not inside:
            return None
    return values


def _study(project_dir: Path, name: str, seed: int, prune: bool):
    import optuna
    from optuna.trial import TrialState

    folder = project_dir / STUDY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Judged against at least two trials' losses at a step: against one, the 8-trial search on the
    # default would have stopped its eventual best trial at its first evaluation (docs/benchmarks.md).
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=2, n_min_trials=2) if prune
              else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{folder / name}.db", direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner, load_if_exists=True)
    # One search per project at a time (the project lock): a trial still marked running was stopped.
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(stale._trial_id, state=TrialState.FAIL)
        say(f"tune: trial {stale.number} was stopped before it finished: marked failed")
    return study


def _mlflow_study_run(client, experiment_id: str, name: str) -> str:
    """The study's run (found again when a search resumes), or a new one."""
    found = client.search_runs([experiment_id], f"tags.tune_study = '{name}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=name, tags={"role": "study", "tune_study": name})
    return run.info.run_id


def _log_trial(client, experiment_id: str, parent: str, number: int, values: dict[str, Any],
               experiment: str, loss: float | None, status: str = "FINISHED") -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run = client.create_run(experiment_id, run_name=experiment,
                            tags={MLFLOW_PARENT_RUN_ID: parent, "role": "trial", "trial": str(number),
                                  "dvc_experiment": experiment})
    for key, value in values.items():
        client.log_param(run.info.run_id, key, value)
    if loss is not None:
        client.log_metric(run.info.run_id, "val_loss_final" if status == "FINISHED" else "val_loss_last", loss)
    client.set_terminated(run.info.run_id, status)


def _run_trial(project_dir: Path, experiment: str, values: dict[str, Any], watch: Pruning | None) -> float:
    """The trial as a DVC experiment of the train stage; its final validation loss."""
    from ftpipe.schemas import TrainReport

    sets = [arg for key, value in values.items() for arg in ("-S", f"{key}={value}")]
    run_dvc(["exp", "run", "train", *sets, "--name", experiment], project_dir, f"trial {experiment}", watch)
    report = TrainReport.read(project_dir / paths.TRAIN_REPORT)
    if report.val_loss_final is None:
        raise PipelineError(f"{experiment}: reports/train.json holds no validation loss (prepare_data.val_fraction 0?)")
    return report.val_loss_final


def trials_table(study) -> str:
    from optuna.trial import TrialState

    keys = sorted({k for t in study.trials for k in t.params})
    lines = ["| trial | DVC experiment | " + " | ".join(keys) + " | val_loss_final |",
             "|---:|---|" + "---:|" * (len(keys) + 1)]
    best = study.best_trial.number if any(t.state == TrialState.COMPLETE for t in study.trials) else None
    for t in study.trials:
        last = f" at {max(t.intermediate_values)}: {t.intermediate_values[max(t.intermediate_values)]:.4f}" \
            if t.intermediate_values and t.state == TrialState.PRUNED else ""
        loss = f"{t.value:.4f}" if t.state == TrialState.COMPLETE else t.state.name.lower() + last
        mark = " (best)" if t.number == best else ""
        lines.append(f"| {t.number}{mark} | {t.user_attrs.get('dvc_experiment', '')} | "
                     + " | ".join(f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, ""))
                                  for k in keys) + f" | {loss} |")
    return "\n".join(lines) + "\n"


@flow(name="finetune-tune", log_prints=True)
def tune(project_dir: Path = Path("."), trials: int | None = None) -> dict[str, Any]:
    """Trials until the study holds `trials` finished ones (default tune.trials), then the best one
    through the pipeline."""
    project_dir = Path(project_dir).resolve()
    with project_lock(project_dir, who="flows.tune"):
        return _tune_locked(project_dir, trials)


def _tune_locked(project_dir: Path, trials: int | None) -> dict[str, Any]:
    import mlflow
    import optuna
    from optuna.trial import TrialState
    from prefect.artifacts import create_markdown_artifact

    from ftpipe import registry, tracking
    from ftpipe.params import RegisterParams, TrainParams, TuneParams, load_section
    from ftpipe.schemas import RegistrationReport

    validate_project(project_dir)
    params_file = project_dir / paths.PARAMS
    tune_params = load_section("tune", TuneParams, params_file)
    train = load_section("train", TrainParams, params_file).model_dump()
    name = study_name(params_file)
    wanted = trials or tune_params.trials
    study = _study(project_dir, name, tune_params.seed, tune_params.prune)
    if not study.trials and (start := current_values(tune_params.space, train)):
        study.enqueue_trial(start)  # trial 0: the pipeline as configured
    uri = tracking.tracking_uri(tracking.project_root(project_dir))
    tracking.bound_http_retries()
    client = mlflow.MlflowClient(uri)
    experiment = load_section("register", RegisterParams, params_file).experiment
    with registry.errors(uri, "logging the search"):
        found = client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found else
                         client.create_experiment(experiment, artifact_location=tracking.artifact_location(project_dir)))
        parent = _mlflow_study_run(client, experiment_id, name)
    logger = get_run_logger()
    failed_in_a_row = 0
    counted = tuple(TrialState[state] for state in FINISHED)
    while len(study.get_trials(deepcopy=False, states=counted)) < wanted:
        trial = study.ask()
        values = suggest(trial, tune_params.space)
        dvc_name = f"{name}-{trial.number}"
        trial.set_user_attr("dvc_experiment", dvc_name)
        logger.info("trial %d: %s", trial.number, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                           for k, v in values.items()))
        watch = Pruning(client, experiment_id, trial, dvc_name) if tune_params.prune else None
        try:
            loss = _run_trial(project_dir, dvc_name, values, watch)
        except optuna.TrialPruned as exc:
            study.tell(trial, state=TrialState.PRUNED)
            say(f"tune: trial {trial.number} pruned: {exc}")
            last = watch.seen[max(watch.seen)] if watch and watch.seen else None
            with registry.errors(uri, "logging the search"):
                _log_trial(client, experiment_id, parent, trial.number, values, dvc_name, last, "KILLED")
            continue
        except StageFailed as exc:
            study.tell(trial, state=TrialState.FAIL)
            failed_in_a_row += 1
            say(f"tune: trial {trial.number} failed: {exc}")
            with registry.errors(uri, "logging the search"):
                _log_trial(client, experiment_id, parent, trial.number, values, dvc_name, None)
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                raise PipelineError(f"tune: {failed_in_a_row} trials failed in a row, the last: {exc}") from None
            continue
        failed_in_a_row = 0
        if watch is not None and watch.next_read != float("inf"):
            watch.read()  # the losses logged after the last read: later trials are pruned against them
        study.tell(trial, loss)
        with registry.errors(uri, "logging the search"):
            _log_trial(client, experiment_id, parent, trial.number, values, dvc_name, loss)
        logger.info("trial %d: val_loss_final %.4f (best so far %.4f, trial %d)", trial.number, loss,
                    study.best_value, study.best_trial.number)
    best = study.best_trial
    table = trials_table(study)
    with registry.errors(uri, "logging the search"):
        client.log_text(parent, table, "trials.md")
        client.log_metric(parent, "best_val_loss_final", best.value)
        client.set_tag(parent, "best_dvc_experiment", best.user_attrs["dvc_experiment"])
    say(f"tune: best trial {best.number} ({best.user_attrs['dvc_experiment']}), val_loss_final {best.value:.4f}: "
        "applied to the workspace, now through the pipeline and its gate")
    run_dvc(["exp", "apply", best.user_attrs["dvc_experiment"]], project_dir, "dvc exp apply")
    for stage in STAGES:  # the pipeline on the applied trial: what is up to date is skipped
        stage_task(stage)(stage, project_dir, force=stage == "register" and bool(registry_behind(project_dir)))
    registration = RegistrationReport.read(project_dir / paths.REGISTRATION)
    create_markdown_artifact(key="tune-trials", markdown=f"# Search {name}\n\n{table}",
                             description="Trials of the hyperparameter search and the one applied")
    return {"study": name, "best_trial": best.number, "best_experiment": best.user_attrs["dvc_experiment"],
            "best_params": best.params, "best_val_loss_final": best.value, "table": table,
            "registration": registration.model_dump(mode="json")}


def main(argv: list[str] | None = None) -> int:
    from ftpipe.promotion import gate_line
    from ftpipe.schemas import RegistrationReport

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=Path("."))
    parser.add_argument("--trials", type=int, default=None, help="finished trials to reach (default: tune.trials)")
    parser.add_argument("--wait", type=float, default=0, metavar="S",
                        help="seconds to wait for another run of the project to end (default: exit at once)")
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        parser.error("--trials: at least 1")
    install_sigterm()
    project_dir = args.project_dir.resolve()
    try:
        with project_lock(project_dir, args.wait, who="flows.tune", on_wait=say):
            validate_project(project_dir)
            with prefect_api():
                result = tune(project_dir=project_dir, trials=args.trials)
            print(result["table"])
            registration = RegistrationReport.model_validate(result["registration"])
            print(f"Registered {registration.model_uri} ({', '.join(registration.aliases)}) from trial "
                  f"{result['best_trial']}: {gate_line(registration)}")
    except (PipelineError, StageFailed, ProjectBusy) as exc:
        return error_exit(exc)
    except (TerminationSignal, Terminated, KeyboardInterrupt) as exc:
        return stopped(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
