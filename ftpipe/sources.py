"""Raw data sources, normalized to one schema: a list of chat messages per record.

Every record comes back as {"messages": [{"role", "content"}, ...], "origin": "file:line"}; the
last message is the assistant's reply. Bad rows fail with the file and line (or row) they are on.
"""

from __future__ import annotations

import csv
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftpipe.errors import PipelineError
from ftpipe.io import iter_jsonl
from ftpipe.params import PrepareDataParams
from ftpipe.paths import RAW_DIR

ROLES = {"system", "user", "assistant"}
CSV_FIELD_LIMIT = 16 * 1024 * 1024  # csv's default 128 KiB cell limit is too small for long documents
# Keys shown in a "missing field" error: a non-data file read as CSV has its first line as keys,
# and that line must not be echoed (a passwd entry, a secret).
FIELD_NAME = re.compile(r"[A-Za-z_][\w .-]{0,63}")
FIELDS_SHOWN = 20
RAW_HINT = f"put the data under {RAW_DIR}/, where DVC hashes it (so a change reruns the pipeline)"


def check_data_location(params: PrepareDataParams, project_dir: Path) -> None:
    """Refuse data files (symlinks followed) outside data/raw/: DVC hashes only that folder, so data
    elsewhere could change without rerunning the pipeline, or be any file the user can read."""
    places = [(f"prepare_data.external_eval[{i}]", path, False) for i, path in enumerate(params.external_eval)]
    if params.source == "file":
        places.insert(0, ("prepare_data.path", params.path, False))
    elif params.source == "hf_dataset":
        places.insert(0, ("prepare_data.path", params.path, True))
    for key, given, hub_allowed in places:
        check_under_raw(key, given, project_dir, hub_allowed=hub_allowed)


def check_under_raw(key: str, given: str, project_dir: Path, *, hub_allowed: bool = False) -> None:
    """The data file `given` (param `key`) must resolve, symlinks followed, under data/raw/. A missing
    file is left to its loader's "not found"; with `hub_allowed` a missing name is a Hub dataset,
    unless it looks like a local path."""
    path = project_dir / given
    if not path.exists():
        parents = [project_dir / parent for parent in Path(given).parents if parent != Path(".")]
        local = given.startswith((".", "/")) or any(parent.exists() for parent in parents)
        if not hub_allowed or not local:
            return
    resolved, raw = path.resolve(), (project_dir / RAW_DIR).resolve()
    if not resolved.is_relative_to(raw):
        raise PipelineError(f"{key}: {given} resolves to {resolved}, outside {RAW_DIR}/: {RAW_HINT}")


def load_records(params: PrepareDataParams) -> tuple[list[dict[str, Any]], dict[str, int], str]:
    """(records, rows dropped as malformed, description of the source)."""
    if params.source == "embedded":
        return _chatterbot(params.language)
    rows, described = _rows(params)
    records = [{"messages": to_messages(row, params, where), "origin": where} for where, row in rows]
    return records, {}, described


def _rows(params: PrepareDataParams) -> tuple[Iterator[tuple[str, dict[str, Any]]] | list, str]:
    path = Path(params.path)
    if params.source == "hf_dataset":
        return _hf_rows(params), f"datasets:{params.path}[{params.hf_split}]"
    if not path.is_file():
        raise PipelineError(f"prepare_data.path: data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return [(f"{path}:{i}", row) for i, row in iter_jsonl(path)], str(path)
    if suffix == ".csv":
        return list(_csv_rows(path)), str(path)
    if suffix == ".parquet":
        return list(_parquet_rows(path)), str(path)
    raise PipelineError(f"prepare_data.path: {path}: unsupported file type '{suffix}' (use .jsonl, .csv or .parquet)")


def _csv_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(handle)
            for row in reader:
                yield f"{path}:{reader.line_num}", row
    except UnicodeDecodeError as exc:
        raise PipelineError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise PipelineError(f"{path}: invalid CSV ({exc})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise PipelineError(f"{path}: cannot read Parquet ({exc})") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {i}", row


def _hf_rows(params: PrepareDataParams) -> Iterator[tuple[str, dict[str, Any]]]:
    import datasets

    location = Path(params.path)
    try:
        if location.is_dir():
            loaded = datasets.load_from_disk(str(location))
            if isinstance(loaded, datasets.DatasetDict):
                if params.hf_split not in loaded:
                    raise PipelineError(f"prepare_data.hf_split: '{params.hf_split}' not in {sorted(loaded)} ({location})")
                loaded = loaded[params.hf_split]
        else:
            loaded = datasets.load_dataset(params.path, split=params.hf_split)
    except PipelineError:
        raise
    except Exception as exc:  # offline hub access, missing dataset, bad folder
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PipelineError(f"prepare_data.path: cannot load dataset '{params.path}' ({first})") from None
    for i, row in enumerate(loaded, start=1):
        yield f"{params.path}[{params.hf_split}] row {i}", row


def to_messages(row: dict[str, Any], params: PrepareDataParams, where: str) -> list[dict[str, str]]:
    """Map one raw row to chat messages using the configured field names."""
    if params.messages_field:
        messages = _field(row, params.messages_field, where)
        if not isinstance(messages, list) or not messages:
            raise PipelineError(f"{where}: field '{params.messages_field}' must be a non-empty list of messages")
        out = []
        for k, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                raise PipelineError(f"{where}: {params.messages_field}[{k}] needs a role in {sorted(ROLES)}")
            out.append({"role": message["role"], "content": _text(message.get("content"), f"{params.messages_field}[{k}].content", where)})
        if out[-1]["role"] != "assistant":
            raise PipelineError(f"{where}: the last of '{params.messages_field}' must be an assistant message")
        return out
    prompt = _text(_field(row, params.prompt_field, where), params.prompt_field, where)
    response = _text(_field(row, params.response_field, where), params.response_field, where)
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _field(row: dict[str, Any], name: str, where: str) -> Any:
    if name not in row:
        shown = [k for k in row if isinstance(k, str) and FIELD_NAME.fullmatch(k)][:FIELDS_SHOWN]
        hidden = len(row) - len(shown)
        listed = ", ".join(shown + ([f"{hidden} {'more ' if shown else ''}not shown"] if hidden else [])) or "none"
        raise PipelineError(f"{where}: missing field '{name}' (fields: {listed})")
    return row[name]


def _text(value: Any, name: str, where: str) -> str:
    if value is None:
        return ""  # counted as empty by cleaning, like a blank string
    if not isinstance(value, str):
        raise PipelineError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def _chatterbot(language: str) -> tuple[list[dict[str, Any]], dict[str, int], str]:
    """Consecutive turns of chatterbot-corpus conversations as (utterance, reply) pairs."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("prepare_data.source: embedded corpus not installed (pip install chatterbot-corpus==1.3.3)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / language
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise PipelineError(f"prepare_data.language: no chatterbot-corpus files for '{language}' in {folder.parent}")
    records, malformed = [], 0
    for file in files:
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        for k, turns in enumerate(doc.get("conversations") or [], start=1):
            # One trivia.yml entry is a bare string rather than a list of turns: skip and count it.
            if not isinstance(turns, list) or len(turns) < 2 or not all(isinstance(t, str) for t in turns):
                malformed += 1
                continue
            for a, b in zip(turns, turns[1:]):
                records.append({
                    "messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}],
                    "origin": f"{language}/{file.name}#{k}",
                })
    return records, {"malformed": malformed}, f"chatterbot-corpus==1.3.3 ({language}, {len(files)} files)"
