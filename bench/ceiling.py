"""What this machine can do at most: the CPU, its bf16 / AMX support, and the matmul rate at the
model's shapes, against which a training benchmark's rate is read as a share.

FLOPs of one training step, counted from the model's shapes (matmuls only, as the ceiling is a
matmul rate; elementwise work, RMSNorm, RoPE and softmax, is not counted and is part of the gap):
- every computed position (padding excluded; a packed sequence computes the shared prefix once, so
  packing's saving shows as fewer positions for the same real tokens) passes the decoder's linear
  layers forward (2 x P_linear) and backward: the input gradients always (2 x P_linear), the weight
  gradients only where the weights train (full: 2 x P_linear more; LoRA and the other adapters:
  their own few parameters, not counted);
- attention: 2 x 2 x d per visible (query, key) pair and layer forward, twice that backward (the
  pairs a causal mask allows within each row and its prefix, not the square a kernel may compute);
- the vocabulary projection at the positions that carry a loss (labels != -100 after the shift):
  2 x V x d forward and the same backward for the input gradient (the tied embedding is frozen
  except in full fine-tuning).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ftpipe import device

IGNORE = -100


@dataclass(frozen=True)
class Shapes:
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shapes:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size,
                   kv_dim=config.num_key_value_heads * head_dim, layers=config.num_hidden_layers,
                   vocab=config.vocab_size)

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's matmuls: q, o (d x d), k, v (d x kv), gate, up, down (d x i)."""
        d = self.hidden
        return self.layers * (2 * d * d + 2 * d * self.kv_dim + 3 * d * self.intermediate)

    def matmuls(self, tokens: int) -> list[tuple[int, int, int]]:
        """(m, k, n) of one layer's forward matmuls and the vocabulary projection for `tokens` rows."""
        d, i = self.hidden, self.intermediate
        return [(tokens, d, d), (tokens, d, self.kv_dim), (tokens, d, i), (tokens, i, d), (tokens // 2, d, self.vocab)]


def step_flops(shapes: Shapes, inputs: dict[str, Any], *, full: bool, reference: bool = False) -> float:
    """Matmul FLOPs of one training batch (see the module docstring); reference: plus one forward pass
    of the same positions (DPO's reference log-probabilities, the adapter off)."""
    positions, pairs = _positions_and_pairs(inputs)
    labels = inputs["labels"][:, 1:]
    loss_positions = int((labels != IGNORE).sum())
    linear = (6 if full else 4) * shapes.linear_params * positions
    attention = 3 * 4 * shapes.hidden * shapes.layers * pairs
    logits = (6 if full else 4) * shapes.vocab * shapes.hidden * loss_positions
    if reference:
        linear += 2 * shapes.linear_params * positions
        attention += 4 * shapes.hidden * shapes.layers * pairs
        logits += 2 * shapes.vocab * shapes.hidden * loss_positions
    return float(linear + attention + logits)


def _positions_and_pairs(inputs: dict[str, Any]) -> tuple[int, int]:
    """Computed positions (no padding) and visible (query, key) pairs of a padded or packed batch."""
    if "segments" in inputs:  # ftpipe.packing: 0 the shared prefix, -1 padding, 1, 2, ... the rows
        positions = pairs = 0
        for row in inputs["segments"].tolist():
            prefix = row.count(0)
            pairs += prefix * (prefix + 1) // 2
            for segment in set(row) - {0, -1}:
                own = row.count(segment)
                pairs += prefix * own + own * (own + 1) // 2
            positions += len(row) - row.count(-1)
        return positions, pairs
    mask = inputs.get("attention_mask")
    lengths = mask.sum(dim=1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * len(inputs["input_ids"])
    return int(sum(lengths)), int(sum(n * (n + 1) // 2 for n in lengths))


def cpu_flags() -> dict[str, bool]:
    flags = device.cpu_flags()
    return {"avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def matmul_gflops(shapes: Shapes, dtype_name: str, *, tokens: int = 320, seconds: float = 1.5) -> float:
    """Sustained GFLOP/s of this model's forward matmuls (a batch of `tokens` positions) in one dtype,
    on the threads torch uses; the best of several timed rounds."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    pairs = [(torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)) for m, k, n in shapes.matmuls(tokens)]
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)
    with torch.inference_mode():
        for a, b in pairs:  # warm-up: kernel selection, first-touch allocation
            torch.matmul(a, b)
        best, deadline = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            for a, b in pairs:
                torch.matmul(a, b)
            best = min(best, time.perf_counter() - started)
    return flops / best / 1e9


def machine(shapes: Shapes) -> dict[str, Any]:
    """The machine line of a benchmark: CPU, bf16 support, threads, matmul ceilings (a few seconds)."""
    import torch

    from ftpipe.device import bf16_supported

    return {"cpu": device.cpu_model(), **cpu_flags(), "bf16_used": bf16_supported(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "gflops": {name: round(matmul_gflops(shapes, name), 1) for name in ("fp32", "bf16")}}


def describe(info: dict[str, Any]) -> str:
    bf16 = "AMX" if info["amx_bf16"] else "AVX-512 bf16" if info["avx512_bf16"] else "no bf16 instructions"
    return (f"machine: {info['cpu']} ({bf16}; precision auto trains in {'bf16' if info['bf16_used'] else 'fp32'}), "
            f"{info['threads']} threads, torch {info['torch']}; matmul ceiling at the model's shapes: "
            f"fp32 {info['gflops']['fp32']:.0f} GFLOP/s, bf16 {info['gflops']['bf16']:.0f} GFLOP/s")
