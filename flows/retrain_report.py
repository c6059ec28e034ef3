"""The retraining flow's markdown report: why it ran, the data, base vs champion vs challenger, the decision."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftpipe.schemas import RegistrationReport


def unchanged_report(change: dict[str, Any]) -> str:
    latest = change["latest"]
    tags = ", ".join(f"{key} `{value}`" for key, value in latest["tags"].items())
    champion = change["champion"]
    return (f"# No change: no training\n\nNothing changed since {change['model_name']} "
            f"v{latest['version']} ({tags}): `dvc status` is clean and dvc.lock matches its lineage tags.\n\n"
            f"Champion: {'v' + champion['version'] if champion else 'none'}.\n")


def retrain_report(project_dir: Path, change: dict[str, Any], timings: dict[str, float]) -> tuple[str, RegistrationReport]:
    """(markdown, registration) after a pipeline run."""
    from ftpipe import paths
    from ftpipe.comparison import metric_keys
    from ftpipe.metrics import GENERAL_KEY, LOWER_IS_BETTER
    from ftpipe.promotion import gate_line
    from ftpipe.schemas import DataReport, MetricsReport, RegistrationReport, TrainReport

    train = TrainReport.read(project_dir / paths.TRAIN_REPORT)
    registration = RegistrationReport.read(project_dir / paths.REGISTRATION)
    metrics = MetricsReport.read(project_dir / paths.METRICS)
    data = DataReport.read(project_dir / paths.DATA_REPORT)
    version = registration.version
    title = f"v{version} promoted to champion" if registration.promotion.promote else f"v{version} kept as challenger"
    # The champion the gate compared with, scored again by register on this run's test split (the
    # figures it logged when it was registered come from its own, older split).
    champion = registration.champion
    lines = [f"# Retraining: {registration.model_name} {title}", "", "## Why it ran", ""]
    lines += [f"- {reason}" for reason in change["reasons"]]
    splits = ", ".join(f"{name} {n}" for name, n in data.splits.items())
    dropped = ", ".join(f"{rule} {c['dropped']}" for rule, c in data.rules.items() if c.get("dropped")) or "none"
    lines += ["", "## Data", "",
              f"- source `{data.source}`: {data.rows_in} rows in, {data.rows_out} out ({splits})",
              f"- dropped by cleaning: {dropped}",
              f"- leak check: {data.leaks.total} leak(s), action `{data.leak_action}`"
              f" (full report: the `data-report` artifact)", "",
              f"Trained from: {train.parent} (`train.init_from`), method `{train.method}`, {train.steps} steps"
              + ("; the registered model is the DPO one (`dpo.init_from` says what it started from)."
                 if registration.candidate == "dpo" else "."),
              ""]
    header = ["metric", "base", f"champion v{champion.version} (before)" if champion else "champion (none)",
              f"challenger v{version}"]
    lines += [f"## Metrics ({metrics.examples} test examples)", "",
              "| " + " | ".join(header) + " |", "|---|---:|---:|---:|"]
    for key in [k for k in metric_keys(metrics.model_dump()) if k != GENERAL_KEY]:
        previous = champion.metrics.get(key) if champion else None
        lines.append(f"| {key}{' (lower is better)' if key in LOWER_IS_BETTER else ''} | "
                     f"{metrics.base[key]:.4f} | {'-' if previous is None else f'{previous:.4f}'} | "
                     f"{metrics.candidate(metrics.product)[key]:.4f} |")
    if champion:
        lines += ["", f"The champion is scored on this test split: the same rows and greedy settings as the "
                      f"challenger ({champion.scored})."]
    lines += ["", "## Decision", "", f"**{title}** (`{registration.model_uri}`, aliases "
              f"{', '.join(registration.aliases)}): {gate_line(registration)}", ""]
    lines += [f"- {reason}" for reason in registration.promotion.reasons]
    lines += ["", "## Stage times", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in timings.items()]
    return "\n".join(lines) + "\n", registration
