"""Where and in what precision a model runs: one decision that every stage running a model asks.

`decide` reads params.yaml `inference` (device auto|cpu|cuda, precision auto|fp32|bf16): auto
picks CUDA when present, else the CPU; bf16 where that device computes it natively (CUDA with bf16,
CPUs with AVX-512 bf16 or AMX), fp32 elsewhere (an emulated bf16 matmul is slower than fp32). The
train and dpo stages keep their own `precision` param for training. `place` moves a model there and
checks that no weight or buffer stayed behind, so a stage cannot silently run on another device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftpipe.errors import PipelineError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" | "cpu"
    precision: str  # "bf16" | "fp32"

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def __str__(self) -> str:
        return f"{self.device} {self.precision}"


def decide(*, device: str = "auto", precision: str = "auto") -> Placement:
    """The placement for `inference.device` and `inference.precision` on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise PipelineError("inference.device: cuda, but torch sees no CUDA device on this machine "
                            f"(torch {torch.__version__}; a CPU build has none): set it to auto or cpu")
    where = "cuda" if device == "cuda" or (device == "auto" and cuda) else "cpu"
    if precision == "auto":
        precision = "bf16" if bf16_supported(where) else "fp32"
    return Placement(where, precision)


def inference(path: Path | None = None) -> Placement:
    """The project's inference placement (params.yaml `inference`; a file without the section, such
    as a serving folder's, gets the defaults: the pipeline's validate stage requires it)."""
    from ftpipe.params import PARAMS_FILE, InferenceParams, load_section, read_params_file

    path = path or PARAMS_FILE
    if "inference" not in read_params_file(path)[0]:
        return decide()
    params = load_section("inference", InferenceParams, path)
    return decide(device=params.device, precision=params.precision)


def place(model, placement: Placement, what: str = "model"):
    """`model` on the placement's device, its floating-point weights in its dtype; one line if it does
    not fit, and an error naming the first weight that is still elsewhere."""
    import torch

    kept = {name: b for name, b in model.named_buffers() if _kept_fp32(name) and b.dtype == torch.float32}
    try:
        model = model.to(device=placement.device)
        if any(p.is_floating_point() and p.dtype != placement.dtype for p in model.parameters()):
            model = model.to(dtype=placement.dtype)
            for name, buffer in kept.items():  # as from_pretrained(dtype=...) leaves them
                owner, _, attr = name.rpartition(".")
                setattr(model.get_submodule(owner), attr, buffer.to(placement.device))
    except torch.OutOfMemoryError:
        size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        raise PipelineError(f"{what}: {size:.1f} GiB of weights do not fit in {placement.device} memory; "
                            "use a smaller model, a quantized one (train.method: qlora), or inference.device: cpu"
                            ) from None
    check_placed(model, placement, what)
    return model


def check_placed(model, placement: Placement, what: str = "model") -> None:
    """Raise if a weight or buffer of `model` is not on the placement's device (or, floating, not in its dtype)."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        wrong_dtype = tensor.is_floating_point() and tensor.dtype != placement.dtype and tensor.numel() > 0
        if tensor.device.type != placement.device or (wrong_dtype and not _kept_fp32(name)):
            raise PipelineError(f"{what}: {name} is on {tensor.device.type} {str(tensor.dtype).removeprefix('torch.')}"
                                f", not {placement}: the model did not move as a whole")


def _kept_fp32(name: str) -> bool:
    """Buffers transformers keeps in fp32 on purpose (rotary inverse frequencies: bf16 would shift
    every position's angle)."""
    return name.endswith("inv_freq") or name.endswith("original_inv_freq")


def bf16_supported(device: str | None = None) -> bool:
    """Whether `device` (default: CUDA when present, else the CPU) computes bf16 natively: CUDA with
    bf16 support, or a CPU with AVX-512 bf16 or AMX."""
    import torch

    if device == "cuda" or (device is None and torch.cuda.is_available()):
        return torch.cuda.is_bf16_supported()
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in {"AVX512_BF16", "AMX"} or bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo gives it, else as platform does."""
    import platform

    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (/proc/cpuinfo; empty where there is none)."""
    return set(_cpuinfo_field("flags").split())


def _cpuinfo_field(name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""
