"""Block shuffle: every row once per lane-epoch, batches independent of the process count, exact
resume, sequential reads only, the same rows through epath as through local files."""

from __future__ import annotations

import collections
import json
import os
import threading

import numpy as np
import pytest
from jax.sharding import NamedSharding

from gsae_jax import sharding
from gsae_jax.data import harvest, shards, storage
from gsae_jax.data.block_shuffle import BlockLayout, BlockSpec
from gsae_jax.data.pipeline import ShardIterator
from gsae_jax.errors import ConfigError
from tests.data.conftest import fake_activations, spec, unique_windows

# 13 windows x 16 rows = 208 rows in shards of 48, 48, 48, 48, 16 rows; blocks of 7 rows cross
# shard boundaries, the last block has 5 rows, and the lanes hold 56, 54, 49 and 49 rows.
ROWS, SPEC, BATCH = 208, BlockSpec(block_rows=7, buffer_blocks=3, lanes=4), 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  s = spec(windows_per_shard=3)
  out = str(tmp_path_factory.mktemp("block") / "shards")
  harvest.harvest(out, unique_windows(13, s.context_length), fake_activations(s.d_model), s,
                  progress=False)
  return out


@pytest.fixture(scope="module")
def shard_set(folder):
  return shards.open_shards(folder)


@pytest.fixture(scope="module")
def out_sharding():
  return NamedSharding(sharding.make_mesh(), sharding.batch_spec())


def _iterator(shard_set, out_sharding, block=SPEC, **kw):
  return ShardIterator(shard_set, BATCH, out_sharding, seed=3, block=block, **kw)


def _batches(it, n: int) -> list[np.ndarray]:
  return [it.next_local() for _ in range(n)]


class RecordingReader:
  """Records every read request (path, offset, size) and forwards it."""

  def __init__(self):
    self.inner, self.requests, self._lock = storage.FileReader(), [], threading.Lock()

  def read(self, path: str, offset: int, size: int) -> bytes:
    with self._lock:
      self.requests.append((path, offset, size))
    return self.inner.read(path, offset, size)


@pytest.mark.parametrize("rows,block_rows,buffer_blocks,lanes",
                         [(ROWS, 7, 3, 4), (1000, 37, 3, 4), (64, 8, 1, 8), (100, 100, 2, 1),
                          (50, 3, 5, 2)])
def test_every_row_once_per_lane_epoch(rows, block_rows, buffer_blocks, lanes):
  layout = BlockLayout(rows, BlockSpec(block_rows, buffer_blocks, lanes), seed=11)
  per_lane = [layout.lane_epoch_rows(j) for j in range(lanes)]
  assert sum(per_lane) == rows
  for e in range(3):
    epoch = [layout.lane_rows(j, e * n, n) for j, n in enumerate(per_lane)]
    for ids, n in zip(epoch, per_lane):
      assert len(np.unique(ids)) == n  # once within the lane-epoch
    np.testing.assert_array_equal(np.sort(np.concatenate(epoch)), np.arange(rows))
  for j, n in enumerate(per_lane):  # batches cut anywhere: the same stream
    whole = layout.lane_rows(j, 0, 3 * n)
    cuts = np.sort(np.random.default_rng(j).choice(np.arange(1, 3 * n), 5, replace=False))
    parts = [layout.lane_rows(j, lo, hi - lo) for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, 3 * n])]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    if n > 3 * block_rows:  # several blocks: not read out in block order, reshuffled per epoch
      assert not np.array_equal(whole[:n], np.sort(whole[:n]))
      assert not np.array_equal(whole[:n], whole[n:2 * n])


def test_batches_are_the_lanes_rows(shard_set, out_sharding):
  it = _iterator(shard_set, out_sharding)
  layout, lane_batch = BlockLayout(ROWS, SPEC, seed=3), BATCH // SPEC.lanes
  for b, got in enumerate(_batches(it, 30)):  # 30 x 2 rows per lane: into every lane's epoch 2
    rows = np.concatenate([layout.lane_rows(j, b * lane_batch, lane_batch)
                           for j in range(SPEC.lanes)])
    np.testing.assert_array_equal(got, shard_set.gather(rows))


@pytest.mark.parametrize("processes", [2, 4])
def test_batches_do_not_depend_on_the_process_count(shard_set, out_sharding, processes):
  whole = _batches(_iterator(shard_set, out_sharding, process_index=0, process_count=1), 30)
  readers = [RecordingReader() for _ in range(processes)]
  parts = [_batches(_iterator(shard_set, out_sharding, process_index=p, process_count=processes,
                              reader=readers[p], num_threads=1), 30) for p in range(processes)]
  for b, want in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([part[b] for part in parts]), want)
  layout, per = BlockLayout(ROWS, SPEC, seed=3), SPEC.lanes // processes
  for p, reader in enumerate(readers):  # each process reads only its own lanes' blocks
    mine = {(path, offset) for lane in range(p * per, (p + 1) * per) for o in range(8)
            for block in layout.group_blocks(lane, o)
            for path, offset, _, _ in shard_set.byte_ranges(*layout.block_range(int(block)))}
    assert {(path, offset) for path, offset, _ in reader.requests} <= mine


def test_reads_are_one_sequential_range_per_block(shard_set, out_sharding):
  reader = RecordingReader()
  it = _iterator(shard_set, out_sharding, reader=reader, num_epochs=1)
  got = []
  with pytest.raises(StopIteration):
    while True:
      got.append(it.next_local())
  layout = BlockLayout(ROWS, SPEC, seed=3)
  assert len(got) == layout.num_batches(1, BATCH // SPEC.lanes) == 24  # the shortest lane: 49 rows
  # Exactly one request per block and shard it spans, each group read once: lane positions
  # 0-47 are groups 0-2 of each lane's epoch (21 + 21 + 7..14 rows), and group 3 is read ahead.
  expected = collections.Counter(
      (path, offset, size) for lane in range(SPEC.lanes) for o in range(4)
      for block in layout.group_blocks(lane, o)
      for path, offset, size, _ in shard_set.byte_ranges(*layout.block_range(int(block))))
  assert collections.Counter(reader.requests) == expected
  assert len(reader.requests) == 47  # 42 blocks (30 + 12 read ahead), 5 across two shards


def test_resume_mid_epoch_continues_exactly(shard_set, out_sharding):
  a = _iterator(shard_set, out_sharding, num_threads=3, prefetch=4)
  _batches(a, 17)  # mid-epoch in every lane (epochs of 24-28 batches)
  state = json.loads(json.dumps(a.get_state()))
  expected = _batches(a, 20)  # crosses every lane's epoch boundary
  b = _iterator(shard_set, out_sharding, num_threads=1, prefetch=1)
  b.set_state(state)
  for want, got in zip(expected, _batches(b, 20)):
    np.testing.assert_array_equal(got, want)
  a.set_state(state)  # a rewind on the same iterator (its group cache is ahead): the same
  for want, got in zip(expected, _batches(a, 20)):
    np.testing.assert_array_equal(got, want)
  uninterrupted = _batches(_iterator(shard_set, out_sharding, num_threads=2), 37)
  for want, got in zip(uninterrupted[17:], expected):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("block,field", [(BlockSpec(7, 4, 4), "buffer_blocks"),
                                         (BlockSpec(8, 3, 4), "block_rows"),
                                         (BlockSpec(7, 3, 2), "lanes"),
                                         (None, "shuffle")])
def test_state_from_other_settings_is_refused(shard_set, out_sharding, block, field):
  a = _iterator(shard_set, out_sharding)
  next(a)
  other = _iterator(shard_set, out_sharding, block=block)
  with pytest.raises(ValueError, match=f"another stream .*'{field}'"):
    other.set_state(a.get_state())
  with pytest.raises(ValueError, match=f"another stream .*'{field}'"):
    a.set_state(other.get_state())


def test_epath_paths_give_the_same_batches(folder, shard_set, out_sharding, monkeypatch):
  """Every file operation through etils.epath (the code path of gs://), on the local disk."""
  want = _batches(_iterator(shard_set, out_sharding), 12)
  monkeypatch.setattr(storage, "is_local", lambda path: False)
  remote = shards.open_shards(folder)  # the checksum and finiteness scan, through epath
  for w, got in zip(want, _batches(_iterator(remote, out_sharding), 12)):
    np.testing.assert_array_equal(got, w)
  with pytest.raises(ValueError, match="needs a local folder.*shuffle='block'"):
    next(_iterator(remote, out_sharding, block=None))


def test_lanes_must_split_the_batch_and_the_processes(shard_set, out_sharding):
  with pytest.raises(ConfigError, match=r"config.data.lanes: expected a divisor of the batch "
                                        r"size 8, found 3"):
    _iterator(shard_set, out_sharding, block=BlockSpec(7, 3, 3))
  with pytest.raises(ConfigError, match="config.data.lanes: expected a multiple of the process "
                                        "count 8 .*found 4"):
    _iterator(shard_set, out_sharding, process_index=0, process_count=8)
  with pytest.raises(ConfigError, match=r"config.data.block_rows: expected at most 69 .* found 70"):
    _iterator(shard_set, out_sharding, block=BlockSpec(70, 3, 4))  # 3 blocks for 4 lanes


def test_non_finite_rows_are_found_while_reading(make_harvest, out_sharding):
  folder = make_harvest(4, windows_per_shard=2)
  path = os.path.join(folder, "acts_00001.bin")
  mm = np.memmap(path, dtype=np.float32, mode="r+")
  mm[5 * 8] = np.inf  # row 5 of the second shard
  mm.flush()
  it = ShardIterator(shards.open_shards(folder, verify=False), 8, out_sharding, num_epochs=1,
                     block=BlockSpec(4, 2, 2))
  with pytest.raises(ValueError, match=r"acts_00001.bin: non-finite .* row 5"):
    _batches(it, 8)
