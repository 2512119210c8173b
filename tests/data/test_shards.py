"""Bad shard folders fail at open with the file and the problem named."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from gsae_jax.data import shards
from gsae_jax.errors import DataError


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


def _assert_names(err, folder, field):
  """The error is one line that names the manifest and the field."""
  message = str(err.value)
  assert "\n" not in message, message
  assert message.startswith(os.path.join(folder, "manifest.json") + ":"), message
  assert f" {field}: expected " in message, message


def _set(*path_and_value):
  *path, value = path_and_value
  def edit(m):
    node = m
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  return edit


@pytest.mark.parametrize("edit, field", [
    (_set("format_version", 2), "format_version"),
    (_set("d_model", 0), "d_model"),
    (_set("d_model", "8"), "d_model"),
    (_set("d_model", 8.0), "d_model"),
    (_set("dtype", "float16"), "dtype"),
    (_set("dtype", ["float32"]), "dtype"),
    (_set("token_count", -1), "token_count"),
    (_set("token_count", 63), "token_count"),  # the shards hold 64
    (_set("complete", "yes"), "complete"),
    (_set("num_windows", -4), "num_windows"),
    (_set("site", 6), "site"),
    (_set("model_id", None), "model_id"),
    (_set("normalisation", None), "normalisation"),  # a finished harvest has one
    (_set("normalisation", [1.0]), "normalisation"),
    (_set("normalisation", "mean_sq_norm", float("nan")), "normalisation.mean_sq_norm"),
    (_set("normalisation", "mean_sq_norm", 0.0), "normalisation.mean_sq_norm"),
    (_set("normalisation", "scale", float("inf")), "normalisation.scale"),
    (_set("normalisation", "scale", True), "normalisation.scale"),
    (_set("shards", {"file": "acts_00000.bin"}), "shards"),
    (_set("shards", 1, "acts_00001.bin"), "shards[1]"),
    (_set("shards", 1, "tokens", 0), "shards[1].tokens"),
    (_set("shards", 1, "tokens", 32.0), "shards[1].tokens"),
    (_set("shards", 1, "windows", "2"), "shards[1].windows"),
    (_set("shards", 0, "sha256", "ab" * 31), "shards[0].sha256"),
    (_set("shards", 0, "sha256", "AB" * 32), "shards[0].sha256"),
    (_set("shards", 1, "ctx_sha256", None), "shards[1].ctx_sha256"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_manifest_schema(make_harvest, edit, field):
  folder = make_harvest(4, windows_per_shard=2)
  _edit_manifest(folder, edit)
  with pytest.raises(DataError) as err:
    shards.read_manifest(folder)
  _assert_names(err, folder, field)
  with pytest.raises(ValueError):  # callers catching ValueError still see it
    shards.open_shards(folder, verify=False)


@pytest.mark.parametrize("name", ["../acts_00001.bin", "sub/acts_00001.bin", "/tmp/acts.bin",
                                  "..", ".", "", "acts\0.bin", 7, None])
@pytest.mark.parametrize("key", ["file", "ctx_file"])
def test_shard_names_stay_inside_the_folder(make_harvest, name, key):
  folder = make_harvest(4, windows_per_shard=2)
  _edit_manifest(folder, lambda m: m["shards"][1].update({key: name}))
  with pytest.raises(DataError, match="a plain file name inside the folder") as err:
    shards.open_shards(folder)
  _assert_names(err, folder, f"shards[1].{key}")


@pytest.mark.parametrize("edit, field, first", [
    (lambda m: m["shards"][1].update(file="acts_00000.bin"), "shards[1].file", "shards[0].file"),
    (lambda m: m["shards"][1].update(ctx_file="ctx_00000.bin"), "shards[1].ctx_file",
     "shards[0].ctx_file"),
    (lambda m: m["shards"][0].update(ctx_file="acts_00000.bin"), "shards[0].ctx_file",
     "shards[0].file"),
    (lambda m: m["shards"][1].update(ctx_file="acts_00000.bin"), "shards[1].ctx_file",
     "shards[0].file"),
], ids=["acts_twice", "ctx_twice", "acts_as_own_ctx", "acts_as_other_ctx"])
def test_shard_files_are_listed_once(make_harvest, edit, field, first):
  folder = make_harvest(4, windows_per_shard=2)
  _edit_manifest(folder, edit)
  with pytest.raises(DataError, match=rf"a file listed once \(it is also {re.escape(first)}\)") \
      as err:
    shards.open_shards(folder, verify=False)
  _assert_names(err, folder, field)


@pytest.mark.parametrize("text, found", [("[1, 2]", "list"), ('"manifest"', "str"),
                                         ("null", "NoneType")])
def test_manifest_that_is_not_an_object(make_harvest, text, found):
  folder = make_harvest(4, windows_per_shard=2)
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    f.write(text)
  with pytest.raises(DataError, match=f"manifest.json: expected a JSON object, found a {found}"):
    shards.read_manifest(folder)


def test_manifest_not_json_or_missing_a_field(make_harvest):
  folder = make_harvest(4, windows_per_shard=2)
  path = os.path.join(folder, "manifest.json")
  good = open(path).read()
  with open(path, "w") as f:
    f.write(good[:-20])
  with pytest.raises(DataError, match=f"^{re.escape(path)}: not valid JSON"):
    shards.read_manifest(folder)
  with open(path, "wb") as f:
    f.write(b"\xff\xfe{}")
  with pytest.raises(DataError, match=f"^{re.escape(path)}: not valid JSON"):
    shards.read_manifest(folder)
  with open(path, "w") as f:
    f.write(good)
  _edit_manifest(folder, lambda m: m.pop("shards"))
  with pytest.raises(DataError, match=f"^{re.escape(path)}: missing field 'shards'"):
    shards.read_manifest(folder)


def test_unfinished_harvest_manifest_reads(make_harvest):
  """A stopped harvest (not complete, no normalisation yet) passes the schema: harvest resumes
  from it."""
  folder = make_harvest(4, windows_per_shard=2)
  _edit_manifest(folder, lambda m: m.update(complete=False, normalisation=None))
  assert shards.read_manifest(folder)["complete"] is False
  s = shards.open_shards(folder, verify=False, require_complete=False)
  assert s.num_tokens == 64


def test_folders_on_epath_storage_open_and_fail_alike(make_harvest, tmp_path, monkeypatch):
  """With every file operation through etils.epath (the code path of gs://), on the local disk:
  a good folder opens with its checks, a bad one fails naming the file, and the manifest and
  other files are written whole."""
  folder = make_harvest(4, windows_per_shard=2)
  local = shards.open_shards(folder)
  monkeypatch.setattr(shards.storage, "is_local", lambda path: False)
  s = shards.open_shards(folder)
  assert (s.num_tokens, s.paths()) == (64, local.paths())
  np.testing.assert_array_equal(shards.read_ctx(folder, s.manifest["shards"][1]),
                                shards.read_ctx(folder, local.manifest["shards"][1]))
  rows = np.array([5, 3, 4, 40, 3])  # runs of consecutive rows, one range read each
  np.testing.assert_array_equal(s.gather(rows), local.gather(rows))
  shards.write_manifest(str(tmp_path), s.manifest)
  assert json.loads((tmp_path / "manifest.json").read_text()) == s.manifest
  assert sorted(os.listdir(tmp_path)) == ["manifest.json", "shards"]  # no .tmp left over
  path = os.path.join(folder, "acts_00001.bin")
  os.truncate(path, os.path.getsize(path) - 7)
  with pytest.raises(DataError, match=r"acts_00001.bin: truncated, expected 1024 bytes"):
    shards.open_shards(folder, verify=False)
  with pytest.raises(DataError, match="nowhere: does not exist"):
    shards.open_shards(str(tmp_path / "nowhere"))


def test_write_atomic_replaces_whole_files_locally(tmp_path):
  path = tmp_path / "f.json"
  shards.write_atomic(str(path), b"one")
  shards.write_atomic(path, b"two")  # os.PathLike too
  assert path.read_bytes() == b"two" and sorted(os.listdir(tmp_path)) == ["f.json"]
