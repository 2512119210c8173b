"""The 'shards' data source: config validation, make_source, and training through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import shards as shards_experiment
from gsae_jax import configs, sharding
from gsae_jax.data.sources import make_source

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH_SHAPE = {"data": 8, "model": 1}


def _config(folder, d_in=8):
  c = shards_experiment.get_config()
  c.data.path, c.data.d_in = folder, d_in
  c.sae.d_sae, c.train.batch_size, c.train.steps = 32, 64, 3
  return c


def test_make_source_reads_normalised_shards(make_harvest):
  folder = make_harvest(40)
  c = _config(folder)
  configs.validate(c, MESH_SHAPE)
  source = make_source(c, sharding.make_mesh())
  manifest = json.load(open(os.path.join(folder, "manifest.json")))
  assert source.d_in == 8 and source.ground_truth is None
  np.testing.assert_allclose(source.scale, manifest["normalisation"]["scale"], rtol=1e-12)
  x = np.asarray(next(source.batches))
  assert x.shape == (64, 8)
  # E||x||^2 = d_model after scaling (sample = all 640 rows here, so exact up to batch noise)
  xs = [np.asarray(next(source.batches)) for _ in range(30)]
  np.testing.assert_allclose(np.mean([np.sum(b ** 2, axis=1).mean() for b in xs]), 8, rtol=0.1)
  c.data.normalise_target = "off"
  assert make_source(c, sharding.make_mesh()).scale == 1.0


def test_validate_rejects_d_model_mismatch(make_harvest):
  folder = make_harvest(4)
  with pytest.raises(ValueError, match=rf"config.data.d_in: expected the shards' d_model 8 from "
                                       rf"{folder}/manifest.json, found 16"):
    configs.validate(_config(folder, d_in=16), MESH_SHAPE)


def test_validate_rejects_missing_or_empty_path(tmp_path):
  with pytest.raises(ValueError, match="config.data.path"):
    configs.validate(_config(""), MESH_SHAPE)
  with pytest.raises(ValueError, match=f"config.data.path: shard folder {tmp_path}: expected "
                                       "manifest.json"):
    configs.validate(_config(str(tmp_path)), MESH_SHAPE)


def _train(workdir, folder, *extra):
  cmd = [sys.executable, "-m", "launch.train", "--config=experiments/shards.py",
         f"--workdir={workdir}", f"--config.data.path={folder}", "--config.data.d_in=8",
         "--config.sae.d_sae=32", "--config.train.steps=4", "--config.train.batch_size=64",
         "--config.train.log_every=2", "--config.mesh.model=2", *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_cli_on_shards(make_harvest, tmp_path):
  folder = make_harvest(40)
  proc = _train(tmp_path / "run", folder)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 4/4" in proc.stdout
  lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [2, 4] and np.isfinite(lines[-1]["loss"])
  assert np.load(tmp_path / "run" / "params.npz")["W_dec"].shape == (32, 8)


def test_train_cli_refuses_corrupt_shards(make_harvest, tmp_path):
  folder = make_harvest(40)
  path = os.path.join(folder, "acts_00002.bin")
  os.truncate(path, 100)
  proc = _train(tmp_path / "run", folder)
  assert proc.returncode != 0
  assert "acts_00002.bin: truncated" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
      not (tmp_path / "run" / "metrics.jsonl").read_text()
