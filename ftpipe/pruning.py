"""Pruned variants of the base model, measured beside the quantized ones by the quantize stage.

On the decoder blocks' linear layers (the embedding and norms kept whole): `magnitude_<percent>` zeroes that
share of each layer's smallest weights (torch's l1_unstructured), `2of4` the 2 smallest of every 4 consecutive
input weights. The weights stay dense (torch has no CPU kernel that skips zeros), so the stage measures what
pruning costs in quality, not what it would save.
"""

from __future__ import annotations

import re
from typing import Any

SEMI_STRUCTURED = "2of4"  # see params.PRUNED_PATTERN for why not "2:4"


def sparsity_of(name: str) -> float | None:
    """The share of weights a `magnitude_<percent>` variant removes (None for `2of4`)."""
    from ftpipe.choices import PRUNED_PATTERN

    if not re.fullmatch(PRUNED_PATTERN, name):
        raise ValueError(f"{name!r} is neither magnitude_<1-99> nor {SEMI_STRUCTURED}")
    return None if name == SEMI_STRUCTURED else int(name.removeprefix("magnitude_")) / 100


def pruned_layers(model) -> list[Any]:
    """The linear layers inside the decoder blocks."""
    import torch

    return [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}"]


def prune(model, name: str) -> float:
    """Prune `model` in place as variant `name` says; the share of zeros over the pruned weights."""
    import torch
    from torch.nn.utils import prune as torch_prune

    sparsity, layers = sparsity_of(name), pruned_layers(model)
    if not layers:
        raise ValueError("the model has no linear layers in decoder blocks to prune")
    with torch.no_grad():
        for layer in layers:
            if sparsity is None:
                layer.weight.mul_(semi_structured_mask(layer.weight))
            else:
                torch_prune.l1_unstructured(layer, "weight", amount=sparsity)
                torch_prune.remove(layer, "weight")  # the mask applied for good: a plain weight again
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    return zeros / sum(layer.weight.numel() for layer in layers)


def semi_structured_mask(weight):
    """1 for the 2 largest-magnitude weights of every 4 consecutive ones in a row, 0 for the others."""
    import torch

    rows, columns = weight.shape
    if columns % 4:
        raise ValueError(f"2:4 pruning needs input features in multiples of 4, not {columns}")
    groups = weight.abs().reshape(rows, columns // 4, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups).scatter_(-1, keep, 1.0).reshape(rows, columns)
