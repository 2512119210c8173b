"""Shard folder -> shuffled [batch, d_model] jax.Arrays on the mesh, with Grain.

Two shuffles (`config.data.shuffle`): 'global', here, for local disks, and 'block'
(`block_shuffle.py`) for remote or slow storage. Global: the token stream is the concatenation of
epochs, each a seeded permutation of all rows of all shards; global batch b is stream positions
[b * batch, (b + 1) * batch), so every token appears exactly once per epoch, batches may straddle
an epoch boundary, and nothing is dropped. Process p of P reads its contiguous 1/P of each global
batch by row gathers from memory-mapped shards (one random read per row: local files only). One
Grain element is one process-local batch, which keeps Grain's per-element cost off the row
level.
"""

from __future__ import annotations

import dataclasses
import sys

import grain
import jax
import numpy as np
from jax.sharding import NamedSharding

from gsae_jax.data import storage
from gsae_jax.data.block_shuffle import (
  BlockLayout,
  BlockReader,
  BlockSpec,
  check_lanes,
  process_lanes,
)
from gsae_jax.data.permutation import permute
from gsae_jax.data.shards import DTYPES, ShardSet, first_non_finite, non_finite_error
from gsae_jax.data.storage import FileReader, RangeReader
from gsae_jax.errors import DataError

_FOREVER = sys.maxsize // 2  # batches in an endless stream (Grain needs a length)


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
  bfloat16 with `keep_bf16`), scaled by `scale`, sharded with `sharding`.

  `block=None`: the global row shuffle above (memory-mapped local shards). A `BlockSpec`: the
  block shuffle of `block_shuffle.py` (sequential block reads through `reader`, any storage).
  Both make batch b a pure function of b; one Grain element is one process-local batch, and the
  state is Grain's iterator state plus what must match on restore (the stream's identity).
  `num_epochs` > 0 ends the stream after the last batch that stays within `num_epochs` epochs
  (block shuffle: within every lane's `num_epochs` epochs)."""

  def __init__(self, shard_set: ShardSet, global_batch: int, sharding: NamedSharding,
               scale: float = 1.0, seed: int = 0, num_epochs: int = 0, num_threads: int = 2,
               prefetch: int = 4, process_index: int | None = None,
               process_count: int | None = None, keep_bf16: bool = False,
               block: BlockSpec | None = None, reader: RangeReader | None = None):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch % self.process_count:
      raise ValueError(f"batch size {global_batch}: expected a multiple of the process count "
                       f"{self.process_count}")
    if num_epochs < 0:
      raise ValueError(f"data.num_epochs={num_epochs}: expected >= 0 (0 = repeat forever)")
    self.shard_set, self.global_batch, self.sharding = shard_set, global_batch, sharding
    self.scale, self.seed, self.num_epochs, self.block = float(scale), seed, num_epochs, block
    self.dtype = (shard_set.dtype if keep_bf16 and shard_set.dtype == DTYPES["bfloat16"]
                  else np.dtype(np.float32))
    if block is None:
      if not storage.is_local(shard_set.folder):
        raise DataError(f"shard folder {shard_set.folder}: the global shuffle reads rows one by "
                        "one, which needs a local folder; read remote or slow storage with "
                        "config.data.shuffle='block'")
      self._local_rows = self._gather
      self.num_batches = (num_epochs * shard_set.num_tokens // global_batch if num_epochs
                          else _FOREVER)
    else:
      check_lanes(block, global_batch, self.process_count)
      layout = BlockLayout(shard_set.num_tokens, block, seed)
      lane_batch = global_batch // block.lanes
      lanes = process_lanes(block.lanes, self.process_index, self.process_count)
      self._local_rows = BlockReader(shard_set, layout, lane_batch, lanes,
                                     reader or FileReader()).local_batch
      self.num_batches = layout.num_batches(num_epochs, lane_batch) if num_epochs else _FOREVER
    dataset = grain.MapDataset.range(self.num_batches).map(self._read)
    self._it = iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)))

  def rows(self, batch: int) -> np.ndarray:
    """This process's global row ids of batch `batch` (global shuffle)."""
    return batch_rows(batch, self.shard_set.num_tokens, self.global_batch, self.seed,
                      self.process_index, self.process_count)

  def _gather(self, batch: int) -> np.ndarray:
    rows = self.rows(batch)
    x = self.shard_set.gather(rows)
    bad = first_non_finite(x)
    if bad is not None:  # the open-time scan was switched off, or a file changed under us
      row = int(rows[bad])
      s = int(self.shard_set.shard_of(np.array([row]))[0])
      raise non_finite_error(self.shard_set.paths()[s], row - self.shard_set.offsets[s])
    return x

  def _read(self, batch: int) -> np.ndarray:
    x = self._local_rows(batch).astype(self.dtype, copy=False)  # a fresh array in both modes
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
    ident = {"seed": self.seed, "global_batch": self.global_batch,
             "num_tokens": self.shard_set.num_tokens, "num_epochs": self.num_epochs,
             "shuffle": "global" if self.block is None else "block"}
    if self.block is not None:
      ident.update(dataclasses.asdict(self.block))
    return ident

  def get_state(self) -> dict:
    return {"grain": self._it.get_state(), **self._identity()}

  def set_state(self, state: dict) -> None:
    saved = {"shuffle": "global", **state}  # states saved before the block shuffle existed
    diff = {k: (saved.get(k), v) for k, v in self._identity().items() if saved.get(k) != v}
    if diff:
      raise ValueError(f"data iterator state from another stream (saved, now): {diff}; "
                       f"folder {self.shard_set.folder}")
    self._it.set_state(state["grain"])
