"""What the flows share: running a DVC stage as a child process group (and as a Prefect task), its
failure, the whole params.yaml check before anything runs, the retry predicate, and the project lock.

A stage runs as `dvc repro --single-item <stage>` in a session of its own, so that stopping the flow
(SIGTERM from a cancelled Prefect run, Ctrl-C) stops DVC and the stage too instead of orphaning them;
the stage's own SIGTERM handler then removes its temporary outputs and keeps the previous ones.
One flow run at a time per project (project_lock): two would meet inside DVC, whose busy error is a
traceback and advice to delete the lock the other run holds.
A user error, or no Prefect API (prefect_api), ends a flow in one line, without Prefect's traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from prefect import get_run_logger, task

from ftpipe import paths
from ftpipe.credentials import redact
from ftpipe.errors import EXIT_USER_ERROR, PipelineError, terminate

STAGES = ("validate", "prepare_base", "prepare_data", "quantize", "prepare_prefs", "prepare_parent", "train", "dpo",
          "score_base", "evaluate", "export", "register")
# Hub downloads can fail transiently; compute stages fail for real. register is never rerun by a
# flow: a rerun could register a second version, and MLflow's HTTP layer already retries each
# request (ftpipe.tracking.bound_http_retries).
IO_BOUND = {"prepare_base": 2}
STOP_TIMEOUT_S = 60  # a stage saving a model on SIGTERM gets this long before SIGKILL
LOCK_FILE = Path(".dvc/tmp/flows.lock")  # .dvc/tmp is DVC's own git-ignored scratch folder
BUSY_EXIT = 75  # EX_TEMPFAIL: another run holds the project; try again later


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, detail: str):
        super().__init__(redact(f"stage '{stage}' failed (exit {returncode}): {detail}"))
        self.stage, self.returncode = stage, returncode


class ProjectBusy(RuntimeError):
    """Another run (a flow, a search) holds the project's lock."""

    returncode = BUSY_EXIT


# The first lines of the RuntimeErrors Prefect's client raises when it starts without an API to talk to.
_NO_API = "Failed to reach API at "
_NO_TEMPORARY_SERVER = "Timed out while attempting to connect to ephemeral Prefect API server"


@contextlib.contextmanager
def prefect_api() -> Iterator[None]:
    """Prefect's start-up failures (no API at PREFECT_API_URL, a temporary server that did not start)
    as one line (PipelineError, exit 2 like the other faults) rather than its traceback. At start they
    come before the flow's first task, so no stage has run."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    try:
        yield
    except RuntimeError as exc:
        if str(exc).startswith(_NO_API):
            raise PipelineError(f"PREFECT_API_URL={PREFECT_API_URL.value()}: the Prefect API does not answer; "
                                "start that server, or unset PREFECT_API_URL to run on a temporary one") from None
        if str(exc).startswith(_NO_TEMPORARY_SERVER):
            waited = PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
            raise PipelineError(f"Prefect's temporary server did not answer within {waited} s "
                                "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); raise it, or set "
                                "PREFECT_API_URL to a running server") from None
        raise


_held: set[Path] = set()  # the lock files this process holds


@contextlib.contextmanager
def project_lock(project_dir: Path, wait_s: float = 0, *, who: str | None = None,
                 on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the project's run lock, an fcntl lock that the kernel releases if the holder dies, waiting
    up to `wait_s` for it (`on_wait(line)` once when it starts waiting); ProjectBusy if still held.
    The lock file names the holder: `who` (default: this program's module), pid and start time.
    Reentrant in one process: a CLI takes it before Prefect starts, then the flow takes it again
    (as a deployment run, which calls the flow alone, must)."""
    path = (Path(project_dir) / LOCK_FILE).resolve()
    if path in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                running = f"another run of {project_dir} is running ({handle.read().strip() or 'holder unknown'})"
                if time.monotonic() >= deadline:
                    raise ProjectBusy(f"{running}; nothing was touched, try again when it ends") from None
                if on_wait:
                    on_wait(f"waiting up to {wait_s:g} s: {running}")
                    on_wait = None
                time.sleep(0.5)
        handle.truncate(0)
        handle.write(f"{who or _program()} pid {os.getpid()} since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC\n")
        handle.flush()
        _held.add(path)
        _drop_torn_rwlock(Path(project_dir))
        try:
            yield
        finally:
            _held.discard(path)
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _drop_torn_rwlock(project_dir: Path) -> None:
    """DVC rewrites its stage lock table (.dvc/tmp/rwlock) in place: a DVC killed while writing it (a
    stopped flow's trial) leaves it empty or cut, and every later `dvc` command fails on it. A table
    that is no JSON names no holder, and the project lock is held: it is removed (DVC starts anew)."""
    rwlock = project_dir / ".dvc" / "tmp" / "rwlock"
    try:
        json.loads(rwlock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        logging.getLogger(__name__).warning("%s was cut off by a stopped DVC command: removed", rwlock)
        rwlock.unlink(missing_ok=True)


def _program() -> str:
    """`flows.pipeline` for `python -m flows.pipeline`, else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec else Path(sys.argv[0]).name or "python"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def stage_env() -> dict[str, str]:
    # dvc.yaml says `python -m stages.X`: make `python` the interpreter running this flow.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def validate_project(project_dir: Path) -> None:
    """The check DVC's validate stage runs, in-process, before a flow starts any stage: a flow runs
    stages with --single-item, which would not run validate ahead of them."""
    from ftpipe.checks import check_params

    check_params(project_dir / paths.PARAMS, project_dir)


def dvc_repro(stage: str, project_dir: Path, force: bool = False) -> None:
    """Run one DVC stage (`force`: even if DVC finds it up to date), streaming its output; raise
    StageFailed with its last error line."""
    run_dvc(["repro", "--single-item", *(["--force"] if force else []), stage], project_dir, stage)


def run_dvc(args: list[str], project_dir: Path, stage: str, watch: Callable[[], None] | None = None) -> None:
    """`dvc <args>` in the project, streaming its output; StageFailed naming `stage` with its last
    error line. `watch` is called as output arrives and may raise to stop the run (the search's
    pruning). Any exception here (SIGTERM turned into one by Prefect, Ctrl-C, `watch`'s) stops
    DVC's process group before it propagates."""
    from ftpipe.processes import stop_group

    command = [sys.executable, "-m", "dvc", *args]
    proc = subprocess.Popen(command, cwd=project_dir, env=stage_env(), stderr=subprocess.PIPE,
                            start_new_session=True)
    tail = pending = b""
    try:
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            # Whole lines (or progress-bar updates) only, so no secret is split past the redaction.
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            _echo(pending[:cut])
            pending = pending[cut:]
            tail = (tail + chunk)[-8192:]
            if watch is not None:
                watch()
        _echo(pending)
        returncode = proc.wait()
    except BaseException:
        stop_group(proc, signal.SIGTERM, timeout=STOP_TIMEOUT_S)
        raise
    if returncode != 0:
        text = tail.decode("utf-8", "replace").replace("\r", "\n")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # The stage's own one-line error is the useful one; DVC's line carries the stage's exit code.
        ours = [ln for ln in lines if ln.startswith("error: ")]
        code = re.search(r"exited with (-?\d+)", text)
        detail = ours[-1][len("error: "):] if ours else (lines or ["no output"])[-1]
        raise StageFailed(stage, int(code.group(1)) if code else returncode, detail)


def _echo(data: bytes) -> None:
    if data:
        sys.stderr.buffer.write(redact(data.decode("utf-8", "replace")).encode())
        sys.stderr.flush()


def retry_unless(is_final: Callable[[BaseException], bool]):
    """A Prefect retry_condition_fn: retry a failed task unless `is_final(its exception)`."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except Exception as exc:
            return not is_final(exc)
        return False

    return condition


def is_user_error(exc: BaseException) -> bool:
    """Bad input: retrying cannot help."""
    return isinstance(exc, PipelineError) or (isinstance(exc, StageFailed) and exc.returncode == EXIT_USER_ERROR)


def is_expected(exc: BaseException) -> bool:
    """A failure that its one line explains: a user error, or the project busy."""
    return is_user_error(exc) or isinstance(exc, ProjectBusy)


class _NoTracebackForExpected(logging.Filter):
    """Prefect's engine logs a task's or flow's exception with its traceback ("Encountered exception
    during execution"): for an expected failure the message alone, as the CLI then prints it; a
    crash keeps its traceback. The flow run is Failed either way."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_expected(record.exc_info[1]):
            record.exc_info = record.exc_text = None
        return True


class _NoServerStopNotice(logging.Filter):
    """Prefect's temporary server says it stopped after the flow's last line (an error's, the
    summary's): housekeeping that every run does, which would leave the error one line above the end."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Stopping temporary server on ")


def quiet_prefect_logs() -> None:
    """Install both filters on the loggers that Prefect's engine and temporary server log with (once)."""
    for name, kind in (("prefect.flow_runs", _NoTracebackForExpected), ("prefect.task_runs", _NoTracebackForExpected),
                       ("prefect", _NoServerStopNotice)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())


quiet_prefect_logs()  # on import: the CLIs and the deployment runs (which import the flow module) alike


def error_exit(exc: BaseException) -> int:
    """Print a flow's failure as one line and return its exit code."""
    print(f"error: {' '.join(redact(str(exc)).split())}", file=sys.stderr)
    return getattr(exc, "returncode", EXIT_USER_ERROR) or 1


def install_sigterm() -> None:
    """SIGTERM raises instead of killing the flow outright, so the running stage's process group is
    stopped (dvc_repro) and Prefect's temporary server is shut down by its exit handler. Prefect
    installs its own handler of the same kind while a flow runs."""
    signal.signal(signal.SIGTERM, terminate)


def stopped(exc: BaseException) -> int:
    name = "SIGINT" if isinstance(exc, KeyboardInterrupt) else "SIGTERM"
    print(f"error: stopped by {name}; the running stage was stopped and kept its previous outputs",
          file=sys.stderr)
    return 128 + (signal.SIGINT if name == "SIGINT" else signal.SIGTERM)


LINEAGE_KEYS = ("data_md5", "base_model_md5", "adapter_md5", "dpo_md5")


def refresh_parent(stage: str, project_dir: Path) -> bool:
    """Whether the retraining flow forces `stage`: prepare_parent when training continues from the
    champion. DVC cannot see the registry, so a retraining (which runs only when data, params or
    code changed) reads today's champion; the same champion writes the same files. The pipeline
    flow does not force it, as `dvc repro` does not: after a promotion it would otherwise retrain
    from the new champion on every run."""
    from ftpipe.params import TrainParams, load_section

    return stage == "prepare_parent" and load_section("train", TrainParams, project_dir / paths.PARAMS).init_from == "champion"


def registry_behind(project_dir: Path) -> list[str]:
    """Why the registry does not hold the outputs dvc.lock records (empty: it does). DVC hashes
    files, not the registry, so a new or other MLFLOW_TRACKING_URI is invisible to it."""
    from ftpipe import registry, tracking
    from ftpipe.params import RegisterParams, load_section

    name = load_section("register", RegisterParams, project_dir / paths.PARAMS).model_name
    uri = tracking.tracking_uri(project_dir)
    latest = registry.latest_version(registry.connect(uri), name, LINEAGE_KEYS)
    if latest is None:
        return [f"no registered version of {name} at {redact(uri)}"]
    return lineage_differences(project_dir, latest)


def lineage_differences(project_dir: Path, latest: dict) -> list[str]:
    """How the registry's `latest` version (its lineage tags) differs from the model dvc.lock
    records (empty: it is that model)."""
    from ftpipe import tracking

    lock = tracking.lineage(project_dir, method="")
    return [f"dvc.lock {key} {lock[key]} differs from v{latest['version']}'s {latest['tags'][key]}"
            for key in LINEAGE_KEYS if lock[key] != latest["tags"][key]]


@task(task_run_name="dvc repro {stage}")
def run_stage(stage: str, project_dir: Path, force: bool = False) -> float:
    logger = get_run_logger()
    started = time.perf_counter()
    dvc_repro(stage, project_dir, force)
    elapsed = time.perf_counter() - started
    logger.info("stage %s done in %.1f s", stage, elapsed)
    return elapsed


def stage_task(stage: str):
    """The stage as a Prefect task: I/O-bound stages retried (never after bad input), others not."""
    retries = IO_BOUND.get(stage, 0)
    if not retries:
        return run_stage
    return run_stage.with_options(retries=retries, retry_delay_seconds=[5, 20, 60][:retries],
                                  retry_condition_fn=retry_unless(is_user_error))
