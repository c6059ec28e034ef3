"""prepare_data: sources, cleaning, group-aware split, overlap check, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import qa_rows, write_jsonl

from ftpipe.errors import PipelineError
from ftpipe.io import read_jsonl
from ftpipe.params import PrepareDataParams
from stages.prepare_data import SPLITS, clean, overlaps, run, split


def params(path: Path | None = None, **kw) -> PrepareDataParams:
    source = kw.pop("source", "file" if path else "embedded")
    return PrepareDataParams(source=source, path=str(path) if path else None, **kw)


def conv(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "origin": "test"}


def do_run(tmp_path: Path, p: PrepareDataParams) -> dict:
    return run(params=p, out_dir=tmp_path / "prepared", report_path=tmp_path / "reports" / "data.json")


def test_clean_strips_drops_empty_and_exact_duplicates():
    records = [conv(" hi ", "hello "), conv("hi", "hello"), conv("", "x"), conv("q", "  "), conv("hi", "other")]
    kept, dropped = clean(records, system_prompt=None)
    assert [r["messages"][1]["content"] for r in kept] == ["hello", "other"]
    assert dropped == {"duplicate": 1, "empty": 2}


def test_system_prompt_is_prepended():
    kept, _ = clean([conv("a", "b")], system_prompt="Be brief.")
    assert kept[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_split_is_deterministic_and_keeps_prompt_groups_together():
    records = [conv(f"prompt {i % 40}", f"answer {i}") for i in range(200)]
    a = split(records, seed=3, val_fraction=0.1, test_fraction=0.2)
    b = split(records, seed=3, val_fraction=0.1, test_fraction=0.2)
    assert a == b
    assert split(records, seed=4, val_fraction=0.1, test_fraction=0.2) != a
    prompts = {name: {r["messages"][0]["content"] for r in a[name]} for name in SPLITS}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert sum(len(a[n]) for n in SPLITS) == 200
    assert overlaps(a) == []


def test_overlap_check_finds_shared_prompts_and_conversations():
    splits = {"train": [conv("a", "1"), conv("b", "2")], "val": [conv("c", "3")], "test": [conv("a", "1")]}
    found = overlaps(splits)
    assert any("prompt(s) in both train and test" in f for f in found)
    assert any("conversation(s) in both train and test" in f for f in found)


def test_jsonl_run_writes_splits_and_report(tmp_path, tiny_data):
    report = do_run(tmp_path, params(tiny_data, val_fraction=0.1, test_fraction=0.1))
    assert report["rows_in"] == 91 and report["dropped"] == {"malformed": 0, "empty": 1, "duplicate": 10}
    assert report["rows_out"] == 80 and sum(report["splits"].values()) == 80
    rows = {name: read_jsonl(tmp_path / "prepared" / f"{name}.jsonl") for name in SPLITS}
    assert {name: len(r) for name, r in rows.items()} == report["splits"]
    assert rows["test"][0]["messages"][-1]["role"] == "assistant" and rows["test"][0]["id"].startswith("test-")
    assert json.loads((tmp_path / "reports" / "data.json").read_text()) == report


def test_csv_parquet_and_saved_dataset_sources(tmp_path):
    import datasets

    rows = [{"q": r["prompt"], "a": r["response"]} for r in qa_rows(30)]
    csv_path = tmp_path / "raw.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["q", "a"])
        writer.writeheader()
        writer.writerows(rows)
    parquet_path = tmp_path / "raw.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet_path))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    for i, (source, path) in enumerate([("file", csv_path), ("file", parquet_path), ("hf_dataset", saved)]):
        out = tmp_path / f"run{i}"
        out.mkdir()
        report = do_run(out, params(path, source=source, prompt_field="q", response_field="a"))
        assert report["rows_out"] == 30, source


def test_messages_field(tmp_path):
    rows = [{"chat": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(30)]
    report = do_run(tmp_path, params(write_jsonl(tmp_path / "chat.jsonl", rows), messages_field="chat"))
    assert report["rows_out"] == 30


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', r"raw.jsonl:2: invalid JSON"),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', r"raw.jsonl:2: missing field 'response'"),
        (b'{"prompt": "a", "response": 5}\n', r"raw.jsonl:1: field 'response' must be a string, got int"),
        (b'{"prompt": "a", "response": "b"}\n\xff\xfe\n', r"raw.jsonl:2: not UTF-8"),
        (b'["a", "b"]\n', r"raw.jsonl:1: expected a JSON object"),
        (b'{"prompt": " ", "response": "b"}\n{"prompt": "", "response": "c"}\n',
         r"raw.jsonl: no usable rows after cleaning \(rows in: 2; dropped: empty=2\)"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, content, message):
    path = tmp_path / "raw.jsonl"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match=message) as err:
        do_run(tmp_path, params(path))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "reports").exists()
    assert not list(tmp_path.glob(".prepared*"))


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(PipelineError, match=r"prepare_data.path: data file not found: .*absent.jsonl"):
        do_run(tmp_path, params(tmp_path / "absent.jsonl"))
    (tmp_path / "raw.txt").write_text("x")
    with pytest.raises(PipelineError, match=r"unsupported file type '.txt'"):
        do_run(tmp_path, params(tmp_path / "raw.txt"))


def test_too_few_rows_to_split(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", qa_rows(2))
    with pytest.raises(PipelineError, match=r"2 usable rows are too few to fill the"):
        do_run(tmp_path, params(path))


def test_embedded_chatterbot_corpus(tmp_path):
    report = do_run(tmp_path, params())
    # 2,306 utterance/reply pairs plus one malformed trivia entry; only 1,176 pairs are distinct.
    assert report["rows_in"] == 2307
    assert report["dropped"] == {"malformed": 1, "empty": 0, "duplicate": 1130}
    assert report["rows_out"] == 1176
