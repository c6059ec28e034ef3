"""Bottleneck adapter layers (`train.method: bottleneck`): a small down-projection, non-linearity and
up-projection added at each decoder block's feed-forward output (Pfeiffer), at its attention and
feed-forward outputs (Houlsby), or beside the feed-forward block (parallel, He et al. 2022), trained
while every base weight stays frozen. Written here: peft has none, and AdapterHub's `adapters` 1.3
needs transformers ~=4.57. The modules hang off forward hooks, so the base's weights keep their names;
the adapters alone are saved (safetensors + a JSON config) and `load` puts them on a freshly loaded base.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ftpipe.errors import PipelineError

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "bottleneck_model.safetensors"
PLACEMENTS = ("pfeiffer", "houlsby", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")
ATTENTION, FEED_FORWARD = "bottleneck_attention", "bottleneck_ffn"  # child names on each decoder block


@dataclass(frozen=True)
class Config:
    size: int  # hidden units of each adapter
    placement: str = "pfeiffer"
    activation: str = "relu"


def config_for(model, *, reduction: int, placement: str, activation: str) -> Config:
    """Adapters of hidden_size / `reduction` units (at least 1), as AdapterHub's reduction_factor."""
    return Config(size=max(1, model.config.hidden_size // reduction), placement=placement, activation=activation)


def _blocks(model) -> list:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = list(base.layers)
    if not layers or not all(hasattr(b, "mlp") and hasattr(getattr(b, "self_attn", None), "o_proj") for b in layers):
        raise PipelineError(f"train.method: bottleneck needs decoder blocks with self_attn.o_proj and mlp "
                            f"(llama-style); {type(model).__name__} has other blocks")
    return layers


def _adapter(hidden: int, config: Config, like: torch.Tensor):
    import torch

    activation = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU, "tanh": torch.nn.Tanh}
    # fp32 on the base's device (trainable weights stay fp32 under a bf16 base); the up-projection starts at 0,
    # so an untrained adapter adds nothing and the model starts as the base.
    module = torch.nn.Sequential(torch.nn.Linear(hidden, config.size), activation[config.activation](),
                                 torch.nn.Linear(config.size, hidden)).to(device=like.device, dtype=torch.float32)
    torch.nn.init.zeros_(module[2].weight)
    torch.nn.init.zeros_(module[2].bias)
    return module


def _after(adapter):
    """Sequential placement: the sub-layer's output plus the adapter of that output."""
    def hook(module, args, output):
        return output + _apply(adapter, output, output.dtype)
    return hook


def _beside(adapter):
    """Parallel placement: the feed-forward output plus the adapter of the feed-forward input."""
    def hook(module, args, output):
        return output + _apply(adapter, args[0], output.dtype)
    return hook


def _apply(adapter, x, dtype):
    # In the adapter's dtype (fp32 weights under a bf16 base while training: autocast, where on,
    # computes in bf16 all the same), back in the base's.
    return adapter(x.to(adapter[0].weight.dtype)).to(dtype)


def add(model, config: Config):
    """Freeze every weight of `model` and add trainable adapters in place; returns the model."""
    if config.placement not in PLACEMENTS or config.activation not in ACTIVATIONS or config.size < 1:
        raise PipelineError(f"bottleneck: unknown adapter config {asdict(config)}")
    if is_adapted(model):  # a second set of hooks would apply both
        raise PipelineError("bottleneck: the model already has adapters; load a fresh base")
    model.requires_grad_(False)
    hidden = model.config.hidden_size
    for block in _blocks(model):
        like = block.self_attn.o_proj.weight
        if config.placement == "houlsby":
            block.add_module(ATTENTION, _adapter(hidden, config, like))
            block.self_attn.o_proj.register_forward_hook(_after(getattr(block, ATTENTION)))
        block.add_module(FEED_FORWARD, _adapter(hidden, config, like))
        hook = _beside if config.placement == "parallel" else _after
        block.mlp.register_forward_hook(hook(getattr(block, FEED_FORWARD)))
    model.bottleneck_config = config
    return model


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapters' weights by name (the base's are not included)."""
    return {name: p.detach().contiguous() for name, p in model.state_dict().items()
            if f".{ATTENTION}." in name or f".{FEED_FORWARD}." in name}


def save(model, folder: Path) -> None:
    """The adapters (fp32 safetensors) and their config in `folder`."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.float32).cpu() for k, v in adapter_state(model).items()}, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps(asdict(model.bottleneck_config), indent=2) + "\n", encoding="utf-8")


def saved_in(folder: Path) -> bool:
    return (Path(folder) / CONFIG_NAME).is_file()


def load(model, folder: Path):
    """`model` (the base, freshly loaded) with the adapters saved in `folder`, in the base's dtype: every
    adapter weight must be there and nothing else, or one line says what is wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = Config(**json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8")))
        weights = load_file(str(folder / WEIGHTS_NAME))
    except (OSError, ValueError, TypeError, SafetensorError) as exc:
        raise PipelineError(f"{folder}: bottleneck adapter unreadable ({str(exc).splitlines()[0]})") from None
    add(model, config)
    expected = set(adapter_state(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise PipelineError(f"{folder / WEIGHTS_NAME}: does not fit this base model "
                            f"(missing {missing[:2]}, unexpected {extra[:2]})")
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as exc:  # shapes of another config or base
        raise PipelineError(f"{folder / WEIGHTS_NAME}: does not fit this base model "
                            f"({str(exc).splitlines()[-1].strip()})") from None
    dtype = next(p.dtype for n, p in model.named_parameters() if ATTENTION not in n and FEED_FORWARD not in n)
    for block in _blocks(model):
        for name in (ATTENTION, FEED_FORWARD):
            if hasattr(block, name):
                getattr(block, name).to(dtype)
    return model


def is_adapted(model) -> bool:
    return getattr(model, "bottleneck_config", None) is not None
