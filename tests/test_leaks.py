"""Leak checks catch every planted leak kind, and a clean control set of the same size raises none."""

from __future__ import annotations

import random

import pytest
from conftest import write_jsonl

from ftpipe.errors import PipelineError
from ftpipe.leaks import find_leaks
from ftpipe.params import PrepareDataParams
from stages.prepare_data import run

SYLLABLES = "ka lo mi ne ru sa te vo zi pa do fe gu hi ja".split()
VOCAB = [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES[:5]]  # 1,125 words


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def row(rid: str, prompt: str, response: str) -> dict:
    return {"id": rid, "origin": rid, "messages": [{"role": "user", "content": prompt},
                                                    {"role": "assistant", "content": response}]}


def make_train(n: int = 200) -> list[dict]:
    rng = random.Random(1)
    return [row(f"t{i}", sentence(rng, rng.randint(8, 16)), sentence(rng, rng.randint(14, 30))) for i in range(n)]


def planted(train: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """Eval rows that each leak one train row in a known way, plus clean filler: (rows, id -> kind)."""
    rng = random.Random(2)
    p = lambda r: r["messages"][0]["content"]  # noqa: E731
    a = lambda r: r["messages"][1]["content"]  # noqa: E731
    words = p(train[3]).split()
    words[len(words) // 2] = "zzedited"
    shared = a(train[5]).split()[:13]
    leaks = [
        row("exact", p(train[0]), a(train[0])),
        row("exact_prompt", p(train[1]), "a different answer entirely"),
        row("case", p(train[2]).upper() + " ?!", "  " + a(train[2]).title() + "."),
        row("one_word", " ".join(words), a(train[3])),
        row("ngram", sentence(rng, 10), sentence(rng, 6) + " " + " ".join(shared) + " " + sentence(rng, 6)),
    ]
    expected = {"exact": "exact_pair", "exact_prompt": "exact_prompt", "case": "normalized_pair",
                "one_word": "near_pair", "ngram": "ngram"}
    filler = [row(f"e{i}", sentence(rng, 12), sentence(rng, 20)) for i in range(45)]
    return leaks + filler, expected


def test_every_planted_leak_is_caught_with_its_kind():
    train = make_train()
    evals, expected = planted(train)
    leaks = find_leaks(train, {"test": evals}, threshold=0.8, ngram=13)
    assert {leak.eval_id: leak.kind for leak in leaks} == expected


def test_clean_control_set_of_the_same_size_raises_none():
    train = make_train()
    rng = random.Random(3)
    control = [row(f"c{i}", sentence(rng, 12), sentence(rng, 20)) for i in range(50)]
    assert find_leaks(train, {"test": control}, threshold=0.8, ngram=13) == []


@pytest.fixture
def data_with_external(tmp_path):
    train = make_train(120)
    raw = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in train]
    data = write_jsonl(tmp_path / "raw.jsonl", raw)
    external = write_jsonl(tmp_path / "benchmark.jsonl", [raw[7], {"prompt": "fresh question", "response": "fresh"}])
    return data, external


def test_external_eval_file_overlapping_train_fails_the_stage(tmp_path, data_with_external):
    data, external = data_with_external
    params = PrepareDataParams(source="file", path=str(data), external_eval=[str(external)])
    with pytest.raises(PipelineError, match=r"1 evaluation row\(s\) leak from train, e.g. exact_pair: external:benchmark"):
        run(params=params, out_dir=tmp_path / "prepared", reports_dir=tmp_path / "reports")
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "reports").exists()


def test_warn_keeps_and_drop_removes_the_leaking_training_rows(tmp_path, data_with_external):
    data, external = data_with_external
    reports = {}
    for action in ("warn", "drop"):
        params = PrepareDataParams(source="file", path=str(data), external_eval=[str(external)], leak_action=action)
        reports[action] = run(params=params, out_dir=tmp_path / action, reports_dir=tmp_path / f"r-{action}")
    assert reports["warn"]["leaks"]["exact_pair"] == 1 and reports["warn"]["train_rows_dropped_for_leaks"] == 0
    assert reports["drop"]["train_rows_dropped_for_leaks"] == 1
    assert reports["drop"]["splits"]["train"] == reports["warn"]["splits"]["train"] - 1
    text = (tmp_path / "r-drop" / "data_report.md").read_text()
    assert "| exact_pair | external:benchmark.jsonl/000000" in text


def test_drop_that_empties_train_fails_cleanly(tmp_path, data_with_external):
    data, _ = data_with_external
    params = PrepareDataParams(source="file", path=str(data), external_eval=[str(data)], leak_action="drop")
    with pytest.raises(PipelineError, match=r"dropping leaking rows left no training rows"):
        run(params=params, out_dir=tmp_path / "prepared", reports_dir=tmp_path / "reports")
    assert not (tmp_path / "prepared").exists()
