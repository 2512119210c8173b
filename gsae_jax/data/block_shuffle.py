"""Block shuffle: batches from shards on slow or remote storage, read as contiguous blocks of rows
(one large sequential read per block) and mixed in a bounded in-memory buffer.

The stream is a pure function of the batch index, so Grain's state (the next batch) is exact on
resume and its read-ahead threads may ask for any batch, and it does not depend on the process
count:
- the rows of all shards are cut into blocks of `block_rows` (the last, the tail, may be shorter);
- global batch b is the concatenation of `lanes` lane batches of batch // lanes rows, in lane
  order; process p of P feeds lanes [p L / P, (p + 1) L / P) and reads only their blocks;
- lane j's epoch e holds the blocks at positions j, j + L, j + 2L, ... of epoch e's block order
  (a seeded permutation of the full blocks, then the tail, so that every lane's epoch has the same
  rows each epoch), taken in groups of `buffer_blocks` blocks; a group's rows are emitted in a
  seeded random order (seed, epoch, lane, group), and the lane's batch b is its positions
  [b * lane_batch, (b + 1) * lane_batch), running on across groups and epochs.
Every row is emitted once per epoch of its lane. A batch of B rows mixes L * buffer_blocks blocks
(8 x 16 blocks of 1024 rows by default), against B separate rows in the global shuffle. Lanes
whose epochs differ in length (by at most one block) drift apart by that much per epoch, so two
lanes in different epochs may hold the same block at once (rare when there are many blocks).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading

import numpy as np

from gsae_jax.data.permutation import permute
from gsae_jax.data.shards import ShardSet, first_non_finite, non_finite_error
from gsae_jax.data.storage import READ_THREADS, RangeReader
from gsae_jax.errors import ConfigError

_GROUP_KEY = 1  # ends the key of a group's row order, apart from the block order's (seed, epoch)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """The block shuffle's settings (`config.data.block_rows/buffer_blocks/lanes`)."""
  block_rows: int
  buffer_blocks: int
  lanes: int


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """Which rows lane j emits at its positions: pure arithmetic on row ids, no files.

  A lane's groups are numbered across epochs ("ordinal" o: epoch o // groups_per_epoch(j),
  group o % groups_per_epoch(j) of that epoch)."""

  num_rows: int
  spec: BlockSpec
  seed: int

  def __post_init__(self):
    check_blocks(self.spec, self.num_rows)

  @property
  def num_blocks(self) -> int:
    return -(-self.num_rows // self.spec.block_rows)

  @property
  def group_rows(self) -> int:
    """Rows of a full group."""
    return self.spec.buffer_blocks * self.spec.block_rows

  def block_range(self, block: int) -> tuple[int, int]:
    """Global rows [start, stop) of block `block`."""
    start = block * self.spec.block_rows
    return start, min(start + self.spec.block_rows, self.num_rows)

  def blocks_at(self, order_positions: np.ndarray, epoch: int) -> np.ndarray:
    """Block ids at the given positions of epoch `epoch`'s block order: a seeded permutation of
    the full blocks, then the tail (if any) last, so each lane holds the same number of rows in
    every epoch."""
    full = self.num_rows // self.spec.block_rows
    pos = np.asarray(order_positions, np.int64)
    out = pos.copy()  # the tail block (id `full`) stays at position `full`
    head = pos < full
    out[head] = permute(pos[head], full, self.seed, epoch)
    return out

  def lane_blocks(self, lane: int) -> int:
    """Blocks lane `lane` holds per epoch."""
    return len(range(lane, self.num_blocks, self.spec.lanes))

  def lane_epoch_rows(self, lane: int) -> int:
    """Rows lane `lane` emits per epoch (the same every epoch)."""
    rows = self.lane_blocks(lane) * self.spec.block_rows
    if lane == (self.num_blocks - 1) % self.spec.lanes:  # the lane of the tail (last position)
      rows -= self.num_blocks * self.spec.block_rows - self.num_rows
    return rows

  def groups_per_epoch(self, lane: int) -> int:
    return -(-self.lane_epoch_rows(lane) // self.group_rows)

  def group_blocks(self, lane: int, ordinal: int) -> np.ndarray:
    """Block ids of the lane's group `ordinal`, in the order their rows are buffered."""
    epoch, group = divmod(ordinal, self.groups_per_epoch(lane))
    first = group * self.spec.buffer_blocks
    count = min(self.spec.buffer_blocks, self.lane_blocks(lane) - first)
    positions = lane + self.spec.lanes * (first + np.arange(count, dtype=np.int64))
    return self.blocks_at(positions, epoch)

  def group_row_ids(self, lane: int, ordinal: int) -> np.ndarray:
    """Global row ids of the group's buffer, in buffer order."""
    return np.concatenate([np.arange(*self.block_range(int(b)), dtype=np.int64)
                           for b in self.group_blocks(lane, ordinal)])

  def lane_segments(self, lane: int, start: int, count: int) -> list[tuple[int, np.ndarray]]:
    """Lane positions [start, start + count) as (group ordinal, indices into that group's buffer)
    runs, in stream order."""
    rows_per_epoch, per_epoch = self.lane_epoch_rows(lane), self.groups_per_epoch(lane)
    pos = np.arange(start, start + count, dtype=np.int64)
    epoch, within = np.divmod(pos, rows_per_epoch)
    group, offset = np.divmod(within, self.group_rows)
    ordinal = epoch * per_epoch + group
    bounds = np.flatnonzero(np.diff(ordinal)) + 1
    out = []
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, count]):
      o = int(ordinal[lo])
      e, g = divmod(o, per_epoch)
      size = min(self.group_rows, rows_per_epoch - g * self.group_rows)
      out.append((o, permute(offset[lo:hi], size, self.seed, e, lane, g, _GROUP_KEY)))
    return out

  def lane_rows(self, lane: int, start: int, count: int) -> np.ndarray:
    """Global row ids at lane positions [start, start + count) (what the reader returns)."""
    return np.concatenate([self.group_row_ids(lane, o)[index]
                           for o, index in self.lane_segments(lane, start, count)])

  def num_batches(self, num_epochs: int, lane_batch: int) -> int:
    """Batches before the first lane would run past `num_epochs` epochs (lanes differ by up to a
    block per epoch, so the others leave at most that many rows of their last epoch unread)."""
    return min(num_epochs * self.lane_epoch_rows(j) // lane_batch for j in range(self.spec.lanes))


class _Group:
  """A group's buffer [rows, d_model], filled by its block reads (running concurrently)."""

  def __init__(self, buffer: np.ndarray, reads: list[concurrent.futures.Future]):
    self._buffer, self._reads = buffer, reads

  def rows(self) -> np.ndarray:
    if self._reads:
      for read in self._reads:
        read.result()  # waits; raises a failed read's error
      self._reads = ()  # all done: later calls need no wait (a racing reader waits harmlessly)
    return self._buffer


class BlockReader:
  """This process's lanes of each batch, read from `shard_set` through `reader`: each group is
  read once (its blocks concurrently, one read per block and shard it spans, straight into the
  group's buffer), the next group is read ahead, and a lane keeps at most 4 groups (the previous,
  the current and two ahead, for Grain's read-ahead threads that work on neighbouring batches)."""

  def __init__(self, shard_set: ShardSet, layout: BlockLayout, lane_batch: int,
               lanes: range, reader: RangeReader, read_threads: int = READ_THREADS):
    self.shard_set, self.layout, self.lane_batch, self.lanes = shard_set, layout, lane_batch, lanes
    self.reader = reader
    self._pool = concurrent.futures.ThreadPoolExecutor(read_threads, "block-read")
    self._groups: dict[int, dict[int, _Group]] = {j: {} for j in lanes}
    self._locks = {j: threading.Lock() for j in lanes}

  def local_batch(self, batch: int) -> np.ndarray:
    """[len(lanes) * lane_batch, d_model] in the stored dtype: this process's lanes of `batch`."""
    out = np.empty((len(self.lanes) * self.lane_batch, self.shard_set.d_model),
                   self.shard_set.dtype)
    at = 0
    for lane in self.lanes:
      for ordinal, index in self.layout.lane_segments(lane, batch * self.lane_batch,
                                                      self.lane_batch):
        np.take(self._group(lane, ordinal), index, axis=0, out=out[at:at + len(index)])
        at += len(index)
    return out

  def _group(self, lane: int, ordinal: int) -> np.ndarray:
    with self._locks[lane]:
      groups = self._groups[lane]
      for o in [o for o in groups if not ordinal - 1 <= o <= ordinal + 2]:
        del groups[o]
      for o in (ordinal, ordinal + 1):
        if o not in groups:
          groups[o] = self._start_group(lane, o)
      group = groups[ordinal]
    return group.rows()

  def _start_group(self, lane: int, ordinal: int) -> _Group:
    ranges = [self.layout.block_range(int(b)) for b in self.layout.group_blocks(lane, ordinal)]
    sizes = [stop - start for start, stop in ranges]
    buffer = np.empty((sum(sizes), self.shard_set.d_model), self.shard_set.dtype)
    at = np.cumsum([0] + sizes)
    return _Group(buffer, [self._pool.submit(self._read_rows, start, stop, buffer[lo:hi])
                           for (start, stop), lo, hi in zip(ranges, at[:-1], at[1:])])

  def _read_rows(self, start: int, stop: int, out: np.ndarray) -> None:
    """Rows [start, stop) into `out`: one sequential read per shard they span."""
    ss, at = self.shard_set, 0
    for path, offset, size, first_row in ss.byte_ranges(start, stop):
      x = np.frombuffer(self.reader.read(path, offset, size), ss.dtype).reshape(-1, ss.d_model)
      bad = first_non_finite(x)
      if bad is not None:  # the open-time scan was switched off, or a file changed under us
        raise non_finite_error(path, first_row + bad)
      out[at:at + len(x)] = x
      at += len(x)


def check_blocks(spec: BlockSpec, num_rows: int) -> None:
  """ConfigError unless the rows make a block for every lane."""
  if -(-num_rows // spec.block_rows) < spec.lanes:  # so spec.lanes > 1
    largest = (num_rows - 1) // (spec.lanes - 1)
    raise ConfigError(f"config.data.block_rows: expected at most {largest} (the {num_rows} rows "
                      f"must make a block for each of data.lanes={spec.lanes} lanes), found "
                      f"{spec.block_rows}")


def check_lanes(spec: BlockSpec, global_batch: int, process_count: int) -> None:
  """ConfigError unless the lanes split the batch and the processes split the lanes."""
  if global_batch % spec.lanes:
    raise ConfigError(f"config.data.lanes: expected a divisor of the batch size {global_batch}, "
                      f"found {spec.lanes}")
  if spec.lanes % process_count:
    raise ConfigError(f"config.data.lanes: expected a multiple of the process count "
                      f"{process_count} (each process feeds whole lanes), found {spec.lanes}")


def process_lanes(lanes: int, process_index: int, process_count: int) -> range:
  per = lanes // process_count
  return range(process_index * per, (process_index + 1) * per)

