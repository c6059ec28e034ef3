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


def test_identical_long_answers_leak_whatever_the_prompt_but_common_short_ones_do_not():
    from ftpipe.cleaning import jaccard, shingles, words

    rng = random.Random(4)
    train = make_train()
    # Short prompts with answers of 8-10 words: too short for a 13-gram, and one edited prompt word
    # keeps the pair's Jaccard under 0.8.
    train += [row(f"a{i}", sentence(rng, 3), sentence(rng, rng.randint(8, 10))) for i in range(10)]
    common = ["Yes.", "I don't know.", "No.", "Thank you very much."]
    train += [row(f"s{i}", sentence(rng, 6), common[i % 4]) for i in range(40)]
    planted = []
    for i, r in enumerate(train[200:210]):
        prompt, answer = (m["content"] for m in r["messages"])
        edited = prompt.split()
        edited[1] = "zzedited"
        answer = answer if i % 2 else answer.upper() + "!"  # identical once normalized
        planted.append(row(f"p{i}", " ".join(edited), answer))
        assert jaccard(shingles(words(r["messages"][0]["content"] + "\n" + r["messages"][1]["content"])),
                       shingles(words(" ".join(edited) + "\n" + answer))) < 0.8
    shorts = [row(f"q{i}", sentence(rng, 6), common[i % 4]) for i in range(40)]
    evals = {"test": planted + shorts}
    leaks = find_leaks(train, evals, threshold=0.8, ngram=13)
    assert {x.eval_id: (x.kind, x.train_id) for x in leaks} == {f"p{i}": ("same_response", f"a{i}") for i in range(10)}
    assert find_leaks(train, evals, threshold=0.8, ngram=13, min_response_words=13) == []


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
    assert reports["warn"].leaks.exact_pair == 1 and reports["warn"].train_rows_dropped_for_leaks == 0
    assert reports["drop"].train_rows_dropped_for_leaks == 1
    assert reports["drop"].splits["train"] == reports["warn"].splits["train"] - 1
    text = (tmp_path / "r-drop" / "data_report.md").read_text()
    assert "| exact_pair | external:benchmark.jsonl/000000" in text


def test_drop_that_empties_train_fails_cleanly(tmp_path, data_with_external):
    data, _ = data_with_external
    params = PrepareDataParams(source="file", path=str(data), external_eval=[str(data)], leak_action="drop")
    with pytest.raises(PipelineError, match=r"dropping leaking rows left no training rows"):
        run(params=params, out_dir=tmp_path / "prepared", reports_dir=tmp_path / "reports")
    assert not (tmp_path / "prepared").exists()


def test_every_leak_goes_to_leaks_jsonl_and_fail_says_how_many_and_where(tmp_path):
    import json

    train = make_train(120)
    raw = [{"prompt": r["messages"][0]["content"], "response": r["messages"][1]["content"]} for r in train]
    data = write_jsonl(tmp_path / "raw.jsonl", raw)
    external = write_jsonl(tmp_path / "benchmark.jsonl", raw[:40])  # those that land in train leak
    params = PrepareDataParams(source="file", path=str(data), external_eval=[str(external)], leak_action="warn")
    reports = tmp_path / "reports"
    n = run(params=params, out_dir=tmp_path / "prepared", reports_dir=reports).leaks.total
    assert n > 20
    rows = [json.loads(line) for line in (reports / "leaks.jsonl").read_text().splitlines()]
    assert len(rows) == n and len({r["eval_id"] for r in rows}) == n
    assert set(rows[0]) == {"kind", "eval_set", "eval_id", "train_id", "eval_text", "train_text"}
    assert rows[0]["kind"] == "exact_pair" and rows[0]["eval_set"] == "external:benchmark.jsonl"
    text = (reports / "data_report.md").read_text()
    assert text.count("| exact_pair | external:benchmark.jsonl/") == 20
    assert f"{n - 20} more leak(s) not shown: all {n} are in {reports}/leaks.jsonl." in text

    failing = tmp_path / "failing"
    with pytest.raises(PipelineError, match=rf"^prepare_data: {n} evaluation row\(s\) leak .*set it to warn to "
                                            rf"list all {n} in {failing}/leaks.jsonl") as err:
        run(params=params.model_copy(update={"leak_action": "fail"}), out_dir=tmp_path / "p2", reports_dir=failing)
    assert "\n" not in str(err.value) and not failing.exists() and not (tmp_path / "p2").exists()
