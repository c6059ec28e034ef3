"""A KV cache for greedy decoding that writes each step in place.

transformers' DynamicCache concatenates each step's keys and values onto the cache, copying every layer's whole
cache once per step: at batch 100 and 100 cached positions a third of a decoding step on the CPU. Here each
layer's keys and values live in a buffer with room for the tokens to come; a step writes into that room, and
attention reads a view of the filled part. Imported by ftpipe.scoring when it decodes (it imports transformers).
"""

from __future__ import annotations

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
