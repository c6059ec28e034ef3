"""prepare_data: sources, cleaning, group-aware split, overlap check, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import qa_rows, set_param, stage, write_jsonl

from ftpipe.cleaning import NearDuplicates
from ftpipe.errors import PipelineError
from ftpipe.io import read_jsonl
from ftpipe.params import PrepareDataParams
from ftpipe.paths import SPLITS
from stages.prepare_data import Tally, clean, deduplicate, run, split


def params(path: Path | None = None, **kw) -> PrepareDataParams:
    source = kw.pop("source", "file" if path else "embedded")
    return PrepareDataParams(source=source, path=str(path) if path else None, **kw)


def conv(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
            "origin": "test"}


def do_run(tmp_path: Path, p: PrepareDataParams, tokenizer=None) -> dict:
    return run(params=p, out_dir=tmp_path / "prepared", reports_dir=tmp_path / "reports", tokenizer=tokenizer)


def test_clean_strips_and_drops_empty_then_dedup_counts_each_kind():
    records = [conv(" hi ", "hello "), conv("hi", "hello"), conv("", "x"), conv("q", "  "), conv("HI!", "Hello."),
               conv("hi", "other")]
    tally = Tally()
    kept = clean(records, params(), tally)
    kept, clusters = deduplicate(kept, NearDuplicates(0.8), tally)
    assert [r["messages"][1]["content"] for r in kept] == ["hello", "other"]
    assert tally.counts["empty"] == {"dropped": 2}
    assert tally.counts["duplicate_exact"] == {"dropped": 1}
    assert tally.counts["duplicate_normalized"] == {"dropped": 1}
    assert clusters == 2


def test_text_rules_each_counted_with_examples():
    records = [conv("cafe\u0301  menu\x07", "<b>bold</b> &amp; mail me at a.b@example.com or +44 20 7946 0958")]
    tally = Tally()
    p = params(strip_markup=True, scrub_pii=True)
    (out,) = clean(records, p, tally)
    assert out["messages"][0]["content"] == "caf\u00e9 menu"
    assert out["messages"][1]["content"] == "bold & mail me at <EMAIL> or <PHONE>"
    for rule in ("normalize_unicode", "strip_control", "strip_markup", "scrub_pii"):
        assert tally.counts[rule] == {"changed": 1}, rule
        assert tally.examples[rule]
    assert tally.counts["collapse_whitespace"] == {"changed": 2}  # counted per turn: both turns changed
    # Off by default: markup and PII stay.
    (plain,) = clean(records, params(), Tally())
    assert "<b>" in plain["messages"][1]["content"] and "@example.com" in plain["messages"][1]["content"]


def test_near_duplicates_keep_one_per_cluster():
    base = "how do i reset my password on the company laptop when it is locked"
    records = [conv(base, "call it support"), conv(base.replace("company", "office"), "call it support"),
               conv("what is the tallest mountain in the whole wide world today", "everest")]
    tally = Tally()
    kept, clusters = deduplicate(records, NearDuplicates(0.8), tally)
    assert clusters == 2 and len(kept) == 2 and tally.counts["near_duplicate"] == {"dropped": 1}


def test_split_is_deterministic_and_keeps_groups_together():
    records = [conv(f"prompt {i % 40}", f"answer {i}") for i in range(200)]
    a, groups, _ = split(records, params(val_fraction=0.1, test_fraction=0.2), NearDuplicates(0.8))
    b, _, _ = split(records, params(val_fraction=0.1, test_fraction=0.2), NearDuplicates(0.8))
    assert a == b and groups == 40
    assert split(records, params(seed=4, val_fraction=0.1, test_fraction=0.2), NearDuplicates(0.8))[0] != a
    prompts = {name: {r["messages"][0]["content"] for r in a[name]} for name in SPLITS}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert sum(len(a[n]) for n in SPLITS) == 200


def test_growing_the_data_never_moves_a_trained_row_into_val_or_test():
    def rows(n: int, offset: int = 0) -> list[dict]:
        # Every fifth prompt repeats an earlier one, and every tenth row shares a long answer with
        # rows of other prompts: groups of several rows exist, whose rows draw different splits, and grow.
        long = "the shared long answer of family {} goes on for many words here"
        return [conv(f"question number {(i if i % 5 else i // 5)} about topic {i % 7}",
                     long.format(i % 13) if i % 10 == 3 else f"answer {i}") for i in range(offset, offset + n)]

    p = params(val_fraction=0.1, test_fraction=0.2)
    before, _, _ = split(rows(1000), p, NearDuplicates(0.8))
    # 10 % more rows: new groups, and new rows that join existing groups (their prompts repeat).
    after, _, reassigned = split(rows(1000) + rows(100, offset=1000), p, NearDuplicates(0.8))
    key = lambda r: tuple(m["content"] for m in r["messages"])  # noqa: E731
    trained = {key(r) for r in before["train"]}
    moved = [key(r) for name in ("val", "test") for r in after[name] if key(r) in trained]
    assert not moved
    evaluated = {key(r) for name in ("val", "test") for r in before[name]}
    assert evaluated - {key(r) for name in ("val", "test", "train") for r in after[name]} == set()
    assert 0.15 < len(after["test"]) / 1100 < 0.25 and 0.05 < len(after["val"]) / 1100 < 0.15
    assert reassigned > 0  # groups whose rows drew different splits: counted in reports/data.json


def test_rows_sharing_a_long_response_stay_in_one_split_and_short_ones_do_not_group():
    long = "canned answer {} is long enough to count as a leak"  # 10 words: no 13-gram links them
    records = [conv(f"prompt {i}", long.format(i % 40) if i < 120 else "Yes.") for i in range(200)]
    out, groups, _ = split(records, params(val_fraction=0.1, test_fraction=0.2), NearDuplicates(0.8))
    assert groups == 40 + 80
    answers = {name: {r["messages"][1]["content"] for r in out[name]} - {"Yes."} for name in SPLITS}
    assert not answers["train"] & answers["test"] and not answers["train"] & answers["val"]
    assert not answers["val"] & answers["test"]


def test_run_without_leaks_writes_an_empty_leaks_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "raw.jsonl", qa_rows(30))
    assert do_run(tmp_path, params(path)).leaks.total == 0
    assert (tmp_path / "reports" / "leaks.jsonl").read_text() == ""


def test_jsonl_run_writes_splits_and_report(tmp_path, tiny_data):
    report = do_run(tmp_path, params(tiny_data, val_fraction=0.1, test_fraction=0.1))
    assert report.rows_in == 91
    assert report.rules["empty"] == {"dropped": 1} and report.rules["duplicate_exact"] == {"dropped": 10}
    assert report.rows_out == 80 and sum(report.splits.values()) == 80
    assert report.leaks.total == 0
    rows = {name: read_jsonl(tmp_path / "prepared" / f"{name}.jsonl") for name in SPLITS}
    assert {name: len(r) for name, r in rows.items()} == report.splits
    assert rows["test"][0]["messages"][-1]["role"] == "assistant" and rows["test"][0]["id"].startswith("test-")
    assert json.loads((tmp_path / "reports" / "data.json").read_text()) == report.model_dump(mode="json")
    assert "| duplicate_exact | 10 | dropped |" in (tmp_path / "reports" / "data_report.md").read_text()


def test_length_filters_use_the_base_tokenizer(tmp_path, tiny_model_dir):
    from ftpipe.models import load_tokenizer

    rows = qa_rows(30) + [{"prompt": "long one", "response": " ".join(["word"] * 300)}]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    report = do_run(tmp_path, params(path, max_tokens=64, min_tokens=2), tokenizer=load_tokenizer(tiny_model_dir))
    assert report.rules["too_long"] == {"dropped": 1} and report.token_filters is True
    assert report.rows_out == 30 - report.rules.get("too_short", {}).get("dropped", 0)


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
        assert report.rows_out == 30, source


def test_messages_field(tmp_path):
    rows = [{"chat": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
            for i in range(30)]
    report = do_run(tmp_path, params(write_jsonl(tmp_path / "chat.jsonl", rows), messages_field="chat"))
    assert report.rows_out == 30


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
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\n{"prompt": "A!", "response": "b"}\n',
         r"raw.jsonl: no usable rows after cleaning|too few to fill"),
        (b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "' + b"x" * 1_048_576 + b'"}\n',
         r"raw.jsonl:2: record of 1,048,577 characters exceeds prepare_data.max_record_chars \(100,000\)"),
        (b'{"question": "a", "response": "b"}\n', r"raw.jsonl:1: missing field 'prompt' \(fields: question, response\)"),
        (b'{"prompt": ["a"], "response": "b"}\n', r"raw.jsonl:1: field 'prompt' must be a string, got list"),
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
    assert report.rows_in == 2307
    assert report.rules["malformed"] == {"dropped": 1}
    assert report.rules["duplicate_exact"] == {"dropped": 2306 - 1176}
    assert report.rows_out <= 1176 - report.rules["near_duplicate"]["dropped"]
    assert report.leaks.total == 0


def test_csv_with_utf8_bom_reads_its_first_header(tmp_path):
    path = tmp_path / "excel.csv"
    with path.open("w", newline="", encoding="utf-8-sig") as handle:  # Excel's "CSV UTF-8"
        writer = csv.DictWriter(handle, fieldnames=["prompt", "response"])
        writer.writeheader()
        writer.writerows(qa_rows(30))
    assert do_run(tmp_path, params(path)).rows_out == 30


def test_missing_field_message_never_echoes_file_content(tmp_path):
    passwd = tmp_path / "passwd.csv"
    passwd.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    with pytest.raises(PipelineError, match=r"passwd.csv:2: missing field 'prompt' \(fields: 1 not shown\)$") as err:
        do_run(tmp_path, params(passwd))
    assert "root:" not in str(err.value) and "/bin/bash" not in str(err.value)
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join([f"col{i}" for i in range(25)] + ["k=s3cr3t!"]) + "\n" + ",".join("x" * 26) + "\n")
    with pytest.raises(PipelineError, match=r"\(fields: col0, col1, .*, col19, 6 more not shown\)$") as err:
        do_run(tmp_path, params(wide))
    assert "s3cr3t" not in str(err.value)


def _raw_project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    (proj / "data" / "raw").mkdir(parents=True)
    write_jsonl(proj / "data" / "raw" / "ok.jsonl", qa_rows(3))
    return proj


def test_data_outside_data_raw_is_refused(tmp_path):
    from ftpipe.sources import check_data_location

    proj = _raw_project(tmp_path)
    outside = write_jsonl(tmp_path / "outside.jsonl", qa_rows(3))
    hint = r", outside data/raw/: put the data under data/raw/, where DVC hashes it \(so a change reruns the pipeline\)$"
    with pytest.raises(PipelineError, match=rf"^prepare_data.path: {outside} resolves to {outside}{hint}"):
        check_data_location(params(outside), proj)
    (proj / "data" / "raw" / "link.jsonl").symlink_to(outside)
    with pytest.raises(PipelineError, match=rf"^prepare_data.path: data/raw/link.jsonl resolves to {outside}{hint}"):
        check_data_location(params(Path("data/raw/link.jsonl")), proj)
    with pytest.raises(PipelineError, match=r"^prepare_data.external_eval\[1\]: \.\./outside.jsonl resolves to"):
        check_data_location(params(Path("data/raw/ok.jsonl"), external_eval=["data/raw/ok.jsonl", "../outside.jsonl"]),
                            proj)
    with pytest.raises(PipelineError, match=r"^prepare_data.path: \./saved resolves to .*, outside data/raw/"):
        check_data_location(params("./saved", source="hf_dataset"), proj)


def test_data_under_data_raw_and_hub_names_pass(tmp_path):
    from ftpipe.sources import check_data_location

    proj = _raw_project(tmp_path)
    check_data_location(params(Path("data/raw/ok.jsonl"), external_eval=["data/raw/ok.jsonl"]), proj)
    check_data_location(params(proj / "data" / "raw" / "ok.jsonl"), proj)
    check_data_location(params(Path("data/raw/saved"), source="hf_dataset"), proj)
    check_data_location(params(Path("someone/some-dataset"), source="hf_dataset"), proj)
    check_data_location(params(Path("data/raw/absent.jsonl")), proj)  # the loader says "not found"


def test_stage_refuses_a_symlink_out_of_data_raw_without_showing_its_content(project):
    (project / "data" / "raw" / "x.csv").symlink_to("/etc/passwd")
    set_param(project, "prepare_data", "path", "data/raw/x.csv")
    result = stage(project, "prepare_data")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: prepare_data.path: data/raw/x.csv resolves to {Path('/etc/passwd').resolve()}, outside data/raw/: "
        "put the data under data/raw/, where DVC hashes it (so a change reruns the pipeline)"]
    assert "root:" not in result.stdout + result.stderr
    assert not (project / "data" / "prepared").exists()
