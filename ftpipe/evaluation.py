"""What every candidate's scoring shares: the settings scores depend on, the test rows, the
general text, the few-shot prompts, and the base model's scores as score_base wrote them (refused
by evaluate when they were scored otherwise)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from ftpipe.device import Placement
from ftpipe.errors import PipelineError
from ftpipe.io import read_json, read_jsonl
from ftpipe.params import EvaluateParams
from ftpipe.paths import split_file

BASE_CANDIDATES = ("base", "fewshot")


def settings(params: EvaluateParams, placement: Placement) -> dict[str, Any]:
    """What a candidate's scores depend on besides the model: equal settings give comparable scores
    (evaluate and register read them back; the overfitting margin and threads change no score)."""
    return {"decoding": "greedy", **params.model_dump(exclude={"threads", "overfit_margin"}),
            "device": placement.device, "precision": placement.precision}


def test_rows(params: EvaluateParams, data_dir: Path) -> list[dict[str, Any]]:
    rows = read_jsonl(data_dir / split_file("test"))
    if params.max_examples:
        rows = rows[: params.max_examples]
    if not rows:
        raise PipelineError(f"{data_dir / split_file('test')}: no test rows to evaluate")
    return rows


def general_text(params: EvaluateParams) -> str:
    path = Path(params.general_text)
    if not path.is_file():
        raise PipelineError(f"evaluate.general_text: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if len(text.split()) < 2:
        raise PipelineError(f"evaluate.general_text: {path} holds no text")
    return text


def pick_shots(train_rows: list[dict[str, Any]], *, k: int, seed: int) -> list[dict[str, Any]]:
    """k training rows, the same ones for every test prompt and every run with this seed."""
    if k > len(train_rows):
        raise PipelineError(f"evaluate.few_shot_k: {k} exceeds the {len(train_rows)} training rows")
    return random.Random(seed).sample(train_rows, k)


def with_shots(messages: list[dict[str, str]], shots: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The conversation with the shots' user/assistant turns before its own (after its system message)."""
    head = messages[:1] if messages[0]["role"] == "system" else []
    turns = [m for shot in shots for m in shot["messages"] if m["role"] != "system"]
    return head + turns + messages[len(head):]


def general_perplexity(model, tokenizer, text: str, params: EvaluateParams, name: str) -> tuple[float, int]:
    from ftpipe import metrics

    context = getattr(model.config, "max_position_embeddings", None)
    if context and params.general_max_length > context:
        raise PipelineError(f"evaluate.general_max_length: {params.general_max_length} exceeds the model's "
                            f"context of {context} tokens")
    return metrics.sliding_window_perplexity(model, tokenizer, text, max_length=params.general_max_length,
                                             stride=params.general_stride, progress=f"general text ({name})")


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """sha256 of the test rows' ids and conversations: the same ids with edited texts differ."""
    import hashlib
    import json

    text = json.dumps([[r["id"], r["messages"]] for r in rows], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_base_scores(path: Path, params: EvaluateParams, placement: Placement, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """score_base's report, refused when its settings or test rows are not this evaluation's: a
    comparison must hold every candidate to the same prompts, settings and metrics. The placement
    is the resolved one (inference.device auto on another machine may resolve otherwise), which DVC
    cannot see as a change: hence `-f`."""
    if not path.is_file():
        raise PipelineError(f"{path}: not found: the base model's scores come first (`dvc repro score_base`)")
    found = read_json(path)
    wanted = settings(params, placement)
    differ = [k for k in wanted if found.get("settings", {}).get(k) != wanted[k]]
    if differ:
        key = differ[0]
        raise PipelineError(f"{path}: scored with {key} {found.get('settings', {}).get(key)!r}, this evaluation "
                            f"uses {wanted[key]!r}: run `dvc repro -f score_base`")
    if found.get("test_rows_sha256") != rows_digest(rows):
        raise PipelineError(f"{path}: scored on other test rows than data/prepared/test.jsonl holds now: "
                            "run `dvc repro -f score_base`")
    return found
