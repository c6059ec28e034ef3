"""Prefect flow that runs the pipeline's DVC stages in order, then reports base vs fine-tuned.

Each task is `dvc repro --single-item <stage>`, so DVC decides what is stale and dvc.lock stays the
one record of lineage: a flow run and a plain `dvc repro` leave the same lock. The flow holds
ordering, retries (I/O-bound stages only, never bad input), timings and the final report.
With no Prefect server configured, Prefect starts a temporary local one.
One run at a time per project (flows.common.project_lock, taken before Prefect starts): a second
exits 75 with one line naming the first, or waits for it with --wait S.
Run: python -m flows.pipeline [--project-dir DIR] [--wait S]
"""

from __future__ import annotations

import argparse
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
    say,
    stage_task,
    stopped,
    validate_project,
)
from ftpipe import paths
from ftpipe.errors import PipelineError, Terminated


def comparison_markdown(project_dir: Path) -> str:
    from ftpipe.comparison import comparison_table
    from ftpipe.schemas import MetricsReport

    return comparison_table(MetricsReport.read(project_dir / paths.METRICS).model_dump())


@flow(name="finetune-pipeline", log_prints=True)
def pipeline(project_dir: Path = Path(".")) -> dict[str, Any]:
    """Every stage of dvc.yaml in order (flows.common.STAGES), each through DVC, then the reports."""
    project_dir = Path(project_dir).resolve()
    with project_lock(project_dir, who="flows.pipeline"):  # main() holds it already; a direct call takes it
        return _pipeline_locked(project_dir)


def _pipeline_locked(project_dir: Path) -> dict[str, Any]:
    from prefect.artifacts import create_markdown_artifact

    from ftpipe.promotion import gate_line
    from ftpipe.schemas import RegistrationReport
    from ftpipe.summary import summarize

    validate_project(project_dir)  # before DVC touches anything; --single-item skips upstream stages
    timings = {}
    for stage in STAGES:
        # DVC cannot see the registry: outputs up to date but not registered there (a new or other
        # MLFLOW_TRACKING_URI) would leave register skipped and an old registration.json reported.
        behind = registry_behind(project_dir) if stage == "register" else []
        if behind:
            get_run_logger().info("registering again: %s", "; ".join(behind))
        timings[stage] = stage_task(stage)(stage, project_dir, force=bool(behind))
    table = comparison_markdown(project_dir)
    registration = RegistrationReport.read(project_dir / paths.REGISTRATION)
    create_markdown_artifact(
        key="data-report",
        markdown=(project_dir / paths.DATA_REPORT_MD).read_text(encoding="utf-8"),
        description="Cleaning rules, near-duplicate clusters and train/eval leak checks",
    )
    create_markdown_artifact(
        key="base-vs-finetuned",
        markdown=(f"# Base vs fine-tuned\n\n{table}\nRegistered: `{registration.model_uri}` "
                  f"({', '.join(registration.aliases)}): {gate_line(registration)}\n\n"
                  + "".join(f"- {reason}\n" for reason in registration.promotion.reasons)),
        description="Test-split metrics of the base and fine-tuned models",
    )
    summary = summarize(project_dir, timings)
    return {"timings_s": timings, "registration": registration.model_dump(mode="json"), "table": table,
            "summary": summary and str(summary)}


def print_summary(result: dict[str, Any], project_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from ftpipe.comparison import comparison_rows
    from ftpipe.metrics import LOWER_IS_BETTER
    from ftpipe.promotion import gate_line
    from ftpipe.schemas import MetricsReport, RegistrationReport
    from ftpipe.tracking import ui_command

    report = MetricsReport.read(project_dir / paths.METRICS)
    label = "DPO" if report.product == "dpo" else "fine-tuned"  # the model the gate line below is about
    table = Table(title=f"Base vs {label} on {report.examples} test examples")
    for column in ("metric", "base", label, "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    # comparison_rows reads the "finetuned" block: point it at the registered candidate's.
    for key, b, t, better in comparison_rows({**report.model_dump(), "finetuned": report.candidate(report.product)}):
        table.add_row(key + (" (lower is better)" if key in LOWER_IS_BETTER else ""), f"{b:.4f}", f"{t:.4f}",
                      f"[{'green' if better else 'red'}]{t - b:+.4f}[/]")
    console = Console()
    console.print(table)
    registration = RegistrationReport.model_validate(result["registration"])
    # The gate's gain on the primary metric with its interval (every metric's: reports/comparison.md).
    console.print(f"Promotion gate on {registration.promotion.metric}: {gate_line(registration)}", soft_wrap=True)
    console.print(f"Registered {registration.model_uri} as {' and '.join(registration.aliases)}: "
                  + "; ".join(registration.promotion.reasons), soft_wrap=True)
    console.print("Stage times (s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in result["timings_s"].items()))
    if result["summary"]:
        console.print(f"Summary: {result['summary']}", soft_wrap=True)
    console.print(f"Open the MLflow UI on the results:\n  {ui_command(project_dir)}", soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=Path("."))
    parser.add_argument("--wait", type=float, default=0, metavar="S",
                        help="seconds to wait for another run of the project to end (default: exit at once)")
    args = parser.parse_args(argv)
    install_sigterm()
    project_dir = args.project_dir.resolve()
    try:
        # Busy or a bad params.yaml: one line, no Prefect start-up.
        with project_lock(project_dir, args.wait, who="flows.pipeline", on_wait=say):
            validate_project(project_dir)
            with prefect_api():
                result = pipeline(project_dir=project_dir)
            print_summary(result, project_dir)
    except (PipelineError, StageFailed, ProjectBusy) as exc:
        return error_exit(exc)
    except (TerminationSignal, Terminated, KeyboardInterrupt) as exc:
        return stopped(exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
