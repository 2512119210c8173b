"""Harvest core: shards equal the activation function's output, manifest, atomic resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import ml_dtypes
import numpy as np
import pytest

from gsae_jax import errors, locking
from gsae_jax.data import harvest, shards
from gsae_jax.runs import harvesting
from tests.data.conftest import BOS, fake_activations, spec, unique_windows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST_FIELDS = ("model_id", "revision", "site", "layer", "d_model", "dtype", "token_count",
                   "context_length", "normalisation", "shards", "creation_config", "complete")


def _windows_with_docs(n, T, seed=0):
  """Windows whose bodies contain BOS separators, as packed text gives."""
  rng = np.random.default_rng(seed)
  for _ in range(n):
    w = rng.integers(1, 50, T).astype(np.int32)
    w[0] = BOS
    w[rng.integers(1, T, 2)] = BOS
    yield w


def test_shards_equal_activations_without_bos(tmp_path):
  s = spec(windows_per_shard=3, batch_size=2, revision="abc123")
  windows = list(_windows_with_docs(7, s.context_length))
  act = fake_activations(s.d_model)
  m = harvest.harvest(str(tmp_path), iter(windows), act, s, {"cfg": 1}, progress=False)
  expected = np.concatenate([act(w[None])[0][w != BOS] for w in windows])
  got = shards.open_shards(str(tmp_path)).gather(np.arange(m["token_count"]))
  np.testing.assert_array_equal(got, expected)
  for field in MANIFEST_FIELDS:
    assert field in m, field
  assert (m["model_id"], m["revision"], m["site"], m["layer"], m["d_model"], m["dtype"],
          m["context_length"]) == ("fake/lm", "abc123", "blocks.1.resid_post", 1, 8, "float32", 17)
  assert m["complete"] and m["token_count"] == len(expected)
  assert [e["windows"] for e in m["shards"]] == [3, 3, 1]
  assert sum(e["tokens"] for e in m["shards"]) == len(expected)
  assert m["creation_config"] == {"cfg": 1}
  for e in m["shards"]:
    assert shards.sha256_file(tmp_path / e["file"]) == e["sha256"]
  norm = m["normalisation"]
  mean_sq = float(np.mean(np.sum(expected.astype(np.float64) ** 2, axis=1)))
  assert norm["sample_tokens"] == len(expected)  # sample covers all rows: exact
  np.testing.assert_allclose(norm["mean_sq_norm"], mean_sq, rtol=1e-9)
  np.testing.assert_allclose(norm["scale"], np.sqrt(8 / mean_sq), rtol=1e-9)
  ctx = np.concatenate([shards.read_ctx(str(tmp_path), e) for e in m["shards"]])
  assert (ctx[:, 2] != BOS).all()
  np.testing.assert_array_equal(ctx[:, 2], np.concatenate([w[w != BOS] for w in windows]))
  assert json.loads((tmp_path / "manifest.json").read_text()) == m


def test_keep_bos_bf16_and_exact_token_count(tmp_path):
  s = spec(exclude_bos=False, dtype="bfloat16", num_tokens=40)
  windows = list(unique_windows(5, s.context_length))
  act = fake_activations(s.d_model)
  m = harvest.harvest(str(tmp_path), iter(windows), act, s, progress=False)
  assert m["token_count"] == 40 and m["dtype"] == "bfloat16"
  expected = np.concatenate([act(w[None])[0] for w in windows])[:40].astype(ml_dtypes.bfloat16)
  ss = shards.open_shards(str(tmp_path))
  assert ss.acts[0].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(ss.gather(np.arange(40)), expected)
  assert os.path.getsize(tmp_path / m["shards"][0]["file"]) == 40 * 8 * 2


def test_nan_activations_refused(tmp_path):
  s = spec()
  def bad(tokens):
    x = fake_activations(8)(tokens)
    x[1, 3, 2] = np.nan
    return x
  with pytest.raises(ValueError, match="NaN or Inf for window 1"):
    harvest.harvest(str(tmp_path), unique_windows(4, s.context_length), bad, s, progress=False)
  assert not any(f.startswith("acts_") for f in os.listdir(tmp_path))


def test_resume_refuses_other_config(tmp_path):
  s = spec(num_tokens=30)
  harvest.harvest(str(tmp_path), unique_windows(4, 17), fake_activations(8), s, progress=False)
  with pytest.raises(ValueError, match=r"another config.*spec\.layer: 1 -> 2"):
    harvest.harvest(str(tmp_path), unique_windows(4, 17), fake_activations(8),
                    spec(num_tokens=30, layer=2), progress=False)


_SLOW_HARVEST = """
import sys, time
from gsae_jax.data import harvest
from tests.data.conftest import fake_activations, spec, unique_windows
act = fake_activations(8)
def slow(tokens):
  time.sleep(0.12)
  return act(tokens)
s = spec(windows_per_shard=6, batch_size=2)
harvest.harvest(sys.argv[1], unique_windows(40, s.context_length), slow, s, {"run": "kill"},
                progress=False)
"""


def test_killed_harvest_resumes_to_identical_shards(tmp_path):
  s = spec(windows_per_shard=6, batch_size=2)
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  harvest.harvest(str(whole), unique_windows(40, 17), fake_activations(8), s, {"run": "kill"},
                  progress=False)
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_HARVEST, str(cut)], cwd=ROOT,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 60
  try:
    while time.time() < deadline:  # kill once two shards are listed: mid-way through the third
      if (cut / "manifest.json").exists():
        if len(json.loads((cut / "manifest.json").read_text())["shards"]) >= 2:
          break
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  partial = json.loads((cut / "manifest.json").read_text())
  assert not partial["complete"] and 2 <= len(partial["shards"]) < 7
  m = harvest.harvest(str(cut), unique_windows(40, 17), fake_activations(8), s, {"run": "kill"},
                      progress=False)
  assert m == json.loads((whole / "manifest.json").read_text())
  assert sorted(os.listdir(cut)) == sorted(os.listdir(whole))
  for name in os.listdir(whole):
    assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


def _snapshot(folder) -> dict:
  return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _partial_harvest(folder, s, windows, creation_config=None, shards_before_crash=2):
  """A harvest stopped by a crash after `shards_before_crash` shards."""
  calls = []
  def crashing(tokens):
    calls.append(1)
    if len(calls) > shards_before_crash * s.windows_per_shard // s.batch_size:
      raise RuntimeError("crash")
    return fake_activations(s.d_model)(tokens)
  with pytest.raises(RuntimeError, match="crash"):
    harvest.harvest(str(folder), iter(windows), crashing, s, creation_config, progress=False)
  assert len(json.loads((folder / "manifest.json").read_text())["shards"]) == shards_before_crash


def test_resume_refuses_changed_text_and_leaves_the_folder_as_it_was(tmp_path):
  s = spec(windows_per_shard=4, batch_size=2)
  windows = list(unique_windows(20, s.context_length))
  _partial_harvest(tmp_path, s, windows)
  (tmp_path / "acts_00002.bin.tmp").write_bytes(b"cut short")
  before = _snapshot(tmp_path)
  changed = [w.copy() for w in windows]
  changed[5][3] += 1  # one token of shard 1
  with pytest.raises(errors.RunMismatch, match=r"shard 1 was harvested from other text") as err:
    harvest.harvest(str(tmp_path), iter(changed), fake_activations(8), s, progress=False)
  assert "\n" not in str(err.value)
  with pytest.raises(errors.RunMismatch, match=r"the text ran out within the windows of shard 1"):
    harvest.harvest(str(tmp_path), iter(windows[:6]), fake_activations(8), s, progress=False)
  assert _snapshot(tmp_path) == before
  m = harvest.harvest(str(tmp_path), iter(windows), fake_activations(8), s, progress=False)
  assert m["complete"] and not any(f.endswith(".tmp") for f in os.listdir(tmp_path))
  assert m["shards"][0]["windows_sha256"] == harvest._windows_digest(windows[:4])


def test_write_error_surfaces_on_one_line_and_leaves_a_resumable_folder(tmp_path, monkeypatch):
  s = spec(windows_per_shard=3, batch_size=3)
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  harvest.harvest(str(whole), unique_windows(10, 17), fake_activations(8), s, {"r": 1},
                  progress=False)
  write_atomic = shards.write_atomic

  def disk_full(path, data):
    if path.endswith("acts_00002.bin"):
      with open(path + ".tmp", "wb") as f:
        f.write(data[:7])  # the device filled up mid-write
      raise OSError(28, "No space left on device", path + ".tmp")
    write_atomic(path, data)
  monkeypatch.setattr(shards, "write_atomic", disk_full)
  with pytest.raises(OSError) as err:
    harvest.harvest(str(cut), unique_windows(10, 17), fake_activations(8), s, {"r": 1},
                    progress=False)
  message = str(err.value)
  assert err.value.errno == 28 and "\n" not in message
  assert "No space left on device while writing shard 2 into" in message
  assert "re-run the same command to resume" in message and "acts_00002.bin.tmp" in message
  monkeypatch.setattr(shards, "write_atomic", write_atomic)
  m = harvest.harvest(str(cut), unique_windows(10, 17), fake_activations(8), s, {"r": 1},
                      progress=False)
  assert m == json.loads((whole / "manifest.json").read_text())
  assert _snapshot(cut) == _snapshot(whole)


# ---------------------------------------------------------------- runs/harvesting (fake LM)

class _FakeTokenizer:
  bos_token_id = BOS

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [[1 + ord(ch) % 97 for ch in t[:200]] for t in texts]}


class _FakeLM:
  def __init__(self, on_call=None):
    self.config = types.SimpleNamespace(n_layers=2, model_id="fake/lm", revision=None,
                                        bos_token_id=BOS)
    self.on_call = on_call

  def site_dim(self, site):
    return 8

  def activations(self, tokens, sites):
    if self.on_call:
      self.on_call()
    return {sites[0]: fake_activations(8)(np.asarray(tokens))}


def _config(out, **overrides):
  from experiments import harvest_gemma3_270m
  c = harvest_gemma3_270m.get_config()
  c.model, c.output_dir, c.layer, c.context_length = "unused", str(out), 1, 17
  c.num_tokens, c.windows_per_shard, c.batch_size, c.normalise_sample_tokens = 200, 4, 2, 64
  for k, v in overrides.items():
    c[k] = v
  return c


def _no_lm(*args, **kwargs):
  raise AssertionError("the LM was loaded before the refusal")


def test_harvesting_run_holds_the_lock_and_releases_it(tmp_path):
  out = tmp_path / "out"
  seen = []

  def while_harvesting():
    if not seen:
      seen.append((out / ".lock").exists())
      with pytest.raises(errors.Locked, match="is in use by pid"):
        with locking.hold(str(out)):
          pass
  m = harvesting.run(_config(out), progress=False, lm_and_tokenizer=(_FakeLM(while_harvesting),
                                                                     _FakeTokenizer()))
  assert seen == [True] and m["complete"] and m["token_count"] == 200
  assert ".lock" not in os.listdir(out)


def test_harvesting_run_refuses_a_locked_folder_before_loading(tmp_path, monkeypatch):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  out = tmp_path / "out"
  with locking.hold(str(out)):
    with pytest.raises(errors.Locked, match=f"{out} is in use by pid {os.getpid()}"):
      harvesting.run(_config(out), progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("num_tokens", 0, "config.num_tokens: expected an integer > 0, found 0"),
    ("context_length", 1, "config.context_length: expected an integer >= 2"),
    ("seed", -1, "config.seed: expected an integer in [0, 2**31), found -1"),
    ("skip_windows", -3, "config.skip_windows: expected an integer >= 0, found -3"),
    ("normalise_sample_tokens", 0, "config.normalise_sample_tokens: expected an integer > 0"),
    ("site", "resid_mid", "config.site: expected one of"),
    ("extra", float("inf"), "config.extra: expected a finite number, found inf"),
])
def test_harvest_config_is_checked_before_loading(tmp_path, monkeypatch, field, value, message):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  c = _config(tmp_path / "out")
  c[field] = value
  with pytest.raises(errors.ConfigError) as err:
    harvesting.run(c, progress=False)
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "out").exists()


def test_text_source_is_checked_before_loading(tmp_path, monkeypatch):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  c = _config(tmp_path / "out")
  c.text.source, c.text.paths = "files", (str(tmp_path / "*.txt"),)
  with pytest.raises(errors.ConfigError, match=r"config.text.paths: expected globs matching at "
                                               r"least one file"):
    harvesting.run(c, progress=False)
  c.text.source = "hf"
  with pytest.raises(errors.ConfigError, match="config.text.hf_name: expected a dataset name"):
    harvesting.run(c, progress=False)


def test_output_dir_problems_are_refused_before_loading(tmp_path, monkeypatch):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(errors.ConfigError, match="config.output_dir: expected a folder, found a "
                                               f"file at {tmp_path / 'file'}"):
    harvesting.run(_config(tmp_path / "file"), progress=False)
  with pytest.raises(errors.ConfigError, match="config.output_dir: expected a folder path, found "
                                               f"a file at {tmp_path / 'file'}"):
    harvesting.run(_config(tmp_path / "file" / "sub"), progress=False)
  assert (tmp_path / "file").read_text() == "not a folder"


def test_other_harvest_in_output_dir_is_refused_before_loading(tmp_path, monkeypatch):
  out = tmp_path / "out"
  lm = (_FakeLM(), _FakeTokenizer())
  harvesting.run(_config(out), progress=False, lm_and_tokenizer=lm)
  before = _snapshot(out)
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  with pytest.raises(errors.RunMismatch, match=r"holds a harvest with another config.*"
                                               r"creation_config.layer: 1 -> 0") as err:
    harvesting.run(_config(out, layer=0), progress=False)
  assert "\n" not in str(err.value)
  with pytest.raises(errors.RunMismatch, match=r"creation_config.text.source: 'embedded' -> 'hf'"):
    c = _config(out)
    c.text.source, c.text.hf_name = "hf", "some/dataset"
    harvesting.run(c, progress=False)
  assert _snapshot(out) == before
  # Ignored fields may change; a finished harvest is returned as it is.
  m = harvesting.run(_config(out, batch_size=4), progress=False, lm_and_tokenizer=lm)
  assert m["complete"] and _snapshot(out) == before


def test_bad_layer_is_one_line_and_leaves_no_folder(tmp_path):
  out = tmp_path / "new" / "out"
  with pytest.raises(errors.ConfigError) as err:
    harvesting.run(_config(out, layer=5), progress=False,
                   lm_and_tokenizer=(_FakeLM(), _FakeTokenizer()))
  assert str(err.value) == "config.layer: expected < 2 (layers of fake/lm), found 5"
  assert os.listdir(tmp_path) == []
