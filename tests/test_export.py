"""The export stage: the merged model as GGUF, read back by transformers, equal to the merged model
within each format's precision, with llama.cpp's metadata and an Ollama Modelfile."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import ROOT, qa_rows, write_jsonl

from ftpipe.errors import PipelineError
from ftpipe.params import ExportParams
from stages import export

# Tolerances on the tiny model's logits against the fp32 reference (measured: 1.6e-4 for f16, 4.7e-3
# for q8_0). f16 rounds each weight to 11 significant bits (relative error <= 2^-11), q8_0 to 8 bits
# per block of 32 with one f16 scale (error <= 1/254 of the block's largest weight); the errors partly
# cancel over the 32-64 wide dot products. On SmolLM2 (reports/export.md) q8_0 keeps 98 % of top-1
# tokens and every greedy reply.
F16_ATOL = 1e-3
Q8_0_ATOL = 2e-2


def val_file(tmp_path):
    rows = [{"id": f"val-{i}", "messages": [{"role": "user", "content": r["prompt"]},
                                            {"role": "assistant", "content": r["response"]}]}
            for i, r in enumerate(qa_rows(5))]
    return write_jsonl(tmp_path / "val.jsonl", rows)


def export_of(tmp, merged_dir):
    params = ExportParams(gguf=["f16", "q8_0"], prompts=3, max_new_tokens=6)
    report = export.run(params=params, merged_dir=merged_dir, val_file=val_file(tmp), out_dir=tmp / "gguf",
                        reports_dir=tmp / "reports", pre_tokenizer="default", name="tiny")
    return tmp, report


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    """The tiny model (a plain safetensors Llama, as train's merged/ is) exported as f16 and q8_0:
    random weights of known scale, on which the logit tolerances above are derived."""
    return export_of(tmp_path_factory.mktemp("export"), tiny_model_dir)


@pytest.fixture(scope="module")
def merged(talking_model):
    """A merged model that answers the validation prompts in words: greedy replies of newlines only
    (the random tiny model's) would agree whatever the conversion did."""
    return talking_model / "merged"


@pytest.fixture(scope="module")
def exported_talking(tmp_path_factory, merged):
    return export_of(tmp_path_factory.mktemp("export-talking"), merged)


def logits(model, tokenizer, text):
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).logits[0]


@pytest.mark.parametrize("fmt, atol", [("f16", F16_ATOL), ("q8_0", Q8_0_ATOL)])
def test_the_file_loads_back_with_transformers_and_matches_the_merged_model(exported, tiny_model_dir, fmt, atol):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, report = exported
    name = f"model-{fmt}.gguf"
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp / "gguf", gguf_file=name, dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp / "gguf", gguf_file=name)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "say red cat number 3"},
                                         {"role": "assistant", "content": "cat red 3"}], tokenize=False)
    assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    expected, got = logits(reference, tokenizer, text), logits(gguf_model, tokenizer, text)
    assert not torch.equal(expected, got) or fmt == "f32"  # a real conversion, not a copy of the weights
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    entry = report.formats[fmt]
    assert entry.max_abs_logit_diff <= atol and entry.top1_agreement >= 0.95
    assert entry.bytes == (tmp / "gguf" / name).stat().st_size and entry.file.endswith(name)


def test_f16_gives_the_merged_models_greedy_replies_and_q8_0_is_smaller(exported_talking, merged):
    tmp, report = exported_talking
    f16, q8 = report.formats["f16"], report.formats["q8_0"]
    assert f16.exact_match == 1.0 and f16.top1_agreement == 1.0
    # ... on replies of words: the merged model's own greedy replies to the compared prompts.
    from ftpipe import metrics, models
    from ftpipe.chat import prompt_text

    tokenizer = models.load_tokenizer(merged)
    prompts = [prompt_text(tokenizer, [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": ""}])
               for r in qa_rows(3)]
    replies = metrics.generate(models.load_model(merged), tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert all(reply.strip() for reply in replies), replies
    assert q8.bytes < f16.bytes
    assert report.logit_positions > 0 and report.prompts == 3
    written = json.loads((tmp / "reports" / "export.json").read_text())
    assert set(written["formats"]) == {"f16", "q8_0"}
    assert "| " in (tmp / "reports" / "export.md").read_text()


def test_llama_cpp_metadata_and_rotary_layout(exported, tiny_model_dir):
    """Hyperparameters under llama.cpp's keys, special tokens typed CONTROL, the chat template, and
    q/k rows in llama.cpp's interleaved rotary order (transformers undoes it when loading)."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    tmp, _ = exported
    reader = gguf.GGUFReader(tmp / "gguf" / "model-f16.gguf")
    field = lambda key: reader.fields[key].parts[-1]  # noqa: E731
    text = lambda key: bytes(field(key)).decode()  # noqa: E731
    assert text("general.architecture") == "llama"
    assert (int(field("llama.block_count")[0]), int(field("llama.attention.head_count")[0]),
            int(field("llama.attention.head_count_kv")[0]), int(field("llama.embedding_length")[0])) == (2, 4, 2, 32)
    assert text("tokenizer.ggml.model") == "gpt2" and "<|im_start|>" in text("tokenizer.chat_template")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    types = reader.fields["tokenizer.ggml.token_type"]
    type_of = {i: int(types.parts[types.data[i]][0]) for i in range(len(types.data))}
    assert len(type_of) == len(tokenizer)
    assert type_of[tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert all(type_of[i] == gguf.TokenType.NORMAL for i in tokenizer("say red", add_special_tokens=False)["input_ids"])
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    hf_q = load_file(tiny_model_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].numpy()
    gguf_q = tensors["blk.0.attn_q.weight"].data.astype("float32").reshape(hf_q.shape)
    assert not (abs(gguf_q - hf_q) < 1e-3).all()  # rows permuted
    assert sorted(gguf_q.ravel().tolist()) == pytest.approx(sorted(hf_q.astype("float16").astype("float32").ravel().tolist()))


def test_modelfile_points_at_the_smallest_file_with_the_chat_template(exported):
    tmp, report = exported
    text = (tmp / "gguf" / "Modelfile").read_text()
    assert text.splitlines()[0] == "FROM ./model-q8_0.gguf"
    assert 'PARAMETER stop "<|im_end|>"' in text and "{{ .Content }}<|im_end|>" in text
    assert "PARAMETER temperature 0" in text
    assert report.modelfile.endswith("Modelfile")


def test_no_formats_writes_no_file_and_says_so(tmp_path, tiny_model_dir):
    report = export.run(params=ExportParams(gguf=[]), merged_dir=tmp_path / "absent", val_file=val_file(tmp_path),
                        out_dir=tmp_path / "gguf", reports_dir=tmp_path / "reports", pre_tokenizer="default", name="x")
    assert report.formats == {} and report.modelfile is None
    assert list((tmp_path / "gguf").iterdir()) == []
    assert "export.gguf: []" in (tmp_path / "reports" / "export.md").read_text()


def test_an_unsupported_architecture_fails_naming_its_config_and_keeps_the_previous_files(tmp_path, tiny_model_dir,
                                                                                          exported):
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["Qwen2ForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "gguf"
    shutil.copytree(exported[0] / "gguf", out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(PipelineError, match=r"other-model/config.json: architecture \['Qwen2ForCausalLM'\] "
                                            r"cannot be exported to GGUF here .*set export.gguf: \[\]"):
        export.run(params=ExportParams(gguf=["f16"], prompts=2), merged_dir=other, val_file=val_file(tmp_path),
                   out_dir=out, reports_dir=tmp_path / "reports", pre_tokenizer="default", name="x")
    assert sorted(p.name for p in out.iterdir()) == before
    assert not (tmp_path / "reports" / "export.json").exists()


def test_a_missing_merged_model_fails_with_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"absent: no merged model to export \(train.merge: true writes it\)"):
        export.run(params=ExportParams(gguf=["q8_0"]), merged_dir=tmp_path / "absent", val_file=val_file(tmp_path),
                   out_dir=tmp_path / "gguf", reports_dir=tmp_path / "reports", pre_tokenizer="default", name="x")


def test_export_without_a_merged_model_fails_at_validation_naming_the_key(tmp_path):
    from ftpipe.params import validate_all

    text = (ROOT / "params.yaml").read_text().replace("  merge: true", "  merge: false")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if row.startswith("  gguf:"))
    with pytest.raises(PipelineError, match=rf"params.yaml:{line}: export.gguf: needs train.merge: true"):
        validate_all(path)
    path.write_text(text.replace("  gguf: [f16, q8_0]", "  gguf: []"))
    validate_all(path)


@pytest.mark.parametrize("value, message", [("[f16, q4_k]", r"export.gguf.1: .*'q4_k'"),
                                            ("[q8_0, q8_0]", r"export.gguf: lists 'q8_0' more than once")])
def test_bad_formats_fail_naming_the_key(tmp_path, value, message):
    from ftpipe.params import load_section

    path = tmp_path / "params.yaml"
    path.write_text(f"export:\n  gguf: {value}\n")
    with pytest.raises(PipelineError, match=rf"params.yaml:2: {message}"):
        load_section("export", ExportParams, path)
