"""Scheduled retraining: rerun the pipeline only when its inputs changed, then gate and report.

Changed means `dvc status` finds a difference from dvc.lock, or dvc.lock differs from the latest registered
version's lineage tags; else a "no change" report and no training. A run: the DVC stages, register and gate, a
markdown report, then `dvc push` when a default DVC remote is set. One run at a time, per project
(flows.common.project_lock; a scheduled run finding it held reports "skipped") and per deployment.
Run once:  python -m flows.retrain [--project-dir DIR] [--data-path data/raw/train.jsonl] [--wait S]
Serve:     python -m flows.retrain --serve [--cron "0 3 * * *"]   (default cron: params.yaml retrain.cron)
Deploy:    python -m flows.retrain --deploy --pool POOL [--cron ...]   (README: "Orchestration")
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.exceptions import TerminationSignal

from flows.common import (
    IO_BOUND,
    LINEAGE_KEYS,
    STAGES,
    ProjectBusy,
    StageFailed,
    error_exit,
    install_sigterm,
    lineage_differences,
    prefect_api,
    project_lock,
    refresh_parent,
    retry_unless,
    say,
    stage_env,
    stage_task,
    stopped,
    validate_project,
)
from ftpipe import paths
from ftpipe.errors import PipelineError, Terminated
from ftpipe.paths import RAW_DIR  # a dep of prepare_data in dvc.yaml: DVC hashes whatever lands here
from ftpipe.summary import summarize

DEPLOYMENT = "scheduled-retrain"  # --serve and --deploy apply the same one: never two schedules


def use_data_path(project_dir: Path, data_path: str) -> bool:
    """Point prepare_data at `data_path` (a file under data/raw/); True if params.yaml changed."""
    from dvc.utils.serialize import modify_yaml

    relative = Path(os.path.normpath(data_path))  # data/raw/../x is not under data/raw
    if relative.is_absolute():
        with contextlib.suppress(ValueError):
            relative = relative.relative_to(project_dir)
    if relative.is_absolute() or RAW_DIR not in relative.parents:
        raise PipelineError(f"data path {data_path}: put the data under {RAW_DIR}/, where DVC hashes it")
    if not (project_dir / relative).is_file():
        raise PipelineError(f"data path {data_path}: file not found")
    with modify_yaml(project_dir / paths.PARAMS) as params:  # ruamel: keeps the file's comments
        section = params["prepare_data"]
        if section.get("source") == "file" and section.get("path") == str(relative):
            return False
        section["source"], section["path"] = "file", str(relative)
    return True


def dvc_status(project_dir: Path) -> dict[str, list[str]]:
    """{stage: [what changed]} for every stage whose deps, params or outs differ from dvc.lock."""

    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project_dir,
                          env=stage_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise PipelineError(f"dvc status failed: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    stale: dict[str, list[str]] = {}
    lock = _read_yaml(project_dir / paths.DVC_LOCK).get("stages", {})
    params = _read_yaml(project_dir / paths.PARAMS)
    for stage, entries in json.loads(proc.stdout or "{}").items():
        if stage.endswith(".dvc"):
            # A `dvc add`-ed file changed since its last `dvc add`: prepare_data's data/raw dep
            # already reports the change; the .dvc file is the user's to update.
            get_run_logger().warning("%s is out of date: run `dvc add` on its file to version the new data", stage)
            continue
        for entry in entries:
            if isinstance(entry, str):  # e.g. "changed command"
                stale.setdefault(stage, []).append(entry)
                continue
            for kind, changes in entry.items():
                for path, what in changes.items():
                    if isinstance(what, dict) and path == str(paths.PARAMS):
                        recorded = (lock.get(stage, {}).get("params") or {}).get(path) or {}
                        what = _changed_keys(what, recorded, params)
                    detail = ", ".join(f"{k} {v}" for k, v in what.items()) if isinstance(what, dict) else what
                    stale.setdefault(stage, []).append(f"{kind}: {path} {detail}")
    return stale


def _read_yaml(path: Path) -> dict[str, Any]:
    """As DVC reads it (YAML 1.2: `2e-5` is a number, as dvc.lock records it, not PyYAML's string)."""
    from ruamel.yaml import YAML

    return (YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def _changed_keys(what: dict[str, str], recorded: dict[str, Any], params: dict[str, Any]) -> dict[str, str]:
    """DVC names a stage's tracked section (`train modified`); the report names the keys in it that
    changed since dvc.lock (`train.learning_rate modified`)."""
    found: dict[str, str] = {}
    for key, status in what.items():
        old, new = recorded.get(key), params.get(key)
        if "." in key or not isinstance(old, dict) or not isinstance(new, dict):
            found[key] = status
            continue
        for name in sorted(old.keys() | new.keys()):
            if name not in new:
                found[f"{key}.{name}"] = "deleted"
            elif name not in old:
                found[f"{key}.{name}"] = "new"
            elif old[name] != new[name]:
                found[f"{key}.{name}"] = "modified"
        if not any(k.startswith(f"{key}.") for k in found):
            found[key] = status
    return found


def dvc_push(project_dir: Path) -> str | None:
    """`dvc push` to the project's default DVC remote, when one is set, so that another clone can
    `dvc pull` what the run made instead of running it again; what DVC said (None: no default remote,
    nothing pushed). A push that fails (the remote missing or unreachable) is one line naming the
    remote; what was registered stands, and the outputs stay in the local cache for a later push."""

    def dvc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project_dir, env=stage_env(),
                              capture_output=True, text=True)

    def reason(proc: subprocess.CompletedProcess) -> str:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        return next((ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR: ")), (lines or ["no output"])[-1])

    default = dvc("remote", "default")
    name = default.stdout.strip()
    if default.returncode != 0:
        if name == "No default remote set":
            return None
        raise PipelineError(f"DVC default remote of {project_dir}: {reason(default)}")
    pushed = dvc("push", "--remote", name)
    if pushed.returncode != 0:
        raise PipelineError(f"dvc push to remote '{name}' failed: {reason(pushed)}; the outputs stay in the "
                            "local cache: run `dvc push` once the remote is back")
    return f"'{name}': {(pushed.stdout.strip().splitlines() or ['done'])[-1]}"


def registry_state(project_dir: Path) -> dict[str, Any]:
    """The latest registered version's lineage tags and the champion's version and metrics."""
    from ftpipe import registry, tracking
    from ftpipe.params import RegisterParams, load_section

    name = load_section("register", RegisterParams, project_dir / paths.PARAMS).model_name
    client = registry.connect(tracking.tracking_uri(project_dir))
    latest = registry.latest_version(client, name, LINEAGE_KEYS)
    champion = registry.champion(client, name)
    return {"model_name": name, "latest": latest,
            "champion": champion and {"version": champion[0], "metrics": champion[1]}}


def _final(exc: BaseException) -> bool:
    from ftpipe.registry import RegistryUnreachable

    return isinstance(exc, PipelineError) and not isinstance(exc, RegistryUnreachable)


# A registry read is idempotent, so the flow may retry it (MLflow unreachable, a timeout); a bad
# input, or a champion whose run is gone, fails the same way again. The retries and their delays
# come from params.yaml retrain.registry_retry_delays_s (see _retrain_locked).
@task(retry_jitter_factor=0.2, retry_condition_fn=retry_unless(_final))
def detect_changes(project_dir: Path) -> dict[str, Any]:
    """What changed since the latest registered version (an empty `reasons` list: nothing)."""
    stale = dvc_status(project_dir)
    registry = registry_state(project_dir)
    reasons = [f"{stage}: {what}" for stage, items in stale.items() for what in items]
    latest = registry["latest"]
    if latest is None:
        reasons.append(f"no registered version of {registry['model_name']} yet")
    elif not stale:
        reasons += lineage_differences(project_dir, latest)
    get_run_logger().info("changes: %s", "; ".join(reasons) or "none")
    return {"reasons": reasons, **registry}


def _not_killed(exc: BaseException) -> bool:
    """Retry a compute stage only when a signal ended it (OOM killer, preemption): train resumes
    from its checkpoints; a stage that failed by itself would fail again."""
    killed = isinstance(exc, StageFailed) and (exc.returncode < 0 or exc.returncode in (137, 143))
    return not killed  # DVC or the shell report 128 + signal


def retrain_task(stage: str):
    """The pipeline's task for `stage`, with one retry of a compute stage a signal killed."""
    if stage in IO_BOUND or stage == "register":  # register is never rerun: it could register twice
        return stage_task(stage)
    return stage_task(stage).with_options(retries=1, retry_delay_seconds=10, retry_condition_fn=retry_unless(_not_killed))


@flow(name="scheduled-retrain", log_prints=True)
def retrain(project_dir: Path = Path("."), data_path: str | None = None, lock_wait_s: float = 0) -> dict[str, Any]:
    """Retrain, register and gate when the data, params or base model changed; else report no change."""
    from prefect.artifacts import create_markdown_artifact

    project_dir = Path(project_dir).resolve()
    try:  # main() holds it already; a deployment run takes it here
        with project_lock(project_dir, lock_wait_s, who="flows.retrain", on_wait=get_run_logger().info):
            return _retrain_locked(project_dir, data_path)
    except ProjectBusy as exc:
        get_run_logger().warning(str(exc))
        create_markdown_artifact(key="retrain-report", markdown=f"# Retraining skipped\n\n{exc}.\n",
                                 description="Scheduled retraining: what happened and why")
        return {"status": "busy", "message": str(exc)}


def _retrain_locked(project_dir: Path, data_path: str | None) -> dict[str, Any]:
    from prefect.artifacts import (
        create_markdown_artifact,
        create_progress_artifact,
        update_progress_artifact,
    )

    from flows.retrain_report import retrain_report, unchanged_report
    from ftpipe.params import RetrainParams, load_section

    logger = get_run_logger()
    if data_path and use_data_path(project_dir, data_path):
        logger.info("params.yaml: prepare_data now reads %s", data_path)
    validate_project(project_dir)  # before DVC touches anything; --single-item skips upstream stages
    delays = load_section("retrain", RetrainParams, project_dir / paths.PARAMS).registry_retry_delays_s
    change = detect_changes.with_options(retries=len(delays), retry_delay_seconds=delays or 0)(project_dir)
    if not change["reasons"]:
        markdown = unchanged_report(change)
        create_markdown_artifact(key="retrain-report", markdown=markdown,
                                 description="Scheduled retraining: what happened and why")
        return {"status": "unchanged", "report": markdown, "latest_version": change["latest"]["version"]}
    progress = create_progress_artifact(0.0, key="retrain-progress", description="pipeline stages done")
    timings: dict[str, float] = {}
    for done, stage in enumerate(STAGES, start=1):
        # The registry behind the outputs the lock now records (a new MLflow store, a version
        # registered by an experiment): DVC would skip an up-to-date register, so it is forced.
        # Decided after the upstream stages ran, on the registry read above: a stale stage that
        # changes no output (validate after an edit of another params.yaml section) is no reason
        # to trust a registration.json written for another store.
        force = stage == "register" and (change["latest"] is None or bool(lineage_differences(project_dir, change["latest"])))
        force = force or refresh_parent(stage, project_dir)  # continual fine-tuning: from today's champion
        timings[stage] = retrain_task(stage)(stage, project_dir, force=force)
        update_progress_artifact(progress, 100.0 * done / len(STAGES), description=f"{stage} done")
    if pushed := dvc_push(project_dir):  # what the new version's lineage names, for any clone to pull
        logger.info("dvc push to %s", pushed)
    markdown, registration = retrain_report(project_dir, change, timings)
    summarize(project_dir, timings)
    create_markdown_artifact(key="retrain-report", markdown=markdown,
                             description="Scheduled retraining: what happened and why")
    create_markdown_artifact(key="data-report", description="Cleaning rules and train/eval leak checks",
                             markdown=(project_dir / paths.DATA_REPORT_MD).read_text(encoding="utf-8"))
    status = "promoted" if registration.promotion.promote else "challenger"
    logger.info("%s: %s", registration.model_uri, status)
    return {"status": status, "report": markdown, "registration": registration.model_dump(mode="json"), "timings_s": timings,
            "dvc_push": pushed}


def schedule(project_dir: Path, cron: str | None) -> str:
    """`cron`, or params.yaml retrain.cron when None, checked as a cron expression."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    from ftpipe.params import RetrainParams, load_section

    cron = cron or load_section("retrain", RetrainParams, project_dir / paths.PARAMS).cron
    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise PipelineError(f"cron '{cron}': not a valid cron expression") from None
    return cron


def serve(*, project_dir: Path, cron: str | None, data_path: str | None) -> None:
    """Serve `retrain` as a deployment on a cron schedule until interrupted."""
    project_dir = project_dir.resolve()
    retrain.serve(name=DEPLOYMENT, cron=schedule(project_dir, cron), limit=1,  # one run at a time on this runner
                  parameters={"project_dir": str(project_dir), "data_path": data_path})


def deploy(*, project_dir: Path, pool: str, cron: str | None, data_path: str | None) -> str:
    """Create or update the deployment of `retrain` on the Prefect API at PREFECT_API_URL for the
    work pool `pool`, its code loaded from `project_dir` by the pool's workers; return its id."""
    import httpx
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    project_dir = project_dir.resolve()
    cron = schedule(project_dir, cron)
    api = PREFECT_API_URL.value()
    if not api:  # Prefect would deploy to a temporary server that stops with this process
        raise PipelineError("PREFECT_API_URL is not set: --deploy needs a running Prefect server's API, "
                            "e.g. PREFECT_API_URL=http://127.0.0.1:4200/api")
    try:
        with get_client(sync_client=True) as client:
            client.read_work_pool(pool)  # before loading the flow: a missing pool fails in a second
        source = retrain.from_source(source=str(project_dir), entrypoint="flows/retrain.py:retrain")
        # What `.deploy()` does for a pool without an image (nothing built or pushed), less its
        # listing of the pool's workers, which sends null filters that the server rejects (HTTP 422)
        # with the pinned fastapi 0.154.
        deployment = source.to_deployment(name=DEPLOYMENT, work_pool_name=pool, cron=cron,
                                          concurrency_limit=1,  # one run at a time, whichever worker takes it
                                          parameters={"project_dir": str(project_dir), "data_path": data_path})
        return str(deployment.apply())
    except ObjectNotFound:
        raise PipelineError(f"--pool {pool}: no such work pool at PREFECT_API_URL={api} "
                            f"(create it: prefect work-pool create --type process {pool})") from None
    except httpx.HTTPStatusError as exc:
        raise PipelineError(f"PREFECT_API_URL={api}: the Prefect API refused the request "
                            f"(HTTP {exc.response.status_code} {exc.response.reason_phrase})") from None
    except httpx.HTTPError as exc:
        raise PipelineError(f"PREFECT_API_URL={api}: the Prefect API does not answer ({exc or type(exc).__name__})") from None


def main(argv: list[str] | None = None) -> int:

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=Path("."))
    parser.add_argument("--data-path", help=f"training data file under {RAW_DIR}/ (sets prepare_data.path)")
    parser.add_argument("--wait", type=float, default=0, metavar="S",
                        help="seconds to wait for another run of the project to end (default: exit at once)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--serve", action="store_true", help="serve as a deployment on a cron schedule")
    how.add_argument("--deploy", action="store_true",
                     help="create the deployment on PREFECT_API_URL for the work pool --pool, run by its workers")
    parser.add_argument("--pool", help="work pool for --deploy (prefect work-pool create --type process NAME)")
    parser.add_argument("--cron", help="cron schedule for --serve or --deploy (default: params.yaml retrain.cron)")
    args = parser.parse_args(argv)
    if args.deploy != bool(args.pool):
        parser.error("--deploy and --pool go together")
    install_sigterm()
    project_dir = args.project_dir.resolve()
    # A run now takes the project lock before Prefect starts (busy: one line, no start-up); a
    # scheduled run takes it in the flow.
    scheduling = args.serve or args.deploy
    lock = contextlib.nullcontext() if scheduling else project_lock(project_dir, args.wait, who="flows.retrain", on_wait=say)
    try:
        with lock, prefect_api():
            if not args.data_path:  # with one, the flow points params.yaml at it first, then checks
                validate_project(project_dir)
            if args.serve:
                serve(project_dir=args.project_dir, cron=args.cron, data_path=args.data_path)
                return 0
            if args.deploy:
                deployment_id = deploy(project_dir=args.project_dir, pool=args.pool, cron=args.cron,
                                       data_path=args.data_path)
                print(f"deployment {retrain.name}/{DEPLOYMENT} ({deployment_id}) on work pool {args.pool}; "
                      f"runs need a worker: prefect worker start --pool {args.pool}")
                return 0
            result = retrain(project_dir=project_dir, data_path=args.data_path)
    except (PipelineError, StageFailed, ProjectBusy) as exc:
        return error_exit(exc)
    except (TerminationSignal, Terminated, KeyboardInterrupt) as exc:
        return stopped(exc)
    print(result["report"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
