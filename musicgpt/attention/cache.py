"""Key/value caches for one-token-at-a-time decoding, behind one protocol the layers call.

`KVCache` grows and keeps keys in time order (the CPU path, any chunk size, readable attention
rows); `RingKVCache` keeps the last `window` positions in fixed buffers at fixed addresses, which
is what a CUDA graph replay needs. A decoder first tells its cache where the new tokens go
(`KVCache.begin` / `RingKVCache.begin`), then every layer calls `write`, then `commit`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from musicgpt.errors import MusicGPTError


class KeyValueCache(Protocol):
    """What an attention layer asks of a cache during a decoding step."""

    window: int

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store one layer's new keys/values [B, H, T_new, D]; return the keys/values the new
        queries attend over."""

    def reorder(self, rows: Tensor) -> None:
        """Row b continues old row rows[b] (beam search)."""


def _check_window(window: int) -> None:
    if window <= 0:
        raise MusicGPTError(f"KV cache window must be positive, got {window}")


class KVCache:
    """Keys and values of the most recent tokens, oldest first, in buffers that grow as needed.

    Layout: one buffer [n_layer, B, n_head, capacity, d_head] each for keys and values, slots
    0..held-1 holding positions length-held .. length-1 in order. Capacity is the window plus
    some room; when a step does not fit, the newest window-1 keys move to the front (one copy
    every `room` tokens, so per-token cost stays flat) and a prefill chunk too large for the
    room grows the buffers. Keeping keys in time order (not a ring) keeps the returned
    attention rows readable and each step's keys one contiguous slice.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, d_head: int, window: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        _check_window(window)
        self.window = window
        self.room = max(64, window // 4)
        shape = (n_layer, batch_size, n_head, window - 1 + self.room, d_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.length = 0  # tokens seen so far
        self.held = 0    # tokens whose keys are in slots [0, held)
        self.slots = (0, 0, 0)  # this step's (write_at, first_key, end), set by `begin`

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    def reorder(self, rows: Tensor) -> None:
        """Row b becomes old row rows[b] (beam search); the batch may grow or shrink."""
        idx = rows.to(self.k.device)
        self.k = self.k.index_select(1, idx)
        self.v = self.v.index_select(1, idx)

    def begin(self, n_new: int) -> tuple[int, int, int]:
        """Make room for n_new tokens; return and keep this step's (write_at, first_key, end)."""
        if self.held + n_new > self.capacity:
            keep = min(self.held, self.window - 1)  # all the first new query can still see
            if keep + n_new > self.capacity:
                self._grow(keep + n_new + self.room)
            # clone: source and destination slices may overlap
            self.k[:, :, :, :keep] = self.k[:, :, :, self.held - keep:self.held].clone()
            self.v[:, :, :, :keep] = self.v[:, :, :, self.held - keep:self.held].clone()
            self.held = keep
        first = max(0, self.held - (self.window - 1))
        self.slots = (self.held, first, self.held + n_new)
        return self.slots

    def _grow(self, capacity: int) -> None:
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], capacity, old.size(4))
            new[:, :, :, :self.held] = old[:, :, :, :self.held]
            setattr(self, name, new)

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        write_at, first, end = self.slots
        self.k[layer, :, :, write_at:end] = k
        self.v[layer, :, :, write_at:end] = v
        return self.k[layer, :, :, first:end], self.v[layer, :, :, first:end]

    def commit(self, n_new: int) -> None:
        """The step's n_new tokens are now held."""
        self.held += n_new
        self.length += n_new


class RingKVCache:
    """Keys and values of the last `window` positions in fixed buffers, position p in slot p % W.

    Every step touches the same shapes and addresses (the write slot and the token count live on
    the device), so a step can be captured once as a CUDA graph and replayed. One token per step.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, d_head: int, window: int,
                 device: torch.device, dtype: torch.dtype):
        _check_window(window)
        self.window = window
        self.k = torch.zeros(n_layer, batch_size, n_head, window, d_head, device=device,
                             dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # tokens seen so far
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where this step writes
        self._slots = torch.arange(window, device=device)

    def begin(self) -> Tensor:
        """Point this step's write at slot pos % W; return each slot's distance back from the new
        token ([W], on the device: no host sync)."""
        self.slot.copy_((self.pos % self.window).view(1))
        return (self.pos - self._slots) % self.window

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new key/value at this step's slot and return all slots (the caller masks
        the ones not written yet)."""
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

    def commit(self) -> None:
        self.pos.add_(1)

    def reorder(self, rows: Tensor) -> None:
        """Row b becomes old row rows[b] (beam search), in place: a graph keeps its buffers."""
        if rows.numel() != self.k.size(1):
            raise ValueError(f"a fixed-shape cache keeps {self.k.size(1)} rows, got {rows.numel()}")
        rows = rows.to(self.k.device)
        self.k.copy_(self.k.index_select(1, rows))
        self.v.copy_(self.v.index_select(1, rows))

    def load(self, keys: Tensor, values: Tensor, length: int) -> None:
        """Fill the ring from the newest cached keys/values [n_layer, B', H, n, D] of a sequence
        `length` tokens long (rows broadcast when B' is 1); older slots are zeroed."""
        n = keys.size(3)
        slots = torch.arange(length - n, length, device=self.k.device) % self.window
        for mine, theirs in ((self.k, keys), (self.v, values)):
            mine.zero_()
            mine[:, :, :, slots] = theirs
        self.pos.fill_(length)
