"""bitsandbytes quantization variants of the base model, shared by the quantize and train stages.

A variant name is what params.yaml says (`quantize.variants`, `train.quantization`); bitsandbytes
0.50 runs all of them on CPU, and on CUDA when one is present.
"""

from __future__ import annotations

from pathlib import Path

from ftpipe.errors import PipelineError

VARIANTS = ("int8", "nf4", "nf4_dq", "fp4", "fp4_dq")


def bnb_config(variant: str, *, bf16: bool = False):
    """BitsAndBytesConfig for a variant: LLM.int8, or 4-bit NF4/FP4 with (`_dq`) double quantization."""
    import torch
    from transformers import BitsAndBytesConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown quantization variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    if variant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=variant.split("_")[0],
        bnb_4bit_use_double_quant=variant.endswith("_dq"),
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def device() -> str:
    """Where quantized models run (and where their fp32 reference should run to compare fairly)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_quantized(base_dir: Path, variant: str, *, bf16: bool = False, attn_implementation: str | None = None,
                   on: str | None = None):
    """The base model from its safetensors folder, quantized on load, on device `on` (default: CUDA
    when present, as training wants it)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = bnb_config(variant, bf16=bf16)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            Path(base_dir).resolve(), quantization_config=config, device_map=on or device(),
            use_safetensors=True, trust_remote_code=False, dtype=torch.float32, attn_implementation=attn_implementation,
        )
    except OSError as exc:
        raise PipelineError(f"{base_dir}: cannot load model ({str(exc).strip().splitlines()[0]})") from None
    return model.eval()
