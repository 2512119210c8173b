"""Export round trips: .npz, SAELens (loaded by sae_lens itself), and the export CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from gsae_jax import export
from gsae_jax.sae.spec import from_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D_IN, D_SAE, SCALE = 12, 40, 2.5


def _spec(arch, **block):
  return from_metadata({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE,
                        "architecture_config": block})


def _trained_like(spec, seed=0):
  """(graphdef, params) with every parameter perturbed, as after training."""
  graphdef, params = spec.graphdef, spec.init_params()
  keys = jax.random.split(jax.random.key(seed + 1), len(params))
  params = {k: np.asarray(v + 0.2 * jax.random.normal(kk, v.shape))
            for (k, v), kk in zip(sorted(params.items()), keys)}
  return graphdef, params


@pytest.mark.parametrize("arch", ["gated", "baseline"])
def test_npz_round_trip_is_identical(tmp_path, arch):
  spec = _spec(arch)
  _, params = _trained_like(spec)
  export.save_npz(str(tmp_path / "sae.npz"), params, spec, {"site": "blocks.6.resid_post", "scale": SCALE})
  loaded, meta, loaded_spec = export.load_npz(str(tmp_path / "sae.npz"))
  assert meta == {"site": "blocks.6.resid_post", "scale": SCALE, **spec.metadata()}
  assert loaded_spec.name == arch
  assert loaded.keys() == params.keys()
  for k in params:
    np.testing.assert_array_equal(loaded[k], params[k])
    assert loaded[k].dtype == params[k].dtype


@pytest.mark.parametrize("arch", ["gated", "baseline"])
def test_saelens_load_from_disk_matches_ours_on_raw_activations(tmp_path, arch):
  from sae_lens import SAE

  spec = _spec(arch)
  graphdef, params = _trained_like(spec)
  export.save_saelens(str(tmp_path / "sl"), params, spec, scale=SCALE,
                      metadata={"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post",
                                "context_size": 16})
  sae = SAE.load_from_disk(str(tmp_path / "sl"))
  x_raw = np.random.default_rng(0).normal(size=(32, D_IN)).astype(np.float32) / SCALE + 0.1

  ours = nnx.merge(graphdef, params)
  f_ours = np.asarray(ours.encode(SCALE * x_raw))
  x_hat_ours = np.asarray(ours.decode(f_ours)) / SCALE
  with torch.no_grad():
    f_theirs = sae.encode(torch.from_numpy(x_raw))
    x_hat_theirs = sae.decode(f_theirs)
  assert 0 < np.mean(f_ours > 0) < 1
  np.testing.assert_allclose(f_theirs.numpy(), f_ours, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(x_hat_theirs.numpy(), x_hat_ours, atol=1e-5, rtol=1e-5)

  back, cfg, back_spec = export.load_saelens(str(tmp_path / "sl"), scale=SCALE)
  assert back_spec.name == arch
  assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
  for k in params:
    np.testing.assert_allclose(back[k], params[k], rtol=1e-6, atol=1e-7)


def test_untied_gated_cannot_go_to_saelens(tmp_path):
  spec = _spec("gated", tie_r_mag=False)
  _, params = _trained_like(spec)
  with pytest.raises(ValueError, match="untied W_mag"):
    export.save_saelens(str(tmp_path / "sl"), params, spec, scale=1.0, metadata={})


def test_hook_names():
  assert export.saelens_hook_name("blocks.6.resid_post") == "blocks.6.hook_resid_post"
  assert export.saelens_hook_name("blocks.2.attn_z") == "blocks.2.attn.hook_z"
  with pytest.raises(ValueError, match="expected a kind"):
    export.saelens_hook_name("blocks.2.mlp_in")


def test_export_cli_from_training_workdir(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  train = [sys.executable, "-m", "launch.train", "--config=experiments/synthetic.py",
           f"--workdir={tmp_path}", "--config.train.steps=4", "--config.train.batch_size=64",
           "--config.data.d_in=16", "--config.data.m_true=32", "--config.sae.d_sae=64",
           "--config.data.normalise_sample_tokens=2048"]
  assert subprocess.run(train, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
  proc = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={tmp_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  params, meta, spec = export.load_npz(str(tmp_path / "export" / "sae.npz"))
  assert meta["architecture"] == spec.name == "gated"
  trained = np.load(tmp_path / "params.npz")
  for k in trained.files:
    np.testing.assert_array_equal(params[k], trained[k])
  assert meta["step"] == 4 and meta["d_in"] == 16 and meta["normalisation_scale"] > 0
  cfg = json.load(open(tmp_path / "export" / "saelens" / "cfg.json"))
  assert cfg["architecture"] == "gated" and cfg["d_in"] == 16 and cfg["d_sae"] == 64

  missing = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={tmp_path / 'none'}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert missing.returncode != 0 and "no checkpoints to export" in missing.stderr
