"""Harvest core: shards equal the activation function's output, manifest, atomic resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from gsae_jax.data import harvest, shards
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
