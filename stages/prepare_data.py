"""Load raw examples, clean them, deduplicate, split so that no near-duplicates straddle splits, and
check every evaluation split (and any external evaluation file) against train for leaks.

Reads params.yaml `prepare_data` and the base model's tokenizer (length filters in its tokens);
writes data/prepared/{train,val,test}.jsonl, reports/data.json (DVC metrics: rows per rule,
clusters, leaks by kind), reports/leaks.jsonl (every leak) and reports/data_report.md (the same
with examples).
Run: python -m stages.prepare_data
"""

from __future__ import annotations

import sys
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError, run_cli
from ftpipe.io import all_or_nothing, atomic_dir, dumps_jsonl, write_text
from ftpipe.params import PrepareDataParams, load_section
from ftpipe.paths import BASE_DIR, DATA_REPORT, DATA_REPORT_MD, LEAKS, PREPARED_DIR, REPORTS, SPLITS, split_file
from ftpipe.schemas import DataReport

EXAMPLES = 3  # examples kept per rule for the markdown report


class Tally:
    """Rows changed or dropped by each rule, with a few examples of each."""

    def __init__(self) -> None:
        self.counts: dict[str, dict[str, int]] = defaultdict(dict)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, rule: str, what: str, example: str, n: int = 1) -> None:
        self.counts[rule][what] = self.counts[rule].get(what, 0) + n
        if len(self.examples[rule]) < EXAMPLES:
            self.examples[rule].append(example[:160])

    def dropped(self, rule: str) -> int:
        return self.counts.get(rule, {}).get("dropped", 0)


def clean(records: list[dict[str, Any]], params: PrepareDataParams, tally: Tally) -> list[dict[str, Any]]:
    """Apply the text rules, scrub PII, prepend the system prompt, drop rows with an empty turn."""
    from ftpipe import cleaning

    rules = [(name, getattr(cleaning, name)) for name in cleaning.TEXT_RULES if getattr(params, name)]
    kept = []
    for record in records:
        messages = []
        for m in record["messages"]:
            text = m["content"]
            for name, rule in rules:
                new = rule(text)
                if new != text:
                    tally.add(name, "changed", f"{text!r} -> {new!r}")
                text = new
            text = text.strip()
            if params.scrub_pii:
                new, emails, phones = cleaning.scrub_pii(text)
                if emails or phones:
                    tally.add("scrub_pii", "changed", f"{text!r} -> {new!r}")
                text = new
            messages.append({"role": m["role"], "content": text})
        if any(not m["content"] for m in messages):
            tally.add("empty", "dropped", f"{record['origin']}: {record['messages']!r}")
            continue
        if params.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": params.system_prompt}, *messages]
        kept.append({"messages": messages, "origin": record["origin"]})
    return kept


def length_filter(records: list[dict[str, Any]], params: PrepareDataParams, tokenizer, tally: Tally) -> list:
    """Drop rows too short (response tokens) or too long (whole conversation) in the base model's tokens.

    Contents are tokenized in one batch and the template's own tokens counted once per sequence of
    roles (a chat template puts contents verbatim between fixed markers); rendering each row
    through Jinja instead would cost as much as everything else in this stage.
    """
    from ftpipe.chat import render

    contents = [m["content"] for r in records for m in r["messages"]]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer directly: half the time of the Python wrapper
        counts = [len(e.ids) for e in backend.encode_batch(contents, add_special_tokens=False)]
    else:
        counts = [len(ids) for ids in tokenizer(contents, add_special_tokens=False)["input_ids"]]
    lengths = iter(counts)
    overhead: dict[tuple, int] = {}
    kept = []
    for record in records:
        sizes = [next(lengths) for _ in record["messages"]]
        roles = tuple(m["role"] for m in record["messages"])
        if roles not in overhead:
            empty = render(tokenizer, [{"role": r, "content": ""} for r in roles], generation_prompt=False)
            overhead[roles] = len(tokenizer(empty, add_special_tokens=False)["input_ids"])
        total = sum(sizes) + overhead[roles]
        if sizes[-1] < params.min_tokens:
            tally.add("too_short", "dropped", f"{sizes[-1]} tokens: {record['messages'][-1]['content']!r}")
        elif total > params.max_tokens:
            tally.add("too_long", "dropped", f"{total} tokens ({record['origin']}): {record['messages'][-1]['content']!r}")
        else:
            kept.append(record)
    return kept


def deduplicate(records: list[dict[str, Any]], near, tally: Tally) -> tuple[list, int]:
    """Drop exact and normalized duplicates, then keep the first row of each near-duplicate cluster."""
    from ftpipe.cleaning import norm_key
    from ftpipe.leaks import text_of

    seen_exact, seen_norm, unique = set(), set(), []
    for record in records:
        text = text_of(record)
        key = norm_key(text)
        if text in seen_exact:
            tally.add("duplicate_exact", "dropped", text)
        elif key in seen_norm:
            tally.add("duplicate_normalized", "dropped", text)
        else:
            unique.append(record)
        seen_exact.add(text)
        seen_norm.add(key)
    labels = _clusters([text_of(r) for r in unique], near)
    kept, first = [], {}
    for record, label in zip(unique, labels):
        if label in first:
            tally.add("near_duplicate", "dropped", f"{text_of(record)!r} ~ {text_of(first[label])!r}")
        else:
            first[label] = record
            kept.append(record)
    return kept, len(first)


def _clusters(texts: list[str], near, links=()) -> list[int]:
    """Cluster label per text: texts joined by confirmed near-duplicate pairs or by `links`."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in [*near.pairs(texts), *links]:
        parent[find(a)] = find(b)
    return [find(i) for i in range(len(texts))]


def split(records: list[dict[str, Any]], params: PrepareDataParams, near) -> tuple[dict[str, list], int, int]:
    """Split by groups that never move (ftpipe.splits): rows that share a normalized prompt, have
    near-duplicate prompts, share a long n-gram or a long response, or give the same answer to
    prompts one typing slip apart (ftpipe.typos) form a group, which takes one
    split for all its rows (so the leak checks never flag a pair the split itself separated). Each
    row draws its split from a seeded hash of its own prompt; a group takes train if any of its rows
    drew train, else val if any drew val, else test. Returns (splits, groups, rows reassigned: rows
    whose own draw differs from their group's split)."""
    from ftpipe.cleaning import ngrams, norm_key
    from ftpipe.leaks import prompt_of, response_key, text_of
    from ftpipe.splits import group_split, row_draw, split_of
    from ftpipe.typos import typo_links

    links, owner = [], {}
    for i, record in enumerate(records):
        response = response_key(record, params.min_leak_response_words)
        keys = ngrams(text_of(record), params.ngram_leak) | {norm_key(prompt_of(record))}
        for key in keys | ({("response", response)} if response else set()):
            # n-gram hashes are ints, prompts str and responses tuples: never equal to one another
            j = owner.setdefault(key, i)
            if j != i:
                links.append((i, j))
    links += typo_links(records)  # the same answer to prompts one typing slip apart
    labels = _clusters([prompt_of(r) for r in records], near, links)
    draws = [row_draw(r, params.seed) for r in records]
    drawn = [split_of(u, test_fraction=params.test_fraction, val_fraction=params.val_fraction) for u in draws]
    members: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        members[label].append(i)
    place = {label: group_split([drawn[i] for i in rows]) for label, rows in members.items()}
    _fill_empty(place, members, draws)
    out: dict[str, list] = {name: [] for name in SPLITS}
    # Each split in the order of its rows' draws: shuffled, and the same order whatever else is added,
    # so `evaluate.max_examples` takes a random sample, not the first files of the data.
    for i in sorted(range(len(records)), key=lambda i: (draws[i], i)):
        out[place[labels[i]]].append(records[i])
    for name in SPLITS:
        out[name] = [{"id": f"{name}-{i:06d}", **r} for i, r in enumerate(out[name])]
    reassigned = sum(1 for i, label in enumerate(labels) if drawn[i] != place[label])
    return out, len(members), reassigned


def _fill_empty(place: dict[int, str], members: dict[int, list[int]], draws: list[float]) -> None:
    """Data too small for the draws to fill an evaluation split: it takes the training group whose
    smallest draw is lowest (deterministic; only data of a few dozen rows ever needs it)."""
    for name in ("test", "val"):
        if name in place.values():
            continue
        train = [label for label, where in place.items() if where == "train"]
        if len(train) > 1:
            place[min(train, key=lambda g: min(draws[i] for i in members[g]))] = name


def gate(splits: dict[str, list], externals: dict[str, list], params: PrepareDataParams, near,
         leaks_file: Path) -> tuple[list, int]:
    """Check val, test and external evaluation sets against train; apply `leak_action`."""
    from ftpipe.leaks import find_leaks

    evals = {"val": splits["val"], "test": splits["test"], **externals}

    def check() -> list:
        return find_leaks(splits["train"], evals, threshold=params.near_dup_threshold, ngram=params.ngram_leak,
                          min_response_words=params.min_leak_response_words, near=near)

    leaks = check()
    found, dropped = list(leaks), 0
    if leaks and params.leak_action == "fail":
        for leak in leaks[:20]:
            print(f"leak {leak.short()}", file=sys.stderr)
        # fail writes nothing (the previous outputs stay whole), so say where warn puts the full list.
        raise PipelineError(f"prepare_data: {len(leaks)} evaluation row(s) leak from train, e.g. {leaks[0].short()} "
                            f"(prepare_data.leak_action: fail; set it to warn to list all {len(leaks)} in "
                            f"{leaks_file}, or drop to remove the leaking training rows)")
    if leaks and params.leak_action == "warn":
        print(f"warning: {len(leaks)} evaluation row(s) leak from train, e.g. {leaks[0].short()} "
              f"(all in {leaks_file})", file=sys.stderr)
    while leaks and params.leak_action == "drop":
        bad = {leak.train_id for leak in leaks}
        splits["train"] = [r for r in splits["train"] if r["id"] not in bad]
        dropped += len(bad)
        leaks = check()
    return found, dropped


def run(*, params: PrepareDataParams, out_dir: Path, reports_dir: Path, tokenizer=None) -> DataReport:
    from ftpipe.cleaning import NearDuplicates
    from ftpipe.leaks import count_by_kind
    from ftpipe.reports import data_report
    from ftpipe.sources import load_records

    records, malformed, source = load_records(params)
    for record in records:
        size = sum(len(m["content"]) for m in record["messages"])
        if size > params.max_record_chars:
            raise PipelineError(f"{record['origin']}: record of {size:,} characters exceeds "
                                f"prepare_data.max_record_chars ({params.max_record_chars:,})")
    externals = {}
    for path in params.external_eval:
        rows, _, _ = load_records(params.model_copy(update={"source": "file", "path": path}))
        externals[f"external:{Path(path).name}"] = [{"id": f"{i:06d}", **r} for i, r in enumerate(rows)]

    tally = Tally()
    if malformed.get("malformed"):
        tally.add("malformed", "dropped", "entries that are not a list of text turns", malformed["malformed"])
    rows_in = len(records) + tally.dropped("malformed")
    kept = clean(records, params, tally)
    if tokenizer is not None:
        kept = length_filter(kept, params, tokenizer, tally)
    near = NearDuplicates(params.near_dup_threshold)  # one index shared by dedup, split and leak checks
    kept, clusters = deduplicate(kept, near, tally)
    if not kept:
        reasons = ", ".join(f"{rule}={c['dropped']}" for rule, c in tally.counts.items() if c.get("dropped")) or "no rows"
        raise PipelineError(f"{source}: no usable rows after cleaning (rows in: {rows_in}; dropped: {reasons})")
    splits, groups, reassigned = split(kept, params, near)
    empty = [name for name in SPLITS if not splits[name]]
    if empty:
        raise PipelineError(f"{source}: {len(kept)} usable rows are too few to fill the {', '.join(empty)} split(s)")
    leaks_file = reports_dir / LEAKS.name
    leaks, dropped_for_leaks = gate(splits, externals, params, near, leaks_file)
    if not splits["train"]:
        raise PipelineError(f"{source}: dropping leaking rows left no training rows (prepare_data.leak_action: drop)")

    report = DataReport(
        source=source,
        rows_in=rows_in,
        rules={rule: dict(counts) for rule, counts in tally.counts.items()},
        rows_out=sum(len(splits[n]) for n in SPLITS),
        near_duplicate_clusters=clusters,
        split_groups=groups,
        split_rows_reassigned=reassigned,
        splits={name: len(splits[name]) for name in SPLITS},
        leaks={**count_by_kind(leaks), "total": len(leaks)},
        leak_action=params.leak_action,
        train_rows_dropped_for_leaks=dropped_for_leaks,
        token_filters=tokenizer is not None,
    )
    with all_or_nothing(), atomic_dir(out_dir) as tmp:  # the splits and their reports together
        for name in SPLITS:
            write_text(tmp / split_file(name), dumps_jsonl(splits[name]))
        report.write(reports_dir / DATA_REPORT.name)
        write_text(leaks_file, dumps_jsonl(asdict(leak) for leak in leaks))
        write_text(reports_dir / DATA_REPORT_MD.name, data_report(report, tally.examples, leaks, leaks_file))
    return report


def main() -> None:
    from ftpipe.models import load_tokenizer
    from ftpipe.sources import check_data_location

    params = load_section("prepare_data", PrepareDataParams)
    check_data_location(params, Path("."))
    if not (BASE_DIR / "tokenizer_config.json").is_file():
        raise PipelineError(f"{BASE_DIR}: base model not prepared; its tokenizer sets the length filters "
                            "(run `dvc repro prepare_base`)")
    tokenizer = load_tokenizer(BASE_DIR)
    report = run(params=params, out_dir=PREPARED_DIR, reports_dir=REPORTS, tokenizer=tokenizer)
    print(f"prepare_data: {report.rows_in} rows in, {report.rows_out} kept, splits {report.splits}, "
          f"leaks {report.leaks.total}")


if __name__ == "__main__":
    run_cli(main)
