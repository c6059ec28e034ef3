"""Preference data for the dpo stage: pairs from a file, or from the SFT data with the base model's own
greedy replies as the rejected ones (self-generated negatives), or replies rated thumbs up/down (kind
thumbs, for KTO); split like the SFT data and leak-checked with prepare_data's settings.

A pair is {"id", "prompt": [messages before the reply], "chosen": str, "rejected": str, "origin"}; a
rated reply {"id", "prompt", "completion": str, "label": bool (true: good), "origin"}.
Split: a pair whose prompt (normalized) is an SFT row's prompt goes to that row's split; any other
prompt goes by a seeded hash of it, so every pair of one prompt lands in one split and no prompt
straddles train and evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError
from ftpipe.io import iter_jsonl
from ftpipe.params import PrepareDataParams, PreparePrefsParams
from ftpipe.paths import SPLITS
from ftpipe.splits import prompt_key  # the key the SFT split is drawn from, so pairs follow their prompt

ROLES = ("system", "user", "assistant")


def clean_text(text: str, data: PrepareDataParams) -> str:
    """prepare_data's text rules, in its order, so pairs compare with the SFT rows they may match."""
    from ftpipe import cleaning

    for name in cleaning.TEXT_RULES:
        if getattr(data, name):
            text = getattr(cleaning, name)(text)
    text = text.strip()
    return cleaning.scrub_pii(text)[0] if data.scrub_pii else text


def read_file(path: Path, params: PreparePrefsParams,
              data: PrepareDataParams) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(pairs, pairs left out by reason: exact duplicates, chosen equal to rejected) of a .jsonl
    preference file; a bad line fails naming the file, the line and the field."""
    from ftpipe.cleaning import norm_key

    pairs, seen, dropped = [], set(), {"duplicate": 0, "chosen_equals_rejected": 0}
    for line, where, row, prompt in _rows(path, params, data, what="preference file"):
        chosen = clean_text(_reply(row, params.chosen_field, where), data)
        rejected = clean_text(_reply(row, params.rejected_field, where), data)
        for name, text in ((params.chosen_field, chosen), (params.rejected_field, rejected)):
            if not text:
                raise PipelineError(f"{where}: field '{name}' is empty")
        key = (prompt_key(prompt), chosen, rejected)
        if key in seen or norm_key(chosen) == norm_key(rejected):  # nothing to learn from either
            dropped["duplicate" if key in seen else "chosen_equals_rejected"] += 1
            continue
        seen.add(key)
        pairs.append({"id": f"line{line}", "prompt": prompt, "chosen": chosen, "rejected": rejected, "origin": where})
    if not pairs:
        raise PipelineError(f"{path}: no preference pairs (left out: {dropped})")
    return pairs, dropped


def _rows(path: Path, params: PreparePrefsParams, data: PrepareDataParams,
          *, what: str) -> Iterator[tuple[int, str, dict[str, Any], list[dict[str, str]]]]:
    """(line, "file:line", row, its cleaned prompt with prepare_data's system prompt first) of each line
    of a .jsonl preference or thumbs file; the file's type and presence checked first."""
    if path.suffix.lower() != ".jsonl":
        raise PipelineError(f"prepare_prefs.path: {path}: unsupported file type '{path.suffix}' (use .jsonl)")
    if not path.is_file():
        raise PipelineError(f"prepare_prefs.path: {what} not found: {path}")
    for line, row in iter_jsonl(path):
        where = f"{path}:{line}"
        prompt = _prompt(row, params.prompt_field, where, data)
        if data.system_prompt and prompt[0]["role"] != "system":
            prompt = [{"role": "system", "content": data.system_prompt}, *prompt]
        yield line, where, row, prompt


GOOD_LABELS, BAD_LABELS = ("up", "good"), ("down", "bad")  # besides true/false and 1/0, any case


def read_thumbs(path: Path, params: PreparePrefsParams,
                data: PrepareDataParams) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(rated replies, rows left out by reason: exact duplicates, and every row of a (prompt, reply)
    rated both good and bad, "conflicting") of a .jsonl thumbs file; a bad line fails naming the file,
    the line and the field."""
    rows, seen, dropped = [], set(), {"duplicate": 0, "conflicting": 0}
    for line, where, row, prompt in _rows(path, params, data, what="thumbs file"):
        reply = clean_text(_reply(row, params.reply_field, where), data)
        if not reply:
            raise PipelineError(f"{where}: field '{params.reply_field}' is empty")
        label = _label(row, params.label_field, where)
        key = (prompt_key(prompt), reply, label)
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        rows.append({"id": f"line{line}", "prompt": prompt, "completion": reply, "label": label, "origin": where,
                     "_key": key[:2]})
    labels: dict[tuple[str, str], set[bool]] = {}
    for row in rows:
        labels.setdefault(row["_key"], set()).add(row["label"])
    kept = [row for row in rows if len(labels[row["_key"]]) == 1]  # rated both ways: nothing to learn
    dropped["conflicting"] = len(rows) - len(kept)
    kept = [{k: v for k, v in row.items() if k != "_key"} for row in kept]
    if not kept:
        raise PipelineError(f"{path}: no rated replies (left out: {dropped})")
    return kept, dropped


def _label(row: dict[str, Any], field: str, where: str) -> bool:
    """True (good) or False (bad) from true/false, 1/0, "up"/"down", "good"/"bad" (any case)."""
    if field not in row:
        raise PipelineError(f"{where}: missing field '{field}'")
    value = row[field]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in GOOD_LABELS + BAD_LABELS:
        return value.strip().lower() in GOOD_LABELS
    raise PipelineError(f"{where}: field '{field}' must be true/false, 1/0, \"up\"/\"down\" or \"good\"/\"bad\", "
                        f"got {value!r}")


def has_both_labels(rows: list[dict[str, Any]]) -> bool:
    """Whether rated replies hold at least one good and one bad reply (KTO needs both)."""
    return {row["label"] for row in rows} == {True, False}


def _reply(row: dict[str, Any], field: str, where: str) -> str:
    if field not in row:
        raise PipelineError(f"{where}: missing field '{field}'")
    value = row[field]
    if value is None:
        raise PipelineError(f"{where}: field '{field}' is empty")
    if not isinstance(value, str):
        raise PipelineError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _prompt(row: dict[str, Any], field: str, where: str, data: PrepareDataParams) -> list[dict[str, str]]:
    """A string prompt as one user turn, or a list of messages ending with a user turn."""
    if field not in row:
        raise PipelineError(f"{where}: missing field '{field}'")
    value = row[field]
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        messages = []
        for k, m in enumerate(value):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise PipelineError(f"{where}: {field}[{k}] must be a {{role, content}} message with a role in "
                                    f"{list(ROLES)}")
            messages.append({"role": m["role"], "content": m["content"]})
        if messages[-1]["role"] != "user":
            raise PipelineError(f"{where}: the last of '{field}' must be a user message")
    else:
        raise PipelineError(f"{where}: field '{field}' must be a string or a non-empty list of messages")
    messages = [{**m, "content": clean_text(m["content"], data)} for m in messages]
    if any(not m["content"] for m in messages):
        raise PipelineError(f"{where}: field '{field}' is empty")
    return messages


def assign_splits(pairs: list[dict[str, Any]], sft: dict[str, list[dict[str, Any]]],
                  data: PrepareDataParams) -> dict[str, list[dict[str, Any]]]:
    """Each pair into the SFT split of its prompt, or by a seeded hash of the prompt."""
    known = {prompt_key(row["messages"][:-1]): split for split in SPLITS for row in sft.get(split, [])}
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for pair in pairs:
        key = prompt_key(pair["prompt"])
        splits[known.get(key) or _hashed_split(key, data)].append(pair)
    return splits


def _hashed_split(key: str, data: PrepareDataParams) -> str:
    """The split prepare_data would give a row with this prompt (ftpipe.splits)."""
    from ftpipe.splits import hashed_split

    return hashed_split(key, seed=data.seed, test_fraction=data.test_fraction, val_fraction=data.val_fraction)


def cap_train(splits: dict[str, list[dict[str, Any]]], max_train: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """At most `max_train` training pairs (0: all), a seeded draw kept in file order."""
    train = splits["train"]
    if max_train and len(train) > max_train:
        keep = set(random.Random(seed).sample(range(len(train)), max_train))
        splits = {**splits, "train": [p for i, p in enumerate(train) if i in keep]}
    return splits


def as_record(pair: dict[str, Any]) -> dict[str, Any]:
    """The pair (prompt + chosen reply) or rated reply (prompt + reply, good or bad) as an SFT-style
    record, what the leak check compares."""
    reply = pair["chosen"] if "chosen" in pair else pair["completion"]
    return {"id": pair["id"], "messages": [*pair["prompt"], {"role": "assistant", "content": reply}]}


def check_leaks(splits: dict[str, list[dict[str, Any]]], extra_eval: dict[str, list[dict[str, Any]]],
                data: PrepareDataParams) -> tuple[dict[str, list[dict[str, Any]]], list]:
    """(splits, leaks): evaluation pairs (and `extra_eval`, the SFT evaluation rows) checked against the
    training pairs; prepare_data.leak_action decides: fail stops, drop removes the leaking training
    pairs, warn keeps them."""
    from ftpipe.leaks import find_leaks

    eval_sets = {f"preference_{s}": [as_record(p) for p in splits[s]] for s in ("val", "test")} | extra_eval

    def check(train: list[dict[str, Any]]) -> list:
        return find_leaks([as_record(p) for p in train], eval_sets, threshold=data.near_dup_threshold,
                          ngram=data.ngram_leak, min_response_words=data.min_leak_response_words)

    leaks = found = check(splits["train"])
    if leaks and data.leak_action == "fail":
        raise PipelineError(f"{len(leaks)} preference pair(s) leak between training and evaluation, first: "
                            f"{leaks[0].short()} (prepare_data.leak_action: fail; drop removes the training pairs)")
    # A leak names one training row per evaluation row: checked again until none is left, as
    # prepare_data does, so that drop leaves no leak in what is trained on (the gate counts on it).
    while leaks and data.leak_action == "drop":
        leaking = {leak.train_id for leak in leaks}
        splits = {**splits, "train": [p for p in splits["train"] if p["id"] not in leaking]}
        leaks = check(splits["train"])
    return splits, found


def self_pairs(sft: dict[str, list[dict[str, Any]]], model, tokenizer, *, max_new_tokens: int,
               batch_size: int) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    """Pairs from the SFT rows: the reference reply chosen, the model's greedy reply rejected;
    (splits, pairs left out by reason). One generation pass over every split's prompts."""
    from ftpipe.chat import prompt_text
    from ftpipe.cleaning import norm_key
    from ftpipe.metrics import generate

    rows = [(split, row) for split in SPLITS for row in sft[split]]
    replies = generate(model, tokenizer, [prompt_text(tokenizer, row["messages"]) for _, row in rows],
                       max_new_tokens=max_new_tokens, batch_size=batch_size, progress="generate (rejected replies)")
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    dropped = {"empty_rejected": 0, "rejected_equals_chosen": 0}
    for (split, row), rejected in zip(rows, replies):
        chosen = row["messages"][-1]["content"]
        if not rejected:
            dropped["empty_rejected"] += 1
        elif norm_key(rejected) == norm_key(chosen):  # the base already answers this: nothing to prefer
            dropped["rejected_equals_chosen"] += 1
        else:
            splits[split].append({"id": row["id"], "prompt": row["messages"][:-1], "chosen": chosen,
                                  "rejected": rejected, "origin": f"{split}/{row['id']}"})
    return splits, dropped
