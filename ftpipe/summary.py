"""reports/summary.md: one run in a page (the comparison, the gate, stage times, machine and date).

Written by the flows after a run from the reports the stages left, so a README or a ticket can
quote a run's results as the run wrote them. Not a DVC output: its times and date change every run.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from ftpipe import paths
from ftpipe.io import write_text


def machine() -> str:
    """The CPU (and GPU, if any) this process ran on, e.g. `Intel Xeon (2 cores, bf16), no GPU`."""
    import torch

    from ftpipe.device import bf16_supported, cpu_model

    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu} ({cores} cores{', bf16' if bf16_supported('cpu') else ', no bf16'}), {gpu}; torch {torch.__version__}"


def summary_markdown(project_dir: Path, timings_s: dict[str, float], finished: datetime, host: str) -> str:
    """The summary of the run whose reports are in `project_dir`; `timings_s`: seconds per stage."""
    from ftpipe.comparison import comparison_table
    from ftpipe.promotion import gate_line
    from ftpipe.schemas import DpoReport, MetricsReport, RegistrationReport, TrainReport

    metrics = MetricsReport.read(project_dir / paths.METRICS)
    registration = RegistrationReport.read(project_dir / paths.REGISTRATION)
    train = TrainReport.read(project_dir / paths.TRAIN_REPORT)
    preference = ""
    if metrics.product == "dpo":  # the registered model is the preference-tuned one
        dpo = DpoReport.read(project_dir / paths.DPO_REPORT)
        preference = f" then `{dpo.method}` for {dpo.steps} steps from {dpo.start}"
    lines = [
        "# Run summary",
        "",
        f"{finished:%Y-%m-%d %H:%M %Z} on {host}.",
        f"Trained with `{train.method}` for {train.steps} steps ({train.precision} on {train.device}){preference}; "
        f"registered `{registration.model_uri}` as {' and '.join(registration.aliases)}.",
        "",
        comparison_table(metrics.model_dump()).rstrip(),
        "",
        f"**Promotion gate on {registration.promotion.metric}:** {gate_line(registration)}",
        "",
        *(f"- {reason}" for reason in registration.promotion.reasons),
        "",
        "| stage | seconds |",
        "|---|---:|",
        *(f"| {stage} | {seconds:.1f} |" for stage, seconds in timings_s.items()),
        f"| total | {sum(timings_s.values()):.1f} |",
        "",
        "A stage whose inputs did not change is skipped by DVC and takes about a second.",
    ]
    return "\n".join(lines) + "\n"


def write_summary(project_dir: Path, timings_s: dict[str, float], finished: datetime | None = None) -> Path:
    finished = finished or datetime.now().astimezone()
    target = project_dir / paths.SUMMARY
    write_text(target, summary_markdown(project_dir, timings_s, finished, machine()))
    return target


def summarize(project_dir: Path, timings_s: dict[str, float]) -> Path | None:
    """write_summary after a run whose model is registered already: a summary that cannot be written
    (a report missing or unreadable) is a warning line, never a failed run (None)."""
    import sys

    try:
        return write_summary(project_dir, timings_s)
    except Exception as exc:  # the registration stands whatever the summary's fate
        print(f"warning: {paths.SUMMARY} not written: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
