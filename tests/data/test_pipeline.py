"""Shard pipeline: exact epochs, seeded global shuffle, mixing, process slices, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.data import shards
from gsae_jax.data.block_shuffle import BlockSpec
from gsae_jax.data.pipeline import ShardIterator, permute

T = 17  # context length of the fixture windows: 16 non-BOS tokens each


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()  # 8 fake CPU devices on 'data'


def _iterator(folder, mesh, batch, **kw):
  out = NamedSharding(mesh, sharding.batch_spec())
  return ShardIterator(shards.open_shards(folder), batch, out, **kw)


def _tokens(x) -> np.ndarray:
  return np.asarray(x)[:, 0].round().astype(np.int64)  # column 0 holds the token id


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permute_is_a_bijection(n):
  p = permute(np.arange(n), n, seed=5, epoch=2)
  np.testing.assert_array_equal(np.sort(p), np.arange(n))
  if n >= 64:
    assert not np.array_equal(p, permute(np.arange(n), n, seed=5, epoch=3))
    assert not np.array_equal(p, permute(np.arange(n), n, seed=6, epoch=2))
    assert not np.array_equal(p, np.arange(n))


def test_every_token_once_per_epoch(make_harvest, mesh):
  folder = make_harvest(10, windows_per_shard=3)  # 160 tokens in 4 shards
  it = _iterator(folder, mesh, 48, num_epochs=2, seed=3)
  batches = [next(it) for _ in range(6)]  # 2 * 160 // 48
  with pytest.raises(StopIteration):
    next(it)
  assert batches[0].shape == (48, 8)
  assert batches[0].sharding.spec == P("data", None)
  stream = np.concatenate([_tokens(b) for b in batches])
  all_tokens = np.sort(_tokens(shards.open_shards(folder).gather(np.arange(160))))
  np.testing.assert_array_equal(np.sort(stream[:160]), all_tokens)  # epoch 1, across the batch
  assert len(set(stream[160:])) == len(stream[160:])                 # epoch 2 so far: no repeat
  assert not np.array_equal(stream[:128], stream[160:288])           # reshuffled per epoch
  first_shard = set(all_tokens[:48])
  assert set(stream[:48]) != first_shard  # not shard order


def test_order_depends_on_seed_only(make_harvest, mesh):
  folder = make_harvest(10)
  a = _iterator(folder, mesh, 32, seed=1, num_threads=1, prefetch=1)
  b = _iterator(folder, mesh, 32, seed=1, num_threads=2, prefetch=6)
  c = _iterator(folder, mesh, 32, seed=2)
  sa, sb, sc = ([_tokens(next(i)) for _ in range(8)] for i in (a, b, c))
  np.testing.assert_array_equal(np.concatenate(sa), np.concatenate(sb))
  assert not np.array_equal(np.concatenate(sa), np.concatenate(sc))


def test_batch_mixes_many_contexts(make_harvest, mesh):
  folder = make_harvest(300, context_length=33, windows_per_shard=64, normalise_sample_tokens=64)
  for x in (next(_iterator(folder, mesh, 4096, seed=s)) for s in (0, 1)):
    windows = (_tokens(x) - 1) // 32  # unique_windows: id = 1 + window * (T - 1) + position
    assert len(np.unique(windows)) >= 64, len(np.unique(windows))


def test_two_processes_get_disjoint_slices_covering_the_batch(make_harvest, mesh):
  folder = make_harvest(10)
  whole = _iterator(folder, mesh, 64, seed=4, process_index=0, process_count=1)
  halves = [_iterator(folder, mesh, 64, seed=4, process_index=p, process_count=2) for p in (0, 1)]
  for b in range(4):
    parts = [_tokens(h.next_local()) for h in halves]
    assert len(parts[0]) == len(parts[1]) == 32
    if b < 2:  # within epoch 1 (160 tokens) a token id names one stream position
      assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.concatenate(parts), _tokens(whole.next_local()))


def test_restored_state_continues_exactly(make_harvest, mesh):
  folder = make_harvest(10)
  a = _iterator(folder, mesh, 48, seed=7)
  for _ in range(2):  # mid-epoch: 96 of 160 tokens seen
    next(a)
  state = json.loads(json.dumps(a.get_state()))
  expected = [np.asarray(next(a)) for _ in range(4)]  # crosses into epoch 2
  b = _iterator(folder, mesh, 48, seed=7, num_threads=1)
  b.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(np.asarray(next(b)), want)
  c = _iterator(folder, mesh, 48, seed=8)
  with pytest.raises(ValueError, match="another stream.*seed"):
    c.set_state(state)


def test_scale_is_applied(make_harvest, mesh):
  folder = make_harvest(4)
  raw = _iterator(folder, mesh, 16, seed=0)
  scaled = _iterator(folder, mesh, 16, seed=0, scale=0.5)
  np.testing.assert_allclose(np.asarray(next(scaled)), 0.5 * np.asarray(next(raw)))


def test_nan_found_while_reading_when_open_scan_is_off(make_harvest, mesh):
  folder = make_harvest(4, windows_per_shard=2)
  path = os.path.join(folder, "acts_00001.bin")
  mm = np.memmap(path, dtype=np.float32, mode="r+")
  mm[5] = np.inf
  mm.flush()
  it = ShardIterator(shards.open_shards(folder, verify=False), 64, 
                     NamedSharding(mesh, sharding.batch_spec()), num_epochs=1)
  with pytest.raises(ValueError, match=r"acts_00001.bin: non-finite .* row 0"):
    next(it)


def test_bf16_shards_feed_bf16_when_asked(make_harvest, mesh):
  """keep_bf16: bf16 shards come out as bf16 (no float32 copy on the host), same values."""
  folder = make_harvest(4, dtype="bfloat16")
  as_f32 = next(_iterator(folder, mesh, 16, seed=0, scale=0.5))
  as_bf16 = next(_iterator(folder, mesh, 16, seed=0, scale=0.5, keep_bf16=True))
  assert as_f32.dtype == np.float32 and str(as_bf16.dtype) == "bfloat16"
  np.testing.assert_allclose(np.asarray(as_bf16, np.float32), np.asarray(as_f32), rtol=1e-2)


def test_state_saved_before_the_block_shuffle_restores(make_harvest, mesh):
  """A global-shuffle state without the 'shuffle' key (checkpoints of earlier versions) is the
  global shuffle's; a block shuffle refuses it."""
  folder = make_harvest(10)
  a = _iterator(folder, mesh, 32, seed=2)
  next(a)
  state = a.get_state()
  assert state.pop("shuffle") == "global"
  expected = np.asarray(next(a))
  b = _iterator(folder, mesh, 32, seed=2)
  b.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(b)), expected)
  block = _iterator(folder, mesh, 32, seed=2, block=BlockSpec(8, 2, 4))
  with pytest.raises(ValueError, match=r"another stream .*'shuffle': \('global', 'block'\)"):
    block.set_state(state)
