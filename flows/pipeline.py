"""Prefect flow that runs the pipeline's DVC stages in order, then reports base vs fine-tuned.

Each task is `dvc repro --single-item <stage>`, so DVC decides what is stale and dvc.lock stays the
one record of lineage: a flow run and a plain `dvc repro` leave the same lock. The flow holds
ordering, retries (I/O-bound stages only, never bad input), timings and the final report.
With no Prefect server configured, Prefect starts a temporary local one.
Run: python -m flows.pipeline [--project-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

STAGES = ("prepare_base", "prepare_data", "quantize", "train", "evaluate", "register")
# Hub downloads and the MLflow server can fail transiently; compute stages fail for real.
IO_BOUND = {"prepare_base": 2, "register": 3}
USER_ERROR = 2  # exit code of a stage that rejected its input: retrying cannot help


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, detail: str):
        super().__init__(f"stage '{stage}' failed (exit {returncode}): {detail}")
        self.stage, self.returncode = stage, returncode


def stage_env() -> dict[str, str]:
    # dvc.yaml says `python -m stages.X`: make `python` the interpreter running this flow.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def dvc_repro(stage: str, project_dir: Path, force: bool = False) -> None:
    """Run one DVC stage (`force`: even if DVC finds it up to date), streaming its output; raise
    StageFailed with its last error line."""
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", *(["--force"] if force else []), stage]
    proc = subprocess.Popen(command, cwd=project_dir, env=stage_env(), stderr=subprocess.PIPE)
    tail = b""
    for chunk in iter(lambda: proc.stderr.read1(4096), b""):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
        tail = (tail + chunk)[-8192:]
    if proc.wait() != 0:
        text = tail.decode("utf-8", "replace").replace("\r", "\n")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # The stage's own one-line error is the useful one; DVC's line carries the stage's exit code.
        ours = [ln for ln in lines if ln.startswith("error: ")]
        code = re.search(r"exited with (-?\d+)", text)
        detail = ours[-1][len("error: "):] if ours else (lines or ["no output"])[-1]
        raise StageFailed(stage, int(code.group(1)) if code else proc.returncode, detail)


def _retry_unless_user_error(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as exc:
        return exc.returncode != USER_ERROR
    except Exception:
        return True
    return False


@task(task_run_name="dvc repro {stage}")
def run_stage(stage: str, project_dir: Path, force: bool = False) -> float:
    logger = get_run_logger()
    started = time.perf_counter()
    dvc_repro(stage, project_dir, force)
    elapsed = time.perf_counter() - started
    logger.info("stage %s done in %.1f s", stage, elapsed)
    return elapsed


def stage_task(stage: str):
    retries = IO_BOUND.get(stage, 0)
    if not retries:
        return run_stage
    return run_stage.with_options(retries=retries, retry_delay_seconds=[5, 20, 60][:retries],
                                  retry_condition_fn=_retry_unless_user_error)


def comparison_markdown(project_dir: Path) -> str:
    from ftpipe.io import read_json
    from stages.evaluate import comparison_table

    return comparison_table(read_json(project_dir / "reports" / "metrics.json"))


@flow(name="finetune-pipeline", log_prints=True)
def pipeline(project_dir: Path = Path(".")) -> dict[str, Any]:
    """prepare_base -> prepare_data -> train -> evaluate -> register, each through DVC."""
    from prefect.artifacts import create_markdown_artifact

    from ftpipe.io import read_json

    project_dir = Path(project_dir).resolve()
    timings = {stage: stage_task(stage)(stage, project_dir) for stage in STAGES}
    table = comparison_markdown(project_dir)
    registration = read_json(project_dir / "reports" / "registration.json")
    create_markdown_artifact(
        key="data-report",
        markdown=(project_dir / "reports" / "data_report.md").read_text(encoding="utf-8"),
        description="Cleaning rules, near-duplicate clusters and train/eval leak checks",
    )
    create_markdown_artifact(
        key="base-vs-finetuned",
        markdown=(f"# Base vs fine-tuned\n\n{table}\nRegistered: `{registration['model_uri']}` "
                  f"({', '.join(registration['aliases'])})\n\n"
                  + "".join(f"- {reason}\n" for reason in registration["promotion"]["reasons"])),
        description="Test-split metrics of the base and fine-tuned models",
    )
    return {"timings_s": timings, "registration": registration, "table": table}


def print_summary(result: dict[str, Any], project_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from ftpipe.io import read_json
    from ftpipe.metrics import LOWER_IS_BETTER
    from ftpipe.tracking import ui_command
    from stages.evaluate import comparison_rows

    metrics = read_json(project_dir / "reports" / "metrics.json")
    table = Table(title=f"Base vs fine-tuned on {metrics['examples']} test examples")
    for column in ("metric", "base", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key, b, t, better in comparison_rows(metrics):
        table.add_row(key + (" (lower is better)" if key in LOWER_IS_BETTER else ""), f"{b:.4f}", f"{t:.4f}",
                      f"[{'green' if better else 'red'}]{t - b:+.4f}[/]")
    console = Console()
    console.print(table)
    registration = result["registration"]
    console.print(f"Registered {registration['model_uri']} as {' and '.join(registration['aliases'])}: "
                  + "; ".join(registration["promotion"]["reasons"]), soft_wrap=True)
    console.print("Stage times (s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_s"].items()))
    console.print(f"Open the MLflow UI on the results:\n  {ui_command(project_dir)}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        result = pipeline(project_dir=args.project_dir)
    except StageFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.returncode or 1
    print_summary(result, args.project_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
