"""Preference pairs (prepare_prefs) and DPO (dpo) on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, qa_rows, stage_env, write_jsonl
from safetensors.torch import load_file

from ftpipe.errors import PipelineError
from ftpipe.params import DpoParams, PrepareDataParams, PreparePrefsParams, validate_all


def prepared(folder: Path, n: int = 40, offset: int = 0) -> Path:
    """data/prepared-like splits of the tiny QA rows (ids as prepare_data writes them)."""
    rows = qa_rows(n, offset)
    cut = {"train": rows[: n - 10], "val": rows[n - 10: n - 5], "test": rows[n - 5:]}
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in cut.items():
        write_jsonl(folder / f"{split}.jsonl", [
            {"id": f"{split}-{i:06d}", "messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["response"]}]}
            for i, r in enumerate(part)])
    return folder


def wrong(response: str) -> str:
    """A rejected reply: the right words in the wrong order, and a wrong number."""
    words = response.split()
    return " ".join([*reversed(words[:-1]), str(int(words[-1]) + 1)])


def pairs_file(path: Path, rows: list[dict]) -> Path:
    return write_jsonl(path, [{"prompt": r["prompt"], "chosen": r["response"], "rejected": wrong(r["response"])}
                              for r in rows])


def thumbs_file(path: Path, rows: list[dict], labels: tuple = (True, False)) -> Path:
    """A rated reply per row and label: the right reply good, the wrong one bad."""
    return write_jsonl(path, [{"prompt": r["prompt"], "reply": r["response"] if good else wrong(r["response"]),
                               "label": label} for r in rows for good, label in zip((True, False), labels)])


def build(tmp_path: Path, model_dir: Path, offset: int = 0, **prefs) -> tuple:
    from stages import prepare_prefs

    data = PrepareDataParams(source="file", path="x.jsonl", leak_action=prefs.pop("leak_action", "fail"))
    params = PreparePrefsParams(**prefs)
    report = prepare_prefs.run(params=params, data=data, enabled=True, base_dir=model_dir,
                               prepared_dir=prepared(tmp_path / "prepared", offset=offset),
                               out_dir=tmp_path / "prefs", report_path=tmp_path / "preferences.json",
                               project_dir=tmp_path)
    return report, {s: [json.loads(x) for x in (tmp_path / "prefs" / f"{s}.jsonl").read_text().splitlines()]
                    for s in ("train", "val", "test")}


def test_self_generated_pairs_keep_the_sft_split_with_the_base_reply_rejected(tmp_path, talking_model):
    from ftpipe import metrics, models
    from ftpipe.chat import prompt_text

    # The random tiny model answers nothing but newlines; this one answers its 80 training rows
    # right, and these unseen prompts half right.
    model_dir = talking_model / "merged"
    report, splits = build(tmp_path, model_dir, offset=200, max_train_pairs=12, max_new_tokens=6, batch_size=8)
    assert report.pairs["train"] and report.pairs["test"]
    assert report.source == "self" and report.generated == 12 + 5 + 5
    assert sum(report.pairs.values()) + sum(report.dropped.values()) == 22
    sft = {s: {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "prepared" / f"{s}.jsonl").read_text().splitlines()}
           for s in ("train", "val", "test")}
    tokenizer, model = models.load_tokenizer(model_dir), models.load_model(model_dir)
    for split, pairs in splits.items():
        for pair in pairs:
            row = sft[split][pair["id"]]  # the same split as its SFT row
            assert pair["prompt"] == row["messages"][:-1] and pair["chosen"] == row["messages"][-1]["content"]
            greedy = metrics.generate(model, tokenizer, [prompt_text(tokenizer, row["messages"])], max_new_tokens=6,
                                      batch_size=1)[0]
            assert pair["rejected"] == greedy and pair["rejected"] != pair["chosen"]
    manifest = json.loads((tmp_path / "prefs" / "manifest.json").read_text())
    assert manifest["enabled"] and manifest["pairs"] == report.pairs


def test_file_pairs_follow_the_split_of_their_prompt_and_a_leak_is_refused(tmp_path, tiny_model_dir):
    from ftpipe import preferences

    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    rows = qa_rows(40)  # the same prompts as the SFT splits, so each pair takes its prompt's split
    pairs_file(raw / "prefs.jsonl", rows + rows[:3])  # three exact duplicates
    with (raw / "prefs.jsonl").open("a") as out:  # and a pair with nothing to prefer
        out.write(json.dumps({"prompt": "say it", "chosen": "Red cat.", "rejected": "red  CAT"}) + "\n")
    report, splits = build(tmp_path, tiny_model_dir, source="file", path="data/raw/prefs.jsonl")
    assert report.pairs == {"train": 30, "val": 5, "test": 5}
    assert report.dropped == {"duplicate": 3, "chosen_equals_rejected": 1}
    assert {p["chosen"] for p in splits["test"]} == {r["response"] for r in rows[35:]}
    assert report.generated == 0 and report.leaks["total"] == 0

    # A new prompt that differs from a test prompt by one word, hashed into train: a near-duplicate leak.
    data = PrepareDataParams(source="file", path="x.jsonl")
    variants = [f"{rows[36]['prompt']} {word}" for word in ("please", "now", "again", "today", "quickly", "slowly")]
    extra = next(v for v in variants
                 if preferences._hashed_split(preferences.prompt_key([{"role": "user", "content": v}]), data) == "train")
    pairs_file(raw / "prefs.jsonl", rows + [{"prompt": extra, "response": rows[36]["response"]}])
    before = (tmp_path / "prefs" / "train.jsonl").read_bytes()
    # The test pair leaks from it, as does the SFT test row with the same prompt.
    with pytest.raises(PipelineError, match=r"^2 preference pair\(s\) leak .* near_prompt: preference_test/line37 "
                                            r"~ train/line41 .*leak_action: fail"):
        build(tmp_path, tiny_model_dir, source="file", path="data/raw/prefs.jsonl")
    assert (tmp_path / "prefs" / "train.jsonl").read_bytes() == before  # the previous pairs are kept
    report, splits = build(tmp_path, tiny_model_dir, source="file", path="data/raw/prefs.jsonl", leak_action="drop")
    assert report.train_pairs_dropped_for_leaks == 1 and report.leaks["total"] == 2
    assert "line41" not in {p["id"] for p in splits["train"]} and report.pairs["train"] == 30


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "hi", "chosen": "yes"}, "missing field 'rejected'"),
    ({"prompt": "hi", "chosen": "yes", "rejected": ""}, "field 'rejected' is empty"),
    ({"prompt": "hi", "chosen": "yes", "rejected": " \t "}, "field 'rejected' is empty"),
    ({"prompt": "hi", "chosen": "yes", "rejected": None}, "field 'rejected' is empty"),
    ({"prompt": "hi", "chosen": ["yes"], "rejected": "no"}, "field 'chosen' must be a string, got list"),
    ({"chosen": "yes", "rejected": "no"}, "missing field 'prompt'"),
    ({"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "chosen": "a",
      "rejected": "b"}, "the last of 'prompt' must be a user message"),
])
def test_a_bad_preference_line_fails_naming_file_line_and_field(tmp_path, line, expected):
    from ftpipe.preferences import read_file

    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, line])
    with pytest.raises(PipelineError) as caught:
        read_file(path, PreparePrefsParams(source="file", path=str(path)), PrepareDataParams(source="file", path="x"))
    assert str(caught.value) == f"{path}:2: {expected}"


def test_the_stage_refuses_a_bad_file_with_one_line_and_writes_nothing(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["dpo"]["enabled"] = True
    params["prepare_prefs"].update(source="file", path="data/raw/prefs.jsonl")
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_jsonl(project / "data" / "raw" / "prefs.jsonl", [{"prompt": "hi", "chosen": "yes", "rejected": ""}])
    result = subprocess.run([sys.executable, "-m", "stages.prepare_prefs"], cwd=project, env=stage_env(),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: data/raw/prefs.jsonl:1: field 'rejected' is empty"]
    assert not (project / "data" / "preferences").exists() and not (project / "reports" / "preferences.json").exists()


def test_with_dpo_off_both_stages_write_only_a_manifest_saying_so(tmp_path):
    from stages import dpo, prepare_prefs

    prefs = prepare_prefs.run(params=PreparePrefsParams(), data=PrepareDataParams(), enabled=False,
                              base_dir=tmp_path / "none", prepared_dir=tmp_path / "none", out_dir=tmp_path / "prefs",
                              report_path=tmp_path / "preferences.json")
    trained = dpo.run(params=DpoParams(), base_dir=tmp_path / "none", adapter_dir=tmp_path / "none",
                      prefs_dir=tmp_path / "prefs", out_dir=tmp_path / "dpo", report_path=tmp_path / "dpo.json")
    assert not prefs.enabled and not trained.enabled
    assert sorted(p.name for p in (tmp_path / "prefs").iterdir()) == ["manifest.json"]
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text()) == {"enabled": False}
    from ftpipe.models import dpo_result

    # evaluate, export and register read models/dpo only with dpo on, so older projects need none.
    assert dpo_result(tmp_path / "missing", enabled=False) is None
    with pytest.raises(PipelineError, match=r"dpo: no DPO model, though dpo.enabled is true \(run `dvc repro dpo`\)"):
        dpo_result(tmp_path / "dpo", enabled=True)


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo"])
def test_dpo_after_sft_raises_the_chosen_margin_and_changes_only_the_adapted_weights(tmp_path, tiny_model_dir,
                                                                                    talking_model, loss_type):
    from ftpipe import models
    from ftpipe.dpo import logp_margin
    from stages import dpo, prepare_prefs

    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    pairs_file(raw / "prefs.jsonl", qa_rows(40, offset=200))  # prompts the SFT model has not seen
    prepare_prefs.run(params=PreparePrefsParams(source="file", path="data/raw/prefs.jsonl"),
                      data=PrepareDataParams(source="file", path="x"), enabled=True, base_dir=tiny_model_dir,
                      prepared_dir=prepared(tmp_path / "prepared", offset=200), out_dir=tmp_path / "prefs",
                      report_path=tmp_path / "preferences.json", project_dir=tmp_path)
    params = DpoParams(enabled=True, init_from="sft", max_steps=24, batch_size=8, learning_rate=1e-2, beta=0.5,
                       eval_steps=12, logging_steps=1, precision="fp32", max_length=64, warmup_ratio=0.0,
                       loss_type=loss_type)
    # talking_model: the tiny model fully fine-tuned to answer (the train stage's merged/ layout).
    report = dpo.run(params=params, base_dir=tiny_model_dir, adapter_dir=talking_model, prefs_dir=tmp_path / "prefs",
                     out_dir=tmp_path / "dpo", report_path=tmp_path / "dpo.json",
                     checkpoint_root=tmp_path / "checkpoints")
    assert report.steps == 24 and report.pairs["train"] == 30 and len(report.val_curve) == 2
    assert report.start == "sft" and 0 <= report.test_reward_accuracy <= 1

    tokenizer = models.load_tokenizer(tiny_model_dir)
    train = [json.loads(x) for x in (tmp_path / "prefs" / "train.jsonl").read_text().splitlines()]
    start, tuned = models.load_model(talking_model / "merged"), models.load_model(tmp_path / "dpo" / "merged")
    before, after = logp_margin(start, tokenizer, train, batch_size=8), logp_margin(tuned, tokenizer, train, batch_size=8)
    assert after > before + 1.0  # nats: the chosen replies became more likely relative to the rejected ones

    adapted = ("q_proj", "k_proj", "v_proj", "o_proj")
    weights_before, weights_after = start.state_dict(), tuned.state_dict()
    assert set(weights_before) == set(weights_after)
    changed = {name for name in weights_before if not (weights_before[name] == weights_after[name]).all()}
    assert all(any(m in name for m in adapted) for name in changed)  # frozen weights untouched
    assert {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in adapted} == changed
    adapter = load_file(tmp_path / "dpo" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # lora_B starts at zero
    assert json.loads((tmp_path / "dpo" / "manifest.json").read_text()) == {"enabled": True, "start": "sft"}
    assert models.dpo_result(tmp_path / "dpo", enabled=True) == tmp_path / "dpo"


def test_dpo_params_are_checked_naming_the_key(tmp_path):
    shipped = yaml.safe_load((ROOT / "params.yaml").read_text())

    def problem(edit) -> str:
        params = json.loads(json.dumps(shipped))
        edit(params)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        with pytest.raises(PipelineError) as caught:
            validate_all(path)
        return str(caught.value)

    def line_of(key: str) -> int:  # the line problem() writes `key` on, in its dumped params.yaml
        section, name = key.split(".")
        lines = (tmp_path / "params.yaml").read_text().splitlines()
        start = lines.index(f"{section}:")
        return next(i for i in range(start, len(lines)) if lines[i].strip().startswith(f"{name}:")) + 1

    for key, edit, message in [
        ("dpo.label_smoothing", lambda p: p["dpo"].update(label_smoothing=0.1), "only used by loss_type 'robust'"),
        ("dpo.loss_type", lambda p: p["dpo"].update(loss_type="kto"), "Input should be 'sigmoid', 'ipo'"),
        ("prepare_prefs.path", lambda p: p["prepare_prefs"].update(source="file"), "required when source is 'file'"),
        ("dpo.init_from", lambda p: (p["dpo"].update(enabled=True),
                                     p["train"].update(method="prompt_tuning", merge=False)),
         "'sft' needs a train method"),
        ("dpo.beta", lambda p: p["dpo"].update(beta=0), "Input should be greater than 0"),
        # KTO and thumbs: each key refused where it does not apply, and thumbs only with kto.
        ("prepare_prefs.kind", lambda p: p["prepare_prefs"].update(kind="thumbs"),
         "'thumbs' reads rated replies from a file: needs source 'file', not 'self'"),
        ("dpo.loss_type", lambda p: p["dpo"].update(method="kto", loss_type="ipo"), "a DPO loss, not used by "
                                                                                   "method 'kto'"),
        ("dpo.label_smoothing", lambda p: p["dpo"].update(method="kto", label_smoothing=0.1),
         "a DPO setting, not used by method 'kto'"),
        ("dpo.desirable_weight", lambda p: p["dpo"].update(desirable_weight=2.0), "only used by method 'kto'"),
        ("dpo.undesirable_weight", lambda p: p["dpo"].update(undesirable_weight=0), "Input should be greater than 0"),
        ("dpo.batch_size", lambda p: p["dpo"].update(method="kto", batch_size=1), "method 'kto' needs at least 2"),
        ("prepare_prefs.kind", lambda p: (p["dpo"].update(enabled=True),
                                          p["prepare_prefs"].update(kind="thumbs", source="file",
                                                                    path="data/raw/thumbs.jsonl")),
         "'thumbs' needs dpo.method: kto, not 'dpo' (DPO needs pairs)"),
    ]:
        found = problem(edit)
        assert found.startswith(f"{tmp_path / 'params.yaml'}:{line_of(key)}: {key}: {message}"), found


def test_a_thumbs_file_is_split_by_prompt_without_duplicates_or_conflicts_and_leak_checked(tmp_path,
                                                                                         tiny_model_dir):
    from ftpipe import preferences

    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    rows = qa_rows(40)  # the SFT splits' prompts: each rated reply takes its prompt's split
    thumbs_file(raw / "thumbs.jsonl", rows[:10], labels=("up", "down"))
    with (raw / "thumbs.jsonl").open("a") as out:
        for k, r in enumerate(rows[10:]):  # every spelling of a label
            good, bad = [(True, False), (1, 0), ("GOOD", "Bad"), ("Up", "DOWN")][k % 4]
            out.write(json.dumps({"prompt": r["prompt"], "reply": r["response"], "label": good}) + "\n")
            out.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}], "reply": wrong(r["response"]),
                                  "label": bad}) + "\n")
        for r in rows[:3]:  # three exact duplicates, one of them with its label spelled another way
            out.write(json.dumps({"prompt": r["prompt"], "reply": r["response"], "label": True}) + "\n")
        for label in ("up", "down"):  # a reply rated both ways: both rows left out
            out.write(json.dumps({"prompt": rows[5]["prompt"], "reply": "Maybe  so.", "label": label}) + "\n")
    report, splits = build(tmp_path, tiny_model_dir, kind="thumbs", source="file", path="data/raw/thumbs.jsonl")
    assert report.kind == "thumbs" and report.pairs == {"train": 60, "val": 10, "test": 10}
    assert report.good == {"train": 30, "val": 5, "test": 5}
    assert report.dropped == {"duplicate": 3, "conflicting": 2} and report.leaks["total"] == 0
    assert {(r["completion"], r["label"]) for r in splits["test"]} == \
        {(r["response"], True) for r in rows[35:]} | {(wrong(r["response"]), False) for r in rows[35:]}
    assert set(splits["train"][0]) == {"id", "prompt", "completion", "label", "origin"}
    assert all(r["prompt"][-1]["role"] == "user" for split in splits.values() for r in split)
    manifest = json.loads((tmp_path / "prefs" / "manifest.json").read_text())
    assert manifest["kind"] == "thumbs" and manifest["pairs"] == report.pairs
    assert preferences.as_record(splits["test"][0])["messages"][-1]["content"] == splits["test"][0]["completion"]

    # A new prompt one word away from a test prompt, hashed into train: a near-duplicate leak, refused.
    data = PrepareDataParams(source="file", path="x.jsonl")
    variants = [f"{rows[36]['prompt']} {word}" for word in ("please", "now", "again", "today", "quickly", "slowly")]
    extra = next(v for v in variants
                 if preferences._hashed_split(preferences.prompt_key([{"role": "user", "content": v}]), data) == "train")
    thumbs_file(raw / "thumbs.jsonl", rows + [{"prompt": extra, "response": rows[36]["response"]}])
    with pytest.raises(PipelineError, match=r"preference pair\(s\) leak .*near_prompt: preference_test/line73 "
                                            r"~ train/line8[12] .*leak_action: fail"):
        build(tmp_path, tiny_model_dir, kind="thumbs", source="file", path="data/raw/thumbs.jsonl")

    # KTO needs good and bad replies in every split.
    thumbs_file(raw / "thumbs.jsonl", rows[:35])
    thumbs_file(raw / "val_good.jsonl", rows[35:], labels=(True, True))
    (raw / "thumbs.jsonl").write_text((raw / "thumbs.jsonl").read_text() + (raw / "val_good.jsonl").read_text())
    with pytest.raises(PipelineError, match=r"^prepare_prefs: the test split has no bad replies \(10 rated replies, "
                                            r"all good\): KTO needs both in every split$"):
        build(tmp_path, tiny_model_dir, kind="thumbs", source="file", path="data/raw/thumbs.jsonl")


@pytest.mark.parametrize("line, expected", [
    ({"prompt": "hi", "reply": "yes", "label": "maybe"},
     "field 'label' must be true/false, 1/0, \"up\"/\"down\" or \"good\"/\"bad\", got 'maybe'"),
    ({"prompt": "hi", "reply": "yes", "label": 2}, "field 'label' must be true/false, 1/0, \"up\"/\"down\" or "
                                                   "\"good\"/\"bad\", got 2"),
    ({"prompt": "hi", "reply": "yes", "label": None}, "field 'label' must be true/false, 1/0, \"up\"/\"down\" or "
                                                      "\"good\"/\"bad\", got None"),
    ({"prompt": "hi", "reply": "yes"}, "missing field 'label'"),
    ({"prompt": "hi", "reply": " ", "label": True}, "field 'reply' is empty"),
    ({"prompt": "hi", "label": True}, "missing field 'reply'"),
])
def test_a_bad_thumbs_line_fails_naming_file_line_and_field(tmp_path, line, expected):
    from ftpipe.preferences import read_thumbs

    path = write_jsonl(tmp_path / "thumbs.jsonl", [{"prompt": "ok", "reply": "a", "label": "up"}, line])
    with pytest.raises(PipelineError) as caught:
        read_thumbs(path, PreparePrefsParams(kind="thumbs", source="file", path=str(path)),
                    PrepareDataParams(source="file", path="x"))
    assert str(caught.value) == f"{path}:2: {expected}"


def test_kto_from_thumbs_raises_the_good_replies_over_the_bad_and_changes_only_the_adapter(tmp_path, tiny_model_dir,
                                                                                          talking_model):
    from ftpipe import models
    from ftpipe.dpo import label_margin
    from stages import dpo, prepare_prefs

    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    thumbs_file(raw / "thumbs.jsonl", qa_rows(40, offset=200))  # prompts the SFT model has not seen
    prepare_prefs.run(params=PreparePrefsParams(kind="thumbs", source="file", path="data/raw/thumbs.jsonl"),
                      data=PrepareDataParams(source="file", path="x"), enabled=True, base_dir=tiny_model_dir,
                      prepared_dir=prepared(tmp_path / "prepared", offset=200), out_dir=tmp_path / "prefs",
                      report_path=tmp_path / "preferences.json", project_dir=tmp_path)
    # A lower learning rate than the DPO test's: at 1e-2 KTO overfits the 60 training replies (their
    # margin rises, the test replies' falls).
    params = DpoParams(enabled=True, method="kto", init_from="sft", max_steps=24, batch_size=8, learning_rate=3e-3,
                       beta=0.5, eval_steps=12, logging_steps=1, precision="fp32", max_length=64, warmup_ratio=0.0)
    report = dpo.run(params=params, base_dir=tiny_model_dir, adapter_dir=talking_model, prefs_dir=tmp_path / "prefs",
                     out_dir=tmp_path / "dpo", report_path=tmp_path / "dpo.json",
                     checkpoint_root=tmp_path / "checkpoints")
    print(f"KTO test log-prob margin good - bad: {report.test_logp_margin_before:+.3f} -> "
          f"{report.test_logp_margin_after:+.3f}")
    assert (report.method, report.loss_type, report.steps, report.pairs["train"]) == ("kto", "kto", 24, 60)
    assert report.test_reward_accuracy is None and report.test_loss is not None and len(report.val_curve) == 2
    assert report.test_logp_margin_after > report.test_logp_margin_before + 1.0  # nats

    tokenizer = models.load_tokenizer(tiny_model_dir)
    train = [json.loads(x) for x in (tmp_path / "prefs" / "train.jsonl").read_text().splitlines()]
    start, tuned = models.load_model(talking_model / "merged"), models.load_model(tmp_path / "dpo" / "merged")
    assert label_margin(tuned, tokenizer, train, batch_size=8) > label_margin(start, tokenizer, train, batch_size=8)
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj")
    weights_before, weights_after = start.state_dict(), tuned.state_dict()
    changed = {name for name in weights_before if not torch_equal(weights_before[name], weights_after[name])}
    assert {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in adapted} == changed  # base untouched
    assert json.loads((tmp_path / "dpo" / "train_config.json").read_text())["params"]["method"] == "kto"


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_kto_turns_each_pair_into_a_good_and_a_bad_reply():
    from ftpipe.dpo import unpaired

    pairs = [{"id": "line1", "prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b",
              "origin": "f:1"}]
    assert unpaired(pairs) == [
        {"id": "line1/chosen", "prompt": pairs[0]["prompt"], "completion": "a", "label": True, "origin": "f:1"},
        {"id": "line1/rejected", "prompt": pairs[0]["prompt"], "completion": "b", "label": False, "origin": "f:1"}]


def test_dpo_shares_the_train_schedule_keys_and_restates_only_its_own_defaults():
    from ftpipe.params import TrainParams, _Schedule

    shared = set(_Schedule.model_fields)
    assert {"seed", "learning_rate", "batch_size", "max_length", "lora_r", "precision", "threads"} <= shared
    own = {model: set(vars(model).get("__annotations__", {})) & shared for model in (TrainParams, DpoParams)}
    assert own == {TrainParams: set(), DpoParams: {"learning_rate", "warmup_ratio", "eval_steps"}}
    for key in shared:  # the same type and limits in both sections; only those defaults differ
        train_field, dpo_field = TrainParams.model_fields[key], DpoParams.model_fields[key]
        assert (train_field.annotation, train_field.metadata) == (dpo_field.annotation, dpo_field.metadata), key
        assert (train_field.get_default(call_default_factory=True) == dpo_field.get_default(call_default_factory=True)) \
            == (key not in own[DpoParams]), key


def test_train_and_dpo_trainers_get_the_schedule_the_same_way(tmp_path):
    """Both stages' arguments come from ftpipe.schedule: the shared keys land on the same arguments, and
    what differs is each trainer's own (DPO: no recomputation, the default optimizer, its pairs' uids kept)."""
    from transformers import TrainingArguments

    from ftpipe import dpo, trainer
    from ftpipe.params import TrainParams

    shared = {"seed": 7, "epochs": 2.5, "max_steps": 9, "learning_rate": 3e-4, "batch_size": 3, "grad_accum": 2,
              "warmup_ratio": 0.2, "lr_scheduler": "linear", "max_length": 128, "eval_steps": 4, "logging_steps": 2}
    sft = trainer.training_arguments(TrainParams(**shared), output_dir=tmp_path, bf16=True, optim="adamw_torch",
                                     cuda=False)
    pref = dpo.arguments(DpoParams(enabled=True, loss_type="robust", label_smoothing=0.1, beta=0.3, **shared),
                         output_dir=tmp_path, bf16=True, cuda=False)
    assert type(sft) is TrainingArguments and type(pref) is TrainingArguments
    schedule = {"output_dir": str(tmp_path), "per_device_train_batch_size": 3, "per_device_eval_batch_size": 3,
                "gradient_accumulation_steps": 2, "learning_rate": 3e-4, "num_train_epochs": 2.5, "max_steps": 9,
                "lr_scheduler_type": "linear", "warmup_steps": 0.2, "logging_steps": 2, "eval_strategy": "steps",
                "eval_steps": 4, "report_to": [], "seed": 7, "data_seed": 7, "use_cpu": True,
                "activation_checkpointing_kwargs": {"use_reentrant": False}}
    for args in (sft, pref):
        assert {key: getattr(args, key) for key in schedule} == schedule
    # train: its optimizer, checkpoints to resume from, and bf16 autocast in its own loss (lora).
    assert (sft.optim, sft.save_strategy, sft.save_steps, sft.save_total_limit, sft.bf16) == \
        ("adamw_torch", "steps", 50, 1, False)
    assert trainer.training_arguments(TrainParams(method="prefix_tuning", merge=False), output_dir=tmp_path,
                                      bf16=True, optim="adamw_torch", cuda=False).bf16  # the model's own loss
    # dpo: the default optimizer, checkpoints as train, no recomputation (TRL's default is on), bf16 as
    # asked, and the columns the model does not take (the pairs' uids) kept for the loss.
    assert (pref.optim, pref.save_strategy, pref.activation_checkpointing, pref.bf16, pref.remove_unused_columns) == \
        (TrainingArguments.__dataclass_fields__["optim"].default, "steps", False, True, False)
    assert not dpo.arguments(DpoParams(), output_dir=tmp_path, bf16=False, cuda=False).bf16


def test_precision_decides_bf16_the_same_way_for_both_stages(monkeypatch):
    from ftpipe import device
    from ftpipe.params import TrainParams
    from ftpipe.schedule import use_bf16

    for native in (False, True):
        monkeypatch.setattr(device, "bf16_supported", lambda native=native: native)
        for model in (TrainParams, DpoParams):
            assert [use_bf16(model(precision=p)) for p in ("fp32", "bf16", "auto")] == [False, True, native]


@pytest.mark.slow  # one more pipeline scenario (about 45 s)
def test_dvc_repro_with_dpo_evaluates_registers_and_exports_the_dpo_model(finished_project):
    """The finished tiny project with dpo turned on: `dvc repro` builds the pairs from a file, trains
    DPO on the SFT model, scores it as a fourth candidate, exports it and registers it (the SFT
    model's metrics in a sibling run), and the lock records both new stages."""
    import mlflow
    import torch
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    from ftpipe import registry

    proj = finished_project
    pairs_file(proj / "data" / "raw" / "prefs.jsonl", qa_rows(80))  # the tiny data's prompts
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare_prefs"].update(source="file", path="data/raw/prefs.jsonl", max_train_pairs=16)
    params["dpo"].update(enabled=True, max_steps=4, batch_size=4, eval_steps=2, logging_steps=1, max_length=64,
                         learning_rate=1e-3)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=stage_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'train'" not in done.stdout  # the SFT model is reused
    assert "dpo: 4 steps from sft (lora); test pairs: reward accuracy" in done.stdout

    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    assert {"prepare_prefs", "dpo"} <= set(lock)
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=proj, env=stage_env(), capture_output=True,
                            text=True)
    assert "up to date" in status.stdout, status.stdout

    metrics = json.loads((proj / "reports/metrics.json").read_text())
    assert set(metrics["dpo"]) == set(metrics["finetuned"]) and "dpo_vs_base" in metrics["intervals"]
    assert "| DPO |" in (proj / "reports/comparison.md").read_text().splitlines()[0].replace(" DPO vs base |", "")
    assert all("dpo" in row for row in map(json.loads, (proj / "reports/generations.jsonl").read_text().splitlines()))
    export = json.loads((proj / "reports/export.json").read_text())
    assert export["model"] == "models/dpo/merged" and export["formats"]

    registration = json.loads((proj / "reports/registration.json").read_text())
    assert registration["candidate"] == "dpo" and registration["sft_run_id"]
    client = MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    dpo_run = client.get_run(registration["finetuned_run_id"])
    assert dpo_run.info.run_name == "dpo" and "dpo_test_reward_accuracy" in dpo_run.data.metrics
    assert len(client.get_metric_history(dpo_run.info.run_id, "dpo_train_loss")) == 4  # a point per step
    assert len(client.get_metric_history(dpo_run.info.run_id, "dpo_val_reward_margin")) == 2
    assert client.get_run(registration["sft_run_id"]).data.metrics["rougeL"] == metrics["finetuned"]["rougeL"]
    version = registration["version"]
    assert client.get_model_version("tiny-model", version).tags["dpo"] == "sigmoid beta 0.1 from sft (lora)"
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        registered, _ = registry.load_model(client, "tiny-model", version)
    finally:
        mlflow.set_tracking_uri(None)
    merged = load_file(proj / "models/dpo/merged/model.safetensors")
    weights = registered.state_dict()
    assert all(torch.equal(weights[k], merged[k]) for k in merged)  # the DPO model is what was registered

    # Reports that describe another model than the one register would register stop it, before any run.
    versions = len(client.search_model_versions("name = 'tiny-model'"))
    params["dpo"]["enabled"] = False
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stale = subprocess.run([sys.executable, "-m", "stages.register"], cwd=proj, env=stage_env(), capture_output=True,
                           text=True)
    assert stale.returncode == 2
    assert stale.stderr.strip().splitlines() == ["error: reports/metrics.json: scores a DPO model but dpo.enabled is "
                                                 "false: rerun `dvc repro evaluate`"]
    assert len(client.search_model_versions("name = 'tiny-model'")) == versions


@pytest.mark.slow  # one more pipeline scenario
def test_dvc_repro_with_kto_from_thumbs_evaluates_and_registers_the_kto_model(finished_project):
    """The finished tiny project with KTO on a thumbs file: `dvc repro` builds the rated replies, trains
    KTO on the SFT model, scores it as the DPO candidate and registers it."""
    from mlflow import MlflowClient

    proj = finished_project
    thumbs_file(proj / "data" / "raw" / "thumbs.jsonl", qa_rows(80), labels=("up", "down"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare_prefs"].update(kind="thumbs", source="file", path="data/raw/thumbs.jsonl", max_train_pairs=16)
    params["dpo"].update(enabled=True, method="kto", max_steps=4, batch_size=4, eval_steps=2, logging_steps=1,
                         max_length=64, learning_rate=1e-3)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=proj, env=stage_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Running stage 'train'" not in done.stdout and "Running stage 'dpo'" in done.stdout
    assert "dpo: 4 kto steps from sft (lora); test replies: loss" in done.stdout
    prefs = json.loads((proj / "reports/preferences.json").read_text())
    assert prefs["kind"] == "thumbs" and prefs["pairs"]["train"] == 16
    report = json.loads((proj / "reports/dpo.json").read_text())
    assert report["method"] == "kto" and report["test_reward_accuracy"] is None and report["steps"] == 4

    metrics = json.loads((proj / "reports/metrics.json").read_text())
    assert set(metrics["dpo"]) == set(metrics["finetuned"])  # evaluate scored the KTO model
    registration = json.loads((proj / "reports/registration.json").read_text())
    assert registration["candidate"] == "dpo"
    client = MlflowClient(f"sqlite:///{proj / 'mlruns.db'}")
    run = client.get_run(registration["finetuned_run_id"])
    assert run.data.params["dpo_method"] == "kto" and "dpo_test_reward_accuracy" not in run.data.metrics
    assert client.get_model_version("tiny-model", registration["version"]).tags["dpo"] == \
        "kto beta 0.1 from sft (lora)"


def test_a_pairs_file_outside_data_raw_is_refused_before_any_stage(tmp_path):
    from ftpipe.checks import check_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dpo"]["enabled"] = True
    params["prepare_prefs"].update(source="file", path="elsewhere/prefs.jsonl")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "elsewhere").mkdir()
    write_jsonl(tmp_path / "elsewhere" / "prefs.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    with pytest.raises(PipelineError, match=r"^prepare_prefs.path: elsewhere/prefs.jsonl resolves to .*, outside "
                                            r"data/raw/: put the data under data/raw/"):
        check_params(tmp_path / "params.yaml", tmp_path)
    params["dpo"]["enabled"] = False  # no pairs are built, so the file is not read
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "prepare_prefs" in check_params(tmp_path / "params.yaml", tmp_path)


def test_a_killed_dpo_run_resumes_from_its_last_checkpoint(finished_project):
    """As train: checkpoints every save_steps under checkpoints/dpo/, kill -9 leaves the previous
    output whole, and the rerun continues from the newest checkpoint to the same number of steps."""
    from conftest import killed_at_first_checkpoint, stage

    from ftpipe.schemas import DpoReport

    proj = finished_project
    pairs_file(proj / "data" / "raw" / "prefs.jsonl", qa_rows(80))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare_prefs"].update(source="file", path="data/raw/prefs.jsonl", max_train_pairs=32)
    steps = 40
    params["dpo"].update(enabled=True, max_steps=steps, batch_size=4, save_steps=5, eval_steps=20, logging_steps=5,
                         max_length=64, learning_rate=1e-3)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    built = stage(proj, "prepare_prefs")
    assert built.returncode == 0, built.stderr[-3000:]
    previous = (proj / "models" / "dpo" / "manifest.json").read_bytes()  # dpo off until now

    killed_at_first_checkpoint(proj, "dpo")
    assert (proj / "models" / "dpo" / "manifest.json").read_bytes() == previous
    assert sorted(p.name for p in (proj / "models" / "dpo").iterdir()) == ["manifest.json"]

    rerun = stage(proj, "dpo")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "dpo: resuming from checkpoints/dpo/" in rerun.stdout
    report = DpoReport.read(proj / "reports" / "dpo.json")
    assert report.steps == steps and 5 <= report.resumed_from_step < steps
    # The loss curve continues from the checkpoint: one point every 5 steps, none missing or repeated.
    assert [point["step"] for point in report.train_curve] == list(range(5, steps + 1, 5))
    assert (proj / "models" / "dpo" / "merged" / "model.safetensors").is_file()
    assert not (proj / "checkpoints" / "dpo").exists()


def test_drop_removes_every_training_pair_that_leaks_not_only_the_first_found():
    """A leak names one training pair per evaluation pair: two training copies of a test pair both
    go, checked again until none is left, so the gate's "no leak left in training" holds."""
    from ftpipe.preferences import check_leaks

    def pair(pair_id: str, prompt: str, chosen: str) -> dict:
        return {"id": pair_id, "prompt": [{"role": "user", "content": prompt}], "chosen": chosen, "rejected": "no"}

    fox = "the quick brown fox jumps over the lazy dog again and again"
    splits = {"train": [pair("t1", "tell me the fox story", fox), pair("t2", "tell me the fox story", fox),
                        pair("t3", "what is two and two", "four")],
              "val": [pair("v1", "name a colour", "red")], "test": [pair("x1", "tell me the fox story", fox)]}
    data = PrepareDataParams(source="file", path="x.jsonl", leak_action="drop")
    kept, found = check_leaks(splits, {}, data)
    assert found and {leak.train_id for leak in found} <= {"t1", "t2"}
    assert [p["id"] for p in kept["train"]] == ["t3"]
    again, left = check_leaks(kept, {}, PrepareDataParams(source="file", path="x.jsonl", leak_action="fail"))
    assert again == kept and left == []  # nothing left that leaks: fail would not stop
