"""Random windows of a token stream as training batches, with an exactly restorable state.

Each step draws ``world_size * batch_size`` window starts from one seeded generator (nanoGPT style:
uniform offsets, windows of T+1 tokens) and rank r keeps its own slice of them. Every rank thus reads
different windows, and the ranks together see exactly the batches a single process with
``world_size * batch_size`` rows would see. The generator's state is part of ``state_dict`` and is
the same on every rank, so saving rank 0's state suffices; restoring it under another world size that
divides the global batch continues the same global stream.

Legend: B batch rows, T sequence length, W world size.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

from ..errors import UserError

STATE_VERSION = 1


class BatchLoader:
    """Seeded batches of (x, y) int64 windows (y is x shifted by one token), sharded by rank."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.tokens = tokens
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.step = 0
        self._rng = np.random.Generator(np.random.PCG64(self.seed))
        self.set_shape(batch_size, seq_len)

    def set_shape(self, batch_size: int, seq_len: int) -> None:
        """Change (B, T) from the next batch on (a sequence-length curriculum); the draws stay seeded."""
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if len(self.tokens) < seq_len + 1:
            raise UserError(f"{len(self.tokens)} tokens cannot fill one window of {seq_len + 1} "
                            f"(sequence length {seq_len} + 1): use more text or a shorter sequence")
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)

    def next_batch(self) -> Tuple[np.ndarray, np.ndarray]:
        """The next (x, y), each (B, T) int64 numpy arrays (the trainer turns them into tensors)."""
        B, T = self.batch_size, self.seq_len
        starts_all = self._rng.integers(0, len(self.tokens) - T, size=self.world_size * B)  # (W*B,)
        starts = starts_all[self.rank * B:(self.rank + 1) * B]  # (B,)
        windows = np.asarray(self.tokens[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # (B, T+1)
        self.step += 1
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def __iter__(self) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serializable state: shape, step and the exact generator state."""
        rng = self._rng.bit_generator.state
        return {"version": STATE_VERSION, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "step": self.step,
                "num_tokens": int(len(self.tokens)),
                "rng": {"state": hex(rng["state"]["state"]), "inc": hex(rng["state"]["inc"]),
                        "has_uint32": int(rng["has_uint32"]), "uinteger": int(rng["uinteger"])}}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state_dict`` was taken (same tokens; the global batch is kept)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"unsupported data loader state version {state.get('version')}")
        if int(state["num_tokens"]) != len(self.tokens):
            raise UserError(f"the data changed since this state was saved ({state['num_tokens']} tokens then, "
                            f"{len(self.tokens)} now)")
        global_batch = int(state["batch_size"]) * int(state["world_size"])
        if global_batch % self.world_size:
            raise UserError(f"the saved global batch of {global_batch} rows does not split over "
                            f"{self.world_size} ranks")
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self.set_shape(global_batch // self.world_size, int(state["seq_len"]))
        rng = state["rng"]
        self._rng.bit_generator.state = {
            "bit_generator": "PCG64", "state": {"state": int(rng["state"], 16), "inc": int(rng["inc"], 16)},
            "has_uint32": int(rng["has_uint32"]), "uinteger": int(rng["uinteger"])}


def sequential_batches(tokens: np.ndarray, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                       max_batches: int | None = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Consecutive non-overlapping windows from the start (for a fixed validation pass), sharded by rank."""
    n_windows = (len(tokens) - 1) // seq_len
    starts = np.arange(n_windows) * seq_len
    starts = starts[rank::world_size]
    count = 0
    for i in range(0, len(starts), batch_size):
        if max_batches is not None and count >= max_batches:
            return
        chunk = starts[i:i + batch_size]
        windows = np.asarray(tokens[chunk[:, None] + np.arange(seq_len + 1)], dtype=np.int64)  # (b, T+1)
        yield np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
        count += 1


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy of the token frequency distribution, in nats per token (a floor for a unigram model's loss)."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return 0.0
    counts = np.bincount(tokens.astype(np.int64, copy=False))
    p = counts[counts > 0] / tokens.size
    return float(-(p * np.log(p)).sum())
