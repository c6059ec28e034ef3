"""Load raw examples, clean them, split train/val/test by prompt group, and check the splits for overlap.

Reads params.yaml `prepare_data`; writes data/prepared/{train,val,test}.jsonl and reports/data.json.
Run: python -m stages.prepare_data
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import atomic_dir, dumps_jsonl, write_json, write_text
from ftpipe.params import PrepareDataParams, load_section

OUT_DIR = Path("data/prepared")
REPORT = Path("reports/data.json")
SPLITS = ("train", "val", "test")


def clean(records: list[dict[str, Any]], system_prompt: str | None) -> tuple[list[dict[str, Any]], Counter]:
    """Strip text, drop rows with an empty turn, drop exact duplicates (first one kept)."""
    kept, dropped, seen = [], Counter(), set()
    for record in records:
        messages = [{"role": m["role"], "content": m["content"].strip()} for m in record["messages"]]
        if any(not m["content"] for m in messages):
            dropped["empty"] += 1
            continue
        key = _conversation_key(messages)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        if system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system_prompt}, *messages]
        kept.append({"messages": messages, "origin": record["origin"]})
    return kept, dropped


def split(records: list[dict[str, Any]], *, seed: int, val_fraction: float, test_fraction: float) -> dict[str, list]:
    """Deterministic split in which all rows sharing a prompt land in the same split, so an
    evaluation prompt is never also a training prompt with another answer."""
    groups: dict[tuple, list] = defaultdict(list)
    for record in records:
        groups[_prompt_key(record["messages"])].append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    targets = {"test": test_fraction * len(records), "val": val_fraction * len(records)}
    out: dict[str, list] = {name: [] for name in SPLITS}
    for key in keys:
        name = next((n for n in ("test", "val") if len(out[n]) < targets[n]), "train")
        out[name].extend(groups[key])
    return out


def overlaps(splits: dict[str, list]) -> list[str]:
    """Exact prompt or conversation shared between any two splits, one line per finding."""
    found = []
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1:]:
            for kind, key in (("prompt", _prompt_key), ("conversation", _conversation_key)):
                shared = {key(r["messages"]) for r in splits[a]} & {key(r["messages"]) for r in splits[b]}
                if shared:
                    example = " | ".join(text for _, text in sorted(shared)[0])[:80]
                    found.append(f"{len(shared)} {kind}(s) in both {a} and {b}, e.g. {example!r}")
    return found


def run(*, params: PrepareDataParams, out_dir: Path, report_path: Path) -> dict[str, Any]:
    from ftpipe.sources import load_records

    records, dropped, source = load_records(params)
    rows_in = len(records) + sum(dropped.values())
    kept, cleaned = clean(records, params.system_prompt)
    dropped = {**dropped, **cleaned}
    if not kept:
        reasons = ", ".join(f"{k}={v}" for k, v in dropped.items() if v) or "no rows"
        raise PipelineError(f"{source}: no usable rows after cleaning (rows in: {rows_in}; dropped: {reasons})")
    splits = split(kept, seed=params.seed, val_fraction=params.val_fraction, test_fraction=params.test_fraction)
    empty = [name for name in SPLITS if not splits[name]]
    if empty:
        raise PipelineError(f"{source}: {len(kept)} usable rows are too few to fill the {', '.join(empty)} split(s)")
    leaks = overlaps(splits)
    if leaks:
        raise PipelineError(f"prepare_data: overlap between splits: {'; '.join(leaks)}")

    report = {
        "source": source,
        "rows_in": rows_in,
        "dropped": {k: dropped.get(k, 0) for k in ("malformed", "empty", "duplicate")},
        "rows_out": len(kept),
        "splits": {name: len(splits[name]) for name in SPLITS},
        "overlap": 0,
    }
    with atomic_dir(out_dir) as tmp:
        for name in SPLITS:
            rows = [{"id": f"{name}-{i:06d}", **r} for i, r in enumerate(splits[name])]
            write_text(tmp / f"{name}.jsonl", dumps_jsonl(rows))
        write_json(report_path, report)
    return report


def _prompt_key(messages: list[dict[str, str]]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages[:-1])


def _conversation_key(messages: list[dict[str, str]]) -> tuple:
    return tuple((m["role"], m["content"]) for m in messages)


def main() -> None:
    params = load_section("prepare_data", PrepareDataParams)
    report = run(params=params, out_dir=OUT_DIR, report_path=REPORT)
    print(f"prepare_data: {report['rows_in']} rows in, {report['rows_out']} kept, splits {report['splits']}")


if __name__ == "__main__":
    run_cli(main)
