"""Bad shard folders fail at open with the file and the problem named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gsae_jax.data import shards


def _edit_manifest(folder, fn):
  path = os.path.join(folder, "manifest.json")
  with open(path) as f:
    m = json.load(f)
  fn(m)
  with open(path, "w") as f:
    json.dump(m, f)


def test_good_folder_opens(make_harvest):
  s = shards.open_shards(make_harvest(4, windows_per_shard=2))
  assert (s.num_tokens, s.d_model, len(s.acts)) == (64, 8, 2)
  np.testing.assert_array_equal(s.offsets, [0, 32, 64])


def test_truncated_shard(make_harvest):
  folder = make_harvest(4, windows_per_shard=2)
  path = os.path.join(folder, "acts_00001.bin")
  os.truncate(path, os.path.getsize(path) - 7)
  with pytest.raises(ValueError, match=r"acts_00001.bin: truncated, expected 1024 bytes .* found 1017"):
    shards.open_shards(folder)
  with pytest.raises(ValueError, match="acts_00001.bin: truncated"):
    shards.open_shards(folder, verify=False)  # sizes are always checked


def test_checksum_mismatch(make_harvest):
  folder = make_harvest(4, windows_per_shard=2)
  path = os.path.join(folder, "acts_00000.bin")
  data = bytearray(open(path, "rb").read())
  data[100] ^= 1
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match="acts_00000.bin: sha256 mismatch"):
    shards.open_shards(folder)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_shard_with_matching_checksum(make_harvest, bad):
  folder = make_harvest(4, windows_per_shard=2)
  path = os.path.join(folder, "acts_00001.bin")
  x = np.fromfile(path, np.float32).reshape(-1, 8)
  x[13, 4] = bad
  x.tofile(path)
  _edit_manifest(folder, lambda m: m["shards"][1].update(sha256=shards.sha256_file(path)))
  with pytest.raises(ValueError, match=r"acts_00001.bin: non-finite activations \(NaN or Inf\) "
                                       r"at row 13"):
    shards.open_shards(folder)


def test_empty_and_missing_folder(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}: expected manifest.json .* folder is empty"):
    shards.open_shards(str(tmp_path))
  with pytest.raises(ValueError, match="nowhere: does not exist"):
    shards.open_shards(str(tmp_path / "nowhere"))


def test_unfinished_harvest(make_harvest):
  folder = make_harvest(4, windows_per_shard=2)
  _edit_manifest(folder, lambda m: m.update(complete=False))
  with pytest.raises(ValueError, match="harvest not finished"):
    shards.open_shards(folder)


def test_missing_shard_file(make_harvest):
  folder = make_harvest(4, windows_per_shard=2)
  os.remove(os.path.join(folder, "ctx_00001.bin"))
  with pytest.raises(ValueError, match="ctx_00001.bin: missing"):
    shards.open_shards(folder)
