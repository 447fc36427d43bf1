"""Generation state: one `ModelCache` per batch, holding one entry per layer.

The entry type is the layer's business: attention layers keep a preallocated `KVCache`, recurrent
layers (RG-LRU, Mamba2) keep their conv and scan states in a `RecurrentState`. The model cache
itself only tracks what every layer shares: how many positions have been consumed, which of them
are real tokens (left padding), and each row's next position id. `ModelCache.begin` turns one
forward call into a `Step` that all layers read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Step:
    """What every layer needs to know about one forward call."""

    start: int  # index of the first new position in the cache (0 without a cache)
    length: int  # number of new positions T
    key_mask: torch.Tensor  # [B, >= start+T] bool, True at real tokens
    positions: torch.Tensor  # [B, T] position ids: real tokens before this one, pads get 0
    has_padding: bool  # whether key_mask has any False in [0, start+T)

    @property
    def end(self) -> int:
        return self.start + self.length


class KVCache:
    """Keys and values of one attention layer, preallocated to the generation's full length so
    decoding writes in place instead of growing tensors by concatenation every step."""

    def __init__(self, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        # Uninitialised: a position is always written (pads included) before any read of it.
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.keys.shape[2]:
            raise RuntimeError(f"KV cache is full: {end} positions needed, {self.keys.shape[2]} allocated")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        return self.keys[:, :, :end], self.values[:, :, :end]

    def extend(self, k: torch.Tensor, v: torch.Tensor, step: Step, mask: torch.Tensor | None):
        """Add a step's keys and values; return the keys, values and mask its queries attend over
        (here: every position so far, under the mask the layer built)."""
        k, v = self.update(k, v, step.start)
        return k, v, mask


class WindowKVCache:
    """Keys and values of a sliding-window attention layer in a ring of window + 1 slots: a
    query attends to itself and the `window` positions before it, so memory stays constant
    however long the sequence grows. Each slot records which position it holds, and the cache
    builds the mask of its keys (the layer's own mask does not know the ring's order).
    """

    def __init__(self, batch: int, num_kv_heads: int, window: int, head_dim: int, dtype, device):
        self.window = window
        self.slots = window + 1
        shape = (batch, num_kv_heads, self.slots, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Whether each row's slot holds a real token (False: empty, or a left pad). Which position
        # a slot holds follows from the number written: position p lives in slot p % (window + 1).
        self.real = torch.zeros(batch, self.slots, dtype=torch.bool, device=device)

    def extend(self, k: torch.Tensor, v: torch.Tensor, step: Step, mask: torch.Tensor | None):
        T, start, end = k.shape[2], step.start, step.end
        if T == 1:
            # Decode: write in place; the ring then holds exactly the keys this query may see.
            slot = start % self.slots
            self.keys[:, :, slot] = k[:, :, 0]
            self.values[:, :, slot] = v[:, :, 0]
            self.real[:, slot] = step.key_mask[:, start]
            # Until the ring wraps, slots 0..start hold positions 0..start: attend over those only.
            used = min(start + 1, self.slots)
            keys, values = self.keys[:, :, :used], self.values[:, :, :used]
            if not step.has_padding:
                return keys, values, None
            return keys, values, self.real[:, None, None, :used]
        new = torch.arange(start, end, device=k.device)
        real_new = step.key_mask[:, start:end]
        # Slots holding earlier positions (all of them once the ring has wrapped), in slot order:
        # slot s holds the last position before `start` that is s modulo the ring's size.
        used = min(start, self.slots)
        slot = torch.arange(used, device=k.device)
        held = torch.cat([slot + self.slots * ((start - 1 - slot) // self.slots), new])
        keys = torch.cat([self.keys[:, :, :used], k], dim=2)
        values = torch.cat([self.values[:, :, :used], v], dim=2)
        real = torch.cat([self.real[:, :used], real_new], dim=1)
        q = new[:, None]
        allowed = (held[None, :] <= q) & (held[None, :] >= q - self.window)
        visible = allowed[None, None] & real[:, None, None, :]
        visible = visible | (held[None, :] == q)[None, None]  # a pad query keeps its own key: no empty row
        # Keep the last window + 1 new positions for the steps that follow.
        n = min(T, self.slots)
        kept = new[-n:]
        slots = kept % self.slots
        self.keys[:, :, slots] = k[:, :, -n:]
        self.values[:, :, slots] = v[:, :, -n:]
        self.real[:, slots] = real_new[:, -n:]
        return keys, values, visible


@dataclass
class RecurrentState:
    """Named state tensors of a recurrent layer (conv window, scan state), created lazily by
    the layer on its first call and updated in place afterwards."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)

    def set(self, name: str, value: torch.Tensor) -> None:
        self.tensors[name] = value


class ModelCache:
    def __init__(self, layers: list[Any], batch: int, max_len: int, device):
        self.layers = layers
        self.max_len = max_len
        self.length = 0
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.has_padding = False

    def __getitem__(self, index: int) -> Any:
        return self.layers[index]

    def begin(self, attention_mask: torch.Tensor | None, length: int) -> Step:
        """Record the new positions of this call and return its Step.

        attention_mask covers only the new positions [B,T] (1 = real token); None means all real,
        which is what every decode step passes, so the hot loop never inspects a mask.
        """
        start, end = self.length, self.length + length
        if end > self.max_len:
            raise RuntimeError(f"cache holds {self.max_len} positions, {end} needed")
        if attention_mask is None:
            positions = self.next_position[:, None] + torch.arange(length, device=self.key_mask.device)
            self.next_position += length
        else:
            mask = attention_mask.bool()
            self.key_mask[:, start:end] = mask
            self.has_padding = self.has_padding or not bool(mask.all())
            positions = self.next_position[:, None] + mask.long().cumsum(-1) - 1
            positions = positions.clamp(min=0).masked_fill(~mask, 0)
            self.next_position += mask.long().sum(-1)
        self.length = end
        return Step(start, length, self.key_mask, positions, self.has_padding)


def uncached_step(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> Step:
    """The Step of a plain forward over a whole sequence (no cache)."""
    if attention_mask is None:
        key_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        positions = torch.arange(length, device=device).expand(batch, length)
        return Step(0, length, key_mask, positions, False)
    key_mask = attention_mask.bool()
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0).masked_fill(~key_mask, 0)
    return Step(0, length, key_mask, positions, not bool(key_mask.all()))


def begin_step(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: "ModelCache | None") -> Step:
    """The Step of one backbone call: from the cache when generating, else over the whole input."""
    B, T = input_ids.shape
    if cache is None:
        return uncached_step(attention_mask, B, T, input_ids.device)
    return cache.begin(attention_mask, T)


def kv_cache(num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype, device) -> ModelCache:
    """A ModelCache of preallocated KV caches, for backbones whose every layer is attention."""
    layers = [KVCache(batch, num_kv_heads, max_len, head_dim, dtype, device) for _ in range(num_layers)]
    return ModelCache(layers, batch, max_len, device)
