"""A merged Hugging Face model written as GGUF (llama.cpp, Ollama) with the `gguf` package's writer.

The `gguf` package is llama.cpp's own gguf-py: its writer, its tensor-name map for the llama
architecture and its Q8_0 quantizer are used as llama.cpp's convert_hf_to_gguf.py uses them; what
is written here is only the llama-specific part of that script (the metadata keys, and q/k weights
permuted into llama.cpp's rotary layout, which transformers' GGUF loader undoes). Llama-architecture
models only (SmolLM2, Llama, Mistral without sliding windows); anything else fails with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ftpipe.errors import PipelineError

if TYPE_CHECKING:
    import numpy as np

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
FORMATS = ("f32", "f16", "bf16", "q8_0")
MODELFILE = "Modelfile"
# llama.cpp's name for the pre-tokenizer (the regex split before BPE). convert_hf_to_gguf.py finds it
# by hashing the tokenizer's output on a probe text; for a base that did not come from a GGUF the
# export writes llama.cpp's "default" and the report says so.
DEFAULT_PRE = "default"


def file_name(fmt: str) -> str:
    return f"model-{fmt}.gguf"


def pre_tokenizer_of(gguf_file: Path) -> str | None:
    """`tokenizer.ggml.pre` of an existing GGUF file (the embedded base's), or None if it has none."""
    import gguf

    field = gguf.GGUFReader(gguf_file).fields.get("tokenizer.ggml.pre")
    return bytes(field.parts[-1]).decode("utf-8") if field else None


def write_gguf(model_dir: Path, out: Path, *, fmt: str, name: str, pre: str) -> None:
    """Write the safetensors model in `model_dir` (config.json, tokenizer.json) to `out` as GGUF."""
    import gguf

    if fmt not in FORMATS:
        raise PipelineError(f"export.gguf: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    _check_supported(config, model_dir)
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_hparams(writer, config, fmt, name)
    _add_tokenizer(writer, model_dir, pre, config["vocab_size"])
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for hf_name, tensor in _tensors(model_dir):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
            continue  # llama.cpp reads the tied output layer from token_embd
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise PipelineError(f"{model_dir}: tensor {hf_name} has no GGUF name for the llama architecture")
        if hf_name.endswith("q_proj.weight"):
            tensor = _permute(tensor, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _permute(tensor, n_head, n_kv)
        data, qtype = _encoded(tensor, fmt)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _check_supported(config: dict, model_dir: Path) -> None:
    architectures = config.get("architectures") or []
    if not set(architectures) & set(SUPPORTED_ARCHITECTURES):
        raise PipelineError(f"{model_dir}/config.json: architecture {architectures} cannot be exported to GGUF here "
                            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)}); set export.gguf: []")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"  # "type": configs before transformers 4.45
    if rope_type != "default" or config.get("sliding_window"):
        raise PipelineError(f"{model_dir}/config.json: rope scaling ({rope_type}) or a sliding window is set, which "
                            "this GGUF export does not write; set export.gguf: []")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise PipelineError(f"{model_dir}/config.json: attention or MLP biases are not written by this GGUF export; "
                            "set export.gguf: []")


def _add_hparams(writer, config: dict, fmt: str, name: str) -> None:
    import gguf

    n_head = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_head)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    # transformers 5 keeps rope_theta under rope_parameters; older configs have it at the top level.
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[fmt])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, model_dir: Path, pre: str, vocab_size: int) -> None:
    """GPT-2-style byte-level BPE: the vocabulary in id order, special tokens typed CONTROL (so
    llama.cpp parses `<|im_start|>` in a prompt as one token), merges, special ids, chat template."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer_json.get("decoder") or {}).get(
            "type") != "ByteLevel":
        raise PipelineError(f"{model_dir}/tokenizer.json: only byte-level BPE tokenizers are exported to GGUF here; "
                            "set export.gguf: []")
    if len(tokenizer) > vocab_size:
        raise PipelineError(f"{model_dir}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                            f"{vocab_size} embeddings")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):  # padded embedding rows get placeholder tokens, as llama.cpp's converter writes
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if i in added and added[i].special
                         else gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)


def _tensors(model_dir: Path):
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PipelineError(f"{model_dir}: no .safetensors weights to export")
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key).float()


def _permute(weights, n_head: int, n_kv_head: int):
    """Rows of each head reordered from Hugging Face's rotary layout (halves) to llama.cpp's
    (interleaved pairs), as convert_hf_to_gguf.py's LlamaModel.permute does."""
    heads = n_kv_head if n_kv_head != n_head else n_head
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encoded(tensor, fmt: str) -> tuple[np.ndarray, object]:
    """(data, GGML type): norms and other 1-D tensors stay f32, as llama.cpp's converter keeps them;
    Q8_0 needs rows that are whole 32-value blocks, other matrices fall back to f16."""
    import gguf
    import numpy as np

    data = tensor.numpy().astype(np.float32)
    if data.ndim == 1 or fmt == "f32":
        return data, gguf.GGMLQuantizationType.F32
    if fmt == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if fmt == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def modelfile(gguf_name: str, chat_template: str | None, system_prompt: str | None) -> str:
    """An Ollama Modelfile beside the GGUF. ChatML templates (SmolLM2's) are written as Ollama's Go
    template with the stop token; for any other template Ollama reads the GGUF's own chat template."""
    lines = [f"FROM ./{gguf_name}"]
    if chat_template and "<|im_start|>" in chat_template:
        # System text comes from .System (SYSTEM below or the request's), as in Ollama's own ChatML
        # templates; system entries of .Messages are skipped so it is never written twice.
        lines += ['TEMPLATE """{{- if .System }}<|im_start|>system',
                  "{{ .System }}<|im_end|>",
                  '{{ end }}{{- range .Messages }}{{- if ne .Role "system" }}<|im_start|>{{ .Role }}',
                  "{{ .Content }}<|im_end|>",
                  "{{ end }}{{- end }}<|im_start|>assistant",
                  '"""',
                  'PARAMETER stop "<|im_end|>"']
        if system_prompt:
            lines.append('SYSTEM """' + system_prompt.replace('"""', '"') + '"""')
    # The pipeline evaluates greedy decoding; the same here, so `ollama run` answers as evaluated.
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"
