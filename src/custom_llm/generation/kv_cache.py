"""A preallocated key/value cache for generation: full buffers for full-attention layers, rolling
buffers for sliding-window layers.

Time and positions. Prompts of different lengths are left-padded to a common length, so every row
shares one *time* axis (the slot a token occupies). Row b has ``pad[b]`` padding tokens in front;
its token at time t sits at RoPE position ``t - pad[b]``, so real tokens start at position 0 in
every row. Keys at times before ``pad[b]`` are padding and never attended to.

Buffers (per layer, kv heads only, as in grouped-query attention):

* full-attention layer: ``(B, K, max_len, D)``, the key of time t in slot t;
* sliding-window layer with window W: ``(B, K, W, D)``, a ring: the key of time t in slot t mod W.
  Writing time t overwrites time t - W, which no later query may see (query i sees keys j with
  i - W < j <= i), so memory stays bounded by the window however long generation runs.

A forward pass does not talk to this class directly: it gets a *view* for one step
(:meth:`KVCache.prefill_view`, :meth:`KVCache.decode_view`) that implements the protocol of
``Attention.forward``: ``update(layer_idx, k, v) -> (k_all, v_all, mask)``. Views compute the masks
once per forward, not once per layer. Every query row keeps at least its own key (padding queries
included), so no softmax row is empty (an empty row is NaN in SDPA).

Continuous batching (:mod:`.batch`) uses :class:`SlotKVCache`: each row (a *slot*) holds its own
sequence at its own time, is prefilled alone through :meth:`SlotKVCache.rows`, and is decoded together
with the other rows by a view that takes one time per row.

Legend: B batch, K kv heads, T new tokens, S cached key slots, D head dim, W window.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Preallocated per-layer key/value buffers; ``layer_windows[i]`` None = full attention.

    Holds sequences of at most ``max_len`` times for full-attention layers; sliding-window layers
    have no length limit.
    """

    def __init__(self, layer_windows: list[Optional[int]], batch_size: int, max_len: int, n_kv_heads: int,
                 head_dim: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        # A window that covers the whole cache never binds: such a layer is stored as a full one.
        self.layer_windows = [w if w is not None and w < max_len else None for w in layer_windows]
        self.batch_size = batch_size
        self.max_len = max_len
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for window in self.layer_windows:
            slots = max_len if window is None else window
            # Zeros, not empty: a masked slot still enters probs @ v with weight 0, and 0 * NaN = NaN.
            self.keys.append(torch.zeros(batch_size, n_kv_heads, slots, head_dim, device=device, dtype=dtype))
            self.values.append(torch.zeros(batch_size, n_kv_heads, slots, head_dim, device=device, dtype=dtype))
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,) left padding per row
        self.full_slots = torch.arange(max_len, device=device)  # (max_len,) time held by each full slot
        self.windows = sorted({w for w in self.layer_windows if w is not None})
        self.has_full = any(w is None for w in self.layer_windows)
        self.ring_slots = {w: torch.arange(w, device=device) for w in self.windows}  # (W,)
        if torch.device(device).type == "cuda" and hasattr(torch, "_dynamo"):
            # CUDA graphs then read and update these tensors in place instead of copying them every step.
            for t in (*self.keys, *self.values, self.pad, self.full_slots, *self.ring_slots.values()):
                torch._dynamo.mark_static_address(t)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> "KVCache":
        """A cache shaped for ``model`` (a :class:`~custom_llm.model.Transformer`), on its device and dtype."""
        config = model.config
        weight = model.embed_tokens.weight
        return cls(model.layer_windows, batch_size, max_len, config.n_kv_heads, config.resolved_head_dim,
                   device=weight.device, dtype=weight.dtype)

    def reset(self, pad: torch.Tensor) -> None:
        """Start a new batch of sequences with left padding ``pad`` (B,); old keys become invisible."""
        self.pad.copy_(pad)

    def memory_slots(self) -> list[int]:
        """Key slots held per layer (max_len for full layers, W for sliding-window layers)."""
        return [k.shape[2] for k in self.keys]

    def prefill_view(self, start: int, length: int) -> "PrefillView":
        """A view for a forward over times start .. start + length - 1 (any length, also > W)."""
        return PrefillView(self, start, length)

    def decode_view(self, time: torch.Tensor, read_len: Optional[int] = None) -> "DecodeView":
        """A view for a one-token forward at ``time`` ((1,) long tensor on the cache's device).

        ``read_len`` (eager use) limits full layers to the first ``read_len`` slots; None reads all
        ``max_len`` slots with a mask, which keeps shapes static for CUDA graphs.
        """
        return DecodeView(self, time, read_len)


def ring_slot_times(slots: torch.Tensor, last: torch.Tensor | int, window: int) -> torch.Tensor:
    """Time held by each ring slot once times up to ``last`` are written: the latest t <= last with
    t = slot (mod W). Negative means never written."""
    return last - torch.remainder(last - slots, window)


class PrefillView:
    """Cache protocol for a forward over a chunk of T new tokens (the prompt)."""

    def __init__(self, cache: KVCache, start: int, length: int):
        self.cache = cache
        self.start = start
        self.length = length
        device = cache.pad.device
        pad = cache.pad.view(-1, 1, 1)  # (B, 1, 1)
        q_time = torch.arange(start, start + length, device=device).view(1, -1, 1)  # (1, T, 1)
        self.chunk_slots = torch.arange(start, start + length, device=device)  # (T,)

        self.full_mask: Optional[torch.Tensor] = None
        if cache.has_full and (start > 0 or bool(cache.pad.any())):
            full_k = cache.full_slots[: start + length].view(1, 1, -1)  # (1, 1, S)
            self.full_mask = _visible(q_time, full_k, pad, None).unsqueeze(1)  # (B, 1, T, S)
        # Otherwise (a fresh, unpadded prompt) full layers see exactly the causal triangle: mask None
        # tells Attention to use the kernel's is_causal path, which is faster than an explicit mask.
        self.window_masks = {}
        for w in cache.windows:
            ring_k = ring_slot_times(cache.ring_slots[w], start - 1, w)  # (W,) times already in the ring
            keys = torch.cat((ring_k, self.chunk_slots)).view(1, 1, -1)  # (1, 1, W + T)
            self.window_masks[w] = _visible(q_time, keys, pad, w).unsqueeze(1)  # (B, 1, T, W + T)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store this chunk's k, v (B, K, T, D); return every key/value the chunk may see, and the mask."""
        cache = self.cache
        window = cache.layer_windows[layer_idx]
        k_buf, v_buf = cache.keys[layer_idx], cache.values[layer_idx]
        end = self.start + self.length
        if window is None:
            k_buf[:, :, self.start:end] = k
            v_buf[:, :, self.start:end] = v
            return k_buf[:, :, :end], v_buf[:, :, :end], self.full_mask
        # Read the ring before writing: early queries of a long chunk still need keys it overwrites.
        k_all = torch.cat((k_buf, k), dim=2)  # (B, K, W + T, D)
        v_all = torch.cat((v_buf, v), dim=2)
        keep = min(self.length, window)  # only the last W keys of the chunk can still be needed
        slots = torch.remainder(self.chunk_slots[-keep:], window)
        k_buf.index_copy_(2, slots, k[:, :, -keep:])
        v_buf.index_copy_(2, slots, v[:, :, -keep:])
        return k_all, v_all, self.window_masks[window]


class DecodeView:
    """Cache protocol for a one-token forward; static shapes when ``read_len`` is None."""

    def __init__(self, cache: KVCache, time: torch.Tensor, read_len: Optional[int]):
        self.cache = cache
        self.time = time  # (1,)
        self.read_len = read_len
        pad = cache.pad.view(-1, 1)  # (B, 1)
        if cache.has_full:
            full_k = cache.full_slots if read_len is None else cache.full_slots[:read_len]
            # Decode times are past the padding, so the query's own key is always visible.
            self.full_mask = ((full_k <= time) & (full_k >= pad)).view(cache.batch_size, 1, 1, -1)  # (B, 1, 1, S)
        self.window_masks = {}
        self.ring_index = {}
        for w in cache.windows:
            ring_k = ring_slot_times(cache.ring_slots[w], time, w)  # (W,) after writing this step
            self.window_masks[w] = (ring_k >= pad).view(cache.batch_size, 1, 1, w)  # (B, 1, 1, W)
            self.ring_index[w] = torch.remainder(time, w)  # (1,)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write this token's k, v (B, K, 1, D) in place; return the layer's buffers and the mask."""
        cache = self.cache
        window = cache.layer_windows[layer_idx]
        k_buf, v_buf = cache.keys[layer_idx], cache.values[layer_idx]
        if window is None:
            k_buf.index_copy_(2, self.time, k)
            v_buf.index_copy_(2, self.time, v)
            if self.read_len is not None:
                return k_buf[:, :, :self.read_len], v_buf[:, :, :self.read_len], self.full_mask
            return k_buf, v_buf, self.full_mask
        k_buf.index_copy_(2, self.ring_index[window], k)
        v_buf.index_copy_(2, self.ring_index[window], v)
        return k_buf, v_buf, self.window_masks[window]


class SlotKVCache(KVCache):
    """A :class:`KVCache` whose rows are independent sequences (slots) at their own times.

    ``rows(b, b + 1)`` is a cache over one slot that shares these buffers (prefill it with the usual
    :func:`~custom_llm.generation.generate.prefill`); :meth:`decode_view` takes a time per row (B,), so one
    forward decodes every slot, each at its own position. Freeing a slot needs no clearing: a new
    sequence overwrites the times it uses, and keys of older times are never visible to it.
    """

    def rows(self, start: int, stop: int) -> "SlotKVCache":
        """A cache over rows start .. stop - 1, sharing this one's buffers (writes go through)."""
        if start == 0 and stop == self.batch_size:
            return self
        view = object.__new__(SlotKVCache)
        view.__dict__.update(self.__dict__)
        view.batch_size = stop - start
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.pad = self.pad[start:stop]
        return view

    def decode_view(self, time: torch.Tensor, read_len: Optional[int] = None) -> "SlotDecodeView":
        """A view for a one-token forward of every row, row b at ``time[b]`` ((B,) long tensor)."""
        return SlotDecodeView(self, time, read_len)


class SlotDecodeView:
    """Cache protocol for a one-token forward in which each row has its own time (B,)."""

    def __init__(self, cache: KVCache, time: torch.Tensor, read_len: Optional[int]):
        self.cache = cache
        self.read_len = read_len
        B = cache.batch_size
        self.rows = torch.arange(B, device=time.device)  # (B,)
        self.time = time.view(B)  # (B,)
        t, pad = self.time.view(B, 1), cache.pad.view(B, 1)  # (B, 1)
        if cache.has_full:
            full_k = cache.full_slots if read_len is None else cache.full_slots[:read_len]
            self.full_mask = ((full_k <= t) & (full_k >= pad)).view(B, 1, 1, -1)  # (B, 1, 1, S)
        self.window_masks = {}
        self.ring_index = {}
        for w in cache.windows:
            ring_k = ring_slot_times(cache.ring_slots[w], t, w)  # (B, W) times held after this step's write
            self.window_masks[w] = (ring_k >= pad).view(B, 1, 1, w)  # (B, 1, 1, W)
            self.ring_index[w] = torch.remainder(self.time, w)  # (B,)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Write row b's k, v (B, K, 1, D) at its own slot; return the layer's buffers and the mask."""
        cache = self.cache
        window = cache.layer_windows[layer_idx]
        k_buf, v_buf = cache.keys[layer_idx], cache.values[layer_idx]
        index = self.time if window is None else self.ring_index[window]  # (B,)
        k_buf[self.rows, :, index] = k[:, :, 0]  # (B, K, D) into slot index[b] of row b
        v_buf[self.rows, :, index] = v[:, :, 0]
        if window is None:
            if self.read_len is not None:
                return k_buf[:, :, :self.read_len], v_buf[:, :, :self.read_len], self.full_mask
            return k_buf, v_buf, self.full_mask
        return k_buf, v_buf, self.window_masks[window]


def _visible(q_time: torch.Tensor, k_time: torch.Tensor, pad: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    """Bool (B, T, S): key time k visible from query time q (causal, in the window, not padding, written).

    A query always sees itself, so padding queries (which see no real key) keep a non-empty row.
    """
    allowed = (k_time <= q_time) & (k_time >= pad) & (k_time >= 0)
    if window is not None:
        allowed = allowed & (k_time > q_time - window)
    return allowed | (k_time == q_time)
