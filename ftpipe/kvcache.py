"""A KV cache for greedy decoding that writes each step in place, and attention that reads a shared prefix once.

transformers' DynamicCache copies every layer's whole cache once per step (a third of a decoding step at batch
100 on the CPU); here each layer's keys and values live in a buffer with room for the tokens to come, and a step
writes into that room. The prompts of a batch share their start (118 of a few-shot prompt's 131 tokens on the
default data): prefix_attention keeps it out of the rows' caches and reads it once per layer for all rows, so a
step reads a third of the keys and values. Imported by ftpipe.scoring when it decodes (it imports transformers).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A DynamicLayer over buffers [batch, heads, capacity, head dim] whose first `length` positions hold
    the cache; it falls back to concatenation when the room runs out."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._keys, self._values, self._length = keys, values, length
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self._length + key_states.shape[-2]
        if end > self._keys.shape[-2]:  # no room left: grow as DynamicLayer does
            self._keys = torch.cat([self.keys, key_states], dim=-2)
            self._values = torch.cat([self.values, value_states], dim=-2)
        else:
            self._keys[:, :, self._length:end] = key_states
            self._values[:, :, self._length:end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self._length = max(self._length + tokens_to_remove, 0)
            self._expose()
        else:
            super().crop(tokens_to_remove)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._keys, self._values = self._keys[indices], self._values[indices]
        self._expose()

    def _unsupported(self, *args, **kwargs):
        # The inherited versions change only the exposed views: the next update would write into the
        # stale buffers. Greedy decoding calls none of them.
        raise NotImplementedError("RoomyLayer serves greedy decoding: update, crop and batch_select_indices only")

    reset = reorder_cache = batch_repeat_interleave = offload = prefetch = _unsupported


def roomy_cache(buffers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> DynamicCache:
    """A DynamicCache whose layers hold `buffers` (keys, values per layer), `length` positions filled."""
    cache = DynamicCache()
    # DynamicCache() appends a DynamicLayer per layer on its first update; these layers are in place first.
    cache.layers = [RoomyLayer(keys, values, length) for keys, values in buffers]
    return cache


# Architectures whose attention modules call the attention interface with nothing but the mask to apply
# (no sliding window, no soft-capping, no sinks): only these read a shared prefix apart.
PREFIX_ATTENTION_MODELS = ("llama", "qwen2", "qwen3")
PREFIX_ATTENTION = "ftpipe_shared_prefix"
_prefix: contextvars.ContextVar[list[tuple[torch.Tensor, torch.Tensor]] | None] = contextvars.ContextVar(
    "prefix", default=None)


def reads_prefix_apart(model) -> bool:
    """Whether decoding can keep a shared prefix out of each row's cache (prefix_attention: on the CPU,
    whose flash kernel returns the log-sum-exp that joins the two parts)."""
    config = model.config
    return (model.device.type == "cpu" and config.model_type in PREFIX_ATTENTION_MODELS
            and all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"]))


@contextlib.contextmanager
def prefix_attention(model, prefix: list[tuple[torch.Tensor, torch.Tensor]]):
    """Within: the model's forwards attend to `prefix` (keys, values of shape [1, kv heads, length,
    head dim] per layer, every row's shared start) and to the rows' own positions, which follow it:
    the cache and the attention mask hold only those, position ids count from the prefix's length. The
    prefix is read once per layer for the whole batch, not copied into each row."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PREFIX_ATTENTION, _prefix_and_rows_attention)
    AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)
    config, token = model.config, _prefix.set(prefix)
    kept, config._attn_implementation = config._attn_implementation, PREFIX_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = kept
        _prefix.reset(token)


def _prefix_and_rows_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                               **kwargs):
    """Attention over [shared prefix | the row's own positions]: the rows' part by torch's CPU flash
    kernel, which also gives each softmax's log-sum-exp, the prefix's part as one matmul per key head
    for all rows and positions, the two joined by their log-sum-exps (as cascade attention does).
    The query heads that share a key head are the kernel's query positions, each with its position's
    mask (transformers' pack_gqa, for any length). Returns (batch, length, heads, dim)."""
    prefix = _prefix.get()
    if prefix is None or dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise RuntimeError("shared-prefix attention serves greedy scoring over a plain cache only")
    batch, heads, length, dim = query.shape
    kv, keys = key.shape[1], key.shape[2]
    group = heads // kv
    packed = query.reshape(batch, kv, group * length, dim)
    mask = attention_mask
    if mask is None and length > 1:  # transformers leaves a causal mask without padding out
        mask = torch.ones(length, keys, dtype=torch.bool, device=query.device).tril(keys - length)[None, None]
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        if length > 1:
            mask = mask.expand(-1, -1, length, -1).repeat(1, 1, group, 1)
    # A row whose own keys are all hidden (left padding, never read) gets 0 and a log-sum-exp of 0
    # here: the joint output stays finite, and so do the keys and values later layers make of it.
    rows, rows_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        packed, key, value, attn_mask=mask, scale=scaling)
    prefix_keys, prefix_values = prefix[module.layer_idx]
    by_head = packed.transpose(0, 1).reshape(kv, -1, dim)  # [kv heads, rows x group x length, dim]
    scores = torch.baddbmm(by_head.new_empty(()), by_head, prefix_keys[0].transpose(1, 2), beta=0,
                           alpha=scaling).float()
    # torch.logsumexp, spelt out: its own checks cost more than the sums at these sizes.
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    shared = torch.bmm(weights.to(prefix_values.dtype), prefix_values[0]).float().div_(total)
    prefix_lse = top.add_(total.log_())
    shared = shared.view(kv, batch, -1, dim).transpose(0, 1)
    share = torch.sigmoid(rows_lse - prefix_lse.view(kv, batch, -1).transpose(0, 1))[..., None]
    out = torch.lerp(shared, rows.float(), share).to(query.dtype)  # share: the rows' part of the softmax
    out = out.view(batch, kv, group, length, dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, length, heads, dim), None
