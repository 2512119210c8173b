"""launch/train.py end to end as a subprocess (the real CLI), and its config rejection."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--config.data.d_in=16", "--config.data.m_true=32", "--config.sae.d_sae=64",
        "--config.train.steps=6", "--config.train.batch_size=64", "--config.train.log_every=3",
        "--config.data.normalise_sample_tokens=2048", "--config.mesh.model=2"]


def _run(workdir, *extra):
  cmd = [sys.executable, "-m", "launch.train", "--config=experiments/synthetic.py",
         f"--workdir={workdir}", *TINY, *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_train_cli_end_to_end(tmp_path):
  proc = _run(tmp_path, "--config.sae.gated.l1_coefficient=0.5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 6/6" in proc.stdout and "tokens/s" in proc.stdout and "gamma=" in proc.stdout
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [3, 6]
  for key in ("loss", "reconstruct", "sparsity", "aux", "l0", "fvu", "gamma", "tokens_per_s"):
    assert np.isfinite(lines[-1][key]), key
  assert lines[-1]["coef_l1"] == 0.5
  params = np.load(tmp_path / "params.npz")
  assert params["W_dec"].shape == (64, 16) and params["W_gate"].shape == (16, 64)
  assert json.loads((tmp_path / "config.json").read_text())["sae"]["gated"]["l1_coefficient"] == 0.5


@pytest.mark.parametrize("flag, field", [
    ("--config.sae.architecture=relu6", "config.sae.architecture"),
    ("--config.sae.gated.gate_backward=sigmoid", "config.sae.gated.gate_backward"),
    ("--config.sae.gated.l1_coefficient=-1.0", "config.sae.gated.l1_coefficient"),
    ("--config.sae.d_sae=63", "config.sae.d_sae"),
])
def test_train_cli_rejects_bad_config(tmp_path, flag, field):
  proc = _run(tmp_path, flag)
  assert proc.returncode != 0
  assert field in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "metrics.jsonl").exists()
