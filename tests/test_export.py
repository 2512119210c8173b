"""Export: what is not per architecture (hook names, the export CLI) and Gated's untied W_mag.
The .npz and SAELens round trips of every architecture are in tests/test_registry.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gsae_jax import export
from gsae_jax.sae.spec import from_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D_IN, D_SAE = 12, 40


def _spec(arch, **block):
  return from_metadata({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE,
                        "architecture_config": block})


def test_untied_gated_cannot_go_to_saelens(tmp_path):
  spec = _spec("gated", tie_r_mag=False)
  with pytest.raises(ValueError, match="untied W_mag"):
    export.save_saelens(str(tmp_path / "sl"), spec.init_params(), spec, scale=1.0, metadata={})


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
