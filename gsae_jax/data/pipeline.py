"""Shard folder -> globally shuffled [batch, d_model] jax.Arrays on the mesh, with Grain.

The token stream is the concatenation of epochs, each a seeded permutation of all rows of all
shards; global batch b is stream positions [b * batch, (b + 1) * batch), so every token appears
exactly once per epoch, batches may straddle an epoch boundary, and nothing is dropped. Process p
of P reads its contiguous 1/P of each global batch. One Grain element is one process-local batch
(rows gathered from memory-mapped shards), which keeps Grain's per-element cost off the row level.
"""

from __future__ import annotations

import math
import sys

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from gsae_jax.data.shards import DTYPES, ShardSet

_ROUNDS = 6
_FOREVER = sys.maxsize // 2  # batches in an endless stream (Grain needs a length)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser on uint64 (wrapping arithmetic): the Feistel round function."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
  """A seeded bijection of [0, n) applied to `index` (vectorised, O(len(index)) memory).

  A balanced Feistel network on the smallest even number of bits covering n, with cycle walking
  (values that land outside [0, n) go round again), the method of Grain's `index_shuffle`; that one
  is one Python call per index (~120k/s here), this one runs on whole batches."""
  index = np.asarray(index, np.int64)
  if n == 1:
    return np.zeros_like(index)
  half = max(1, math.ceil((n - 1).bit_length() / 2))
  mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
  keys = np.random.default_rng([seed, epoch]).integers(0, 2**64 - 1, size=_ROUNDS,
                                                        dtype=np.uint64, endpoint=True)
  out = index.astype(np.uint64)
  todo = np.ones(out.shape, bool)
  while todo.any():
    y = out[todo]
    for k in keys:
      left, right = y >> shift, y & mask
      y = (right << shift) | (left ^ (_mix(right ^ k) & mask))
    out[todo] = y
    todo = out >= np.uint64(n)
  return out.astype(np.int64)


def batch_rows(batch: int, num_tokens: int, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1) -> np.ndarray:
  """Global row ids [global_batch // process_count] int64 of this process's slice of batch b."""
  local = global_batch // process_count
  pos = batch * global_batch + process_index * local + np.arange(local, dtype=np.int64)
  epoch, within = np.divmod(pos, num_tokens)
  rows = np.empty_like(pos)
  for e in np.unique(epoch):
    sel = epoch == e
    rows[sel] = permute(within[sel], num_tokens, seed, int(e))
  return rows


class ShardIterator:
  """`BatchIterator` over a `ShardSet`: [global_batch, d_model] float32 (bfloat16 shards stay
  bfloat16 with `keep_bf16`), scaled by `scale`, sharded with `sharding`. State: Grain's
  iterator state plus what must match on restore."""

  def __init__(self, shard_set: ShardSet, global_batch: int, sharding: NamedSharding,
               scale: float = 1.0, seed: int = 0, num_epochs: int = 0, num_threads: int = 2,
               prefetch: int = 4, process_index: int | None = None,
               process_count: int | None = None, keep_bf16: bool = False):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch % self.process_count:
      raise ValueError(f"batch size {global_batch}: expected a multiple of the process count "
                       f"{self.process_count}")
    if num_epochs < 0:
      raise ValueError(f"data.num_epochs={num_epochs}: expected >= 0 (0 = repeat forever)")
    self.shard_set, self.global_batch, self.sharding = shard_set, global_batch, sharding
    self.scale, self.seed, self.num_epochs = float(scale), seed, num_epochs
    self.dtype = (shard_set.dtype if keep_bf16 and shard_set.dtype == DTYPES["bfloat16"]
                  else np.dtype(np.float32))
    n = shard_set.num_tokens
    self.num_batches = num_epochs * n // global_batch if num_epochs else _FOREVER
    dataset = grain.MapDataset.range(self.num_batches).map(self._read)
    self._it = iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

  def rows(self, batch: int) -> np.ndarray:
    """This process's global row ids of batch `batch`."""
    return batch_rows(batch, self.shard_set.num_tokens, self.global_batch, self.seed,
                      self.process_index, self.process_count)

  def _read(self, batch: int) -> np.ndarray:
    rows = self.rows(batch)
    x = self.shard_set.gather(rows).astype(self.dtype, copy=False)
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():  # the open-time scan was switched off, or a file changed under us
      row = int(rows[np.argmin(finite)])
      s = int(self.shard_set.shard_of(np.array([row]))[0])
      raise ValueError(f"shard {self.shard_set.paths()[s]}: non-finite activations (NaN or Inf) "
                       f"at row {row - self.shard_set.offsets[s]}")
    if self.scale != 1.0:
      x *= x.dtype.type(self.scale)  # bf16: rounded once more, as the bf16 matmul would
    return x

  def __iter__(self):
    return self

  def next_local(self) -> np.ndarray:
    """This process's slice [global_batch // process_count, d_model] as numpy."""
    return next(self._it)

  def __next__(self) -> jax.Array:
    local = self.next_local()
    return jax.make_array_from_process_local_data(
        self.sharding, local, (self.global_batch, self.shard_set.d_model))

  def _identity(self) -> dict:
    return {"seed": self.seed, "global_batch": self.global_batch,
            "num_tokens": self.shard_set.num_tokens, "num_epochs": self.num_epochs}

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), **self._identity()}

  def set_state(self, state: dict) -> None:
    mine = self._identity()
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
      raise ValueError(f"data iterator state from another stream (saved, now): {diff}; "
                       f"folder {self.shard_set.folder}")
    self._it.set_state(state["grain"])
