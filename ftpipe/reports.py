"""Human-readable markdown reports written next to the JSON metrics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ftpipe.schemas import DataReport

LEAK_SAMPLE = 20  # leaks shown in the markdown report; all of them are in the JSONL file


def data_report(report: DataReport, examples: dict[str, list[str]], leaks: list, leaks_file: Path) -> str:
    """Cleaning and leak-check report: rows per rule with examples, clusters, splits, a sample of leaks."""
    lines = [f"# Data report: {report.source}", "",
             f"{report.rows_in:,} rows in, {report.rows_out:,} out (one row kept per near-duplicate "
             f"cluster); {report.split_groups:,} split groups, none of which straddles train/val/test.", "",
             "| rule | count | action (changed: turns, dropped: rows) |", "|---|---:|---|"]
    for rule, counts in report.rules.items():
        for action, n in counts.items():
            lines.append(f"| {rule} | {n:,} | {action} |")
    lines += ["", "| split | rows |", "|---|---:|"]
    lines += [f"| {name} | {n:,} |" for name, n in report.splits.items()]
    total = report.leaks.total
    lines += ["", f"## Leak checks: {total} leak(s), action `{report.leak_action}`", ""]
    lines += [f"- {kind}: {n}" for kind, n in report.leaks.model_dump().items() if kind != "total"]
    if report.train_rows_dropped_for_leaks:
        lines.append(f"- training rows dropped: {report.train_rows_dropped_for_leaks}")
    if leaks:
        lines += ["", "| kind | eval row | train row |", "|---|---|---|"]
        lines += [f"| {x.kind} | {x.eval_set}/{x.eval_id}: {_cell(x.eval_text)} | {x.train_id}: {_cell(x.train_text)} |"
                  for x in leaks[:LEAK_SAMPLE]]
        if len(leaks) > LEAK_SAMPLE:
            lines += ["", f"{len(leaks) - LEAK_SAMPLE:,} more leak(s) not shown: "
                          f"all {len(leaks):,} are in {leaks_file}."]
    lines += ["", "## Examples per rule", ""]
    for rule, texts in examples.items():
        lines.append(f"**{rule}**")
        lines += [f"- {_cell(t)}" for t in texts]
        lines.append("")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text[:100].replace("|", "\\|").replace("\n", " ⏎ ")
