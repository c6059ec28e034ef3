"""How a flow ends when it cannot do its work: a user error is its one line (no Prefect traceback),
so is a Prefect API that is not there, and a second run of the same project is turned away, or
waits, with one line naming the run it met."""

from __future__ import annotations

import contextlib
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import set_param, stage_env
from test_retrain import free_port
from test_worker import prefect_processes

from flows.common import BUSY_EXIT, LOCK_FILE, project_lock


def flow_env(tmp_path: Path) -> dict[str, str]:
    """A flow process with its own (migrated: `prefect_home`) Prefect home, as `make run` starts it."""
    env = {**stage_env(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    return env


def start_flow(project: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    """`python -m flows.pipeline` on `project`, stdout and stderr together (in the order printed)."""
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--project-dir", str(project), *args],
                            cwd=project, env=flow_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.strip()]


def truncated_base_model(project: Path, tmp_path: Path, tiny_model_dir: Path) -> Path:
    """Point prepare_base at a copy of the tiny model whose weights are cut in half: the stage stops
    with one line (exit 2)."""
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "truncated"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    set_param(project, "prepare_base", "path", str(folder))
    return folder


def flow_run_states(prefect_home: Path) -> list[str]:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run")]


def test_the_engine_log_of_a_user_error_has_no_traceback_and_a_crash_keeps_it():
    """What Prefect's engine logs when a task or the flow raises (`exc_info`): the traceback goes for
    a user error (a stage's exit 2, bad input, the project busy), the message stays; a crash (a stage
    killed, any other exception) keeps it."""
    import logging

    from flows.common import ProjectBusy, StageFailed
    from ftpipe.errors import PipelineError

    cases = {StageFailed("prepare_base", 2, "bad path"): False, PipelineError("params.yaml:3: bad"): False,
             ProjectBusy("another run"): False, StageFailed("train", 137, "killed"): True, KeyError("x"): True}
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        for exc, traceback in cases.items():
            try:
                raise exc
            except Exception:
                record = logger.makeRecord(name, logging.ERROR, __file__, 0, "Encountered exception: %r", (exc,),
                                           sys.exc_info())
            assert logger.filter(record) and record.getMessage() == f"Encountered exception: {exc!r}"
            assert (record.exc_info is not None, record.exc_text is not None) == (traceback, traceback), exc


def busy_line(project: Path, who: str, pid: int | None = None) -> str:
    """The one line (a regular expression) of a run turned away by `who`'s run."""
    pid_pattern = str(pid) if pid else r"\d+"
    return (rf"error: another run of {re.escape(str(project.resolve()))} is running \({re.escape(who)} pid {pid_pattern} since "
            r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC\); nothing was touched, try again when it ends")


def test_a_bad_base_model_through_the_flow_is_one_line_and_a_failed_run_and_a_second_flow_is_turned_away(
        project, tmp_path, tiny_model_dir, prefect_home):
    """One flow run with a bad base model (it ends in prepare_base by itself): its error is one line
    and a Failed flow run. While it runs, a second `python -m flows.pipeline` on the project exits 75
    naming the first, and touches nothing (DVC's own lock, and its advice to delete it, are never
    reached). One run serves both: each costs a flow process and Prefect's temporary server."""
    folder = truncated_base_model(project, tmp_path, tiny_model_dir)
    first = start_flow(project, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while f"flows.pipeline pid {first.pid} since" not in _read(project / LOCK_FILE):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.2)
        second = start_flow(project, tmp_path)
        output = second.communicate(timeout=120)[0]
        assert second.returncode == BUSY_EXIT, output
        assert re.fullmatch(busy_line(project, "flows.pipeline", first.pid), "\n".join(lines(output))), output
        assert "Traceback" not in output and "rwlock" not in output
        assert first.poll() is None, "the first run ended before the second met it: nothing was tested"
    finally:
        first_output = first.communicate(timeout=600)[0]
    # The first run was not disturbed: it stopped at the bad model, with one line.
    assert first.returncode == 2, first_output[-3000:]
    assert "rwlock" not in first_output
    assert _read(project / LOCK_FILE) == ""  # released, holder cleared
    assert "Traceback" not in first_output, first_output
    assert re.fullmatch(rf"error: stage 'prepare_base' failed \(exit 2\): {re.escape(str(folder))}: "
                        r"safetensors weights truncated or corrupt \(.+\)", lines(first_output)[-1]), first_output[-3000:]
    # Prefect still logs and records what happened: the engine's line, without its traceback, and a
    # Failed flow run (the one run: the second never reached Prefect).
    assert ("Encountered exception during execution: StageFailed(\"stage 'prepare_base' failed (exit 2)"
            in first_output)
    assert flow_run_states(prefect_home) == ["FAILED"]


@pytest.mark.parametrize(("flow", "fault"), [("pipeline", "api down"), ("pipeline", "temporary server slow"),
                                           ("retrain", "api down"), ("tune", "api down")])
def test_no_prefect_api_is_one_line_before_any_stage(project, tmp_path, flow, fault):
    """PREFECT_API_URL where nothing listens, or a temporary server given 1 s on a new home (its
    migrations alone take seconds): one `error:` line naming what to set, exit 2, no stage run, and
    no server left behind, from each flow's command line."""
    env = flow_env(tmp_path)
    if fault == "api down":
        api = f"http://127.0.0.1:{free_port()}/api"
        env["PREFECT_API_URL"] = api
        expected = (f"error: PREFECT_API_URL={api}: the Prefect API does not answer; start that server, "
                    "or unset PREFECT_API_URL to run on a temporary one")
    else:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "1"
        expected = ("error: Prefect's temporary server did not answer within 1 s "
                    "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); raise it, or set PREFECT_API_URL to a "
                    "running server")
    run = subprocess.run([sys.executable, "-m", f"flows.{flow}", "--project-dir", str(project)], cwd=project,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and lines(run.stderr)[-1] == expected, run.stderr[-3000:]
    assert [line for line in lines(run.stderr) if line.startswith("error:")] == [expected]
    assert not (project / "dvc.lock").exists() and not (project / "models" / "base").exists()
    assert _read(project / LOCK_FILE) == ""  # the project's run lock released
    assert prefect_processes(tmp_path / "prefect-home") == []


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def test_wait_gives_up_after_its_seconds_or_runs_once_the_lock_is_free(project, tmp_path):
    """`--wait S`: still held after S seconds, the busy line; freed meanwhile, the run goes on (here
    to the params check, which stops it with its own line). No Prefect start-up either way."""
    with project_lock(project, who="test-holder"):
        started = time.monotonic()
        gave_up = start_flow(project, tmp_path, "--wait", "1")
        output = gave_up.communicate(timeout=120)[0]
        assert gave_up.returncode == BUSY_EXIT and time.monotonic() - started >= 1, output
        said = lines(output)  # why it waits, said when it starts to, then why it gave up
        assert len(said) == 2 and said[0].startswith("waiting up to 1 s: another run of "), output
        assert re.fullmatch(busy_line(project, "test-holder"), said[1]), output
        assert "temporary server" not in output  # turned away before Prefect starts

    set_param(project, "train", "learning_rate", -1)
    with contextlib.ExitStack() as held:
        held.enter_context(project_lock(project, who="test-holder"))
        waiting = start_flow(project, tmp_path, "--wait", "120")
        printed = ""
        while "waiting up to" not in printed and waiting.poll() is None:
            printed += waiting.stdout.readline()
        assert re.search(r"^waiting up to 120 s: another run of .* is running \(test-holder pid \d+ since .*\)$",
                         printed, re.MULTILINE), printed + waiting.communicate()[0]
        held.close()  # freed while it waits: it goes on
        output = printed + waiting.communicate(timeout=120)[0]
    assert waiting.returncode == 2, output
    assert re.fullmatch(r"error: .*params\.yaml:\d+: train\.learning_rate: Input should be greater than 0",
                        lines(output)[-1]), output
    assert "Traceback" not in output and "temporary server" not in output


def test_a_torn_dvc_rwlock_is_removed_when_a_flow_takes_the_project(tmp_path):
    """A DVC killed while rewriting .dvc/tmp/rwlock (a trial stopped mid-write) leaves it empty, and
    every later dvc command fails on it; a flow taking the project removes it, and keeps a whole one."""
    from flows.common import project_lock

    rwlock = tmp_path / ".dvc" / "tmp" / "rwlock"
    rwlock.parent.mkdir(parents=True)
    for torn in ("", '{"read": {"validate": '):
        rwlock.write_text(torn)
        with project_lock(tmp_path):
            assert not rwlock.exists()
    rwlock.write_text('{"read": {}, "write": {}}')
    with project_lock(tmp_path):
        assert rwlock.read_text() == '{"read": {}, "write": {}}'
