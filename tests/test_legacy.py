"""Workdirs and exports written before the architecture registry (commit dd97206, see
tests/fixtures/v1/README.md) still load, restore and export with today's code."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gsae_jax import export
from gsae_jax.runs import exporting
from gsae_jax.sae.spec import Sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "v1")


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
  """A copy of tests/fixtures/v1: nothing a test runs may write into the committed files."""
  dest = tmp_path_factory.mktemp("legacy") / "v1"
  shutil.copytree(FIXTURES, dest)
  return dest


def _assert_params_equal(params, saved):
  assert sorted(params) == sorted(saved.files)
  for k in saved.files:
    np.testing.assert_array_equal(params[k], saved[k], err_msg=k)


def test_gated_workdir_restores(v1):
  trained = exporting.load_trained(str(v1 / "gated"))
  assert trained.step == 4 and trained.spec.name == "gated" and trained.spec.sweep is None
  _assert_params_equal(trained.params, np.load(v1 / "gated" / "params.npz"))
  # The flat legacy `sae` block moved into `sae.gated`; lambda is synthetic.py's of that time.
  assert trained.config.sae.gated.l1_coefficient == 0.1
  assert trained.spec.coefficient_values() == {"l1": 0.1}
  assert trained.spec.block.tie_r_mag and trained.spec.block.gate_backward == "zero"
  earlier = exporting.load_trained(str(v1 / "gated"), step=2)
  assert earlier.step == 2
  assert not np.array_equal(earlier.params["W_gate"], trained.params["W_gate"])


def test_baseline_sweep_workdir_restores(v1):
  trained = exporting.load_trained(str(v1 / "baseline_sweep"))
  assert trained.step == 4 and trained.spec.name == "baseline"
  assert trained.spec.sweep == Sweep("l1", (0.5, 2.0)) and trained.spec.members == 2
  assert [m["l1"] for m in trained.spec.member_coefficients()] == [0.5, 2.0]
  assert trained.params["W_dec"].shape == (2, 64, 16)
  _assert_params_equal(trained.params, np.load(v1 / "baseline_sweep" / "params.npz"))


def _export_cli(workdir, *flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={workdir}", *flags],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_export_cli_on_gated_workdir(v1, tmp_path):
  workdir = tmp_path / "gated"
  shutil.copytree(v1 / "gated", workdir)
  proc = _export_cli(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  params, meta, spec = export.load_npz(str(workdir / "export" / "sae.npz"))
  assert meta["architecture"] == spec.name == "gated" and meta["step"] == 4
  _assert_params_equal(params, np.load(workdir / "params.npz"))
  # Today's export of the old workdir holds what the old export held.
  _assert_params_equal(params, np.load(v1 / "gated_export" / "sae.npz"))
  cfg = json.load(open(workdir / "export" / "saelens" / "cfg.json"))
  assert cfg["architecture"] == "gated" and cfg["metadata"]["gsae_jax_architecture"] == "gated"


def test_export_cli_on_sweep_workdir_member(v1, tmp_path):
  workdir = tmp_path / "baseline_sweep"
  shutil.copytree(v1 / "baseline_sweep", workdir)
  proc = _export_cli(workdir, "--member=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  params, meta, spec = export.load_npz(str(workdir / "export" / "sae.npz"))
  assert spec.name == "baseline" and spec.sweep is None
  assert meta["architecture_config"]["l1_coefficient"] == 2.0
  saved = np.load(workdir / "params.npz")
  for k in saved.files:
    np.testing.assert_array_equal(params[k], saved[k][1], err_msg=k)


def test_old_export_loads_as_gated(v1):
  folder = v1 / "gated_export"
  params, meta, spec = export.load_npz(str(folder / "sae.npz"))
  assert "architecture" not in json.load(open(folder / "sae.json"))  # really the old format
  assert spec.name == meta["architecture"] == "gated"
  assert spec.block.tie_r_mag and spec.block.l1_coefficient == 0.1
  _assert_params_equal(params, np.load(v1 / "gated" / "params.npz"))

  cfg_old = json.load(open(folder / "saelens" / "cfg.json"))
  assert "gsae_jax_architecture" not in cfg_old["metadata"]
  back, cfg, sl_spec = export.load_saelens(str(folder / "saelens"),
                                           scale=meta["normalisation_scale"])
  assert sl_spec.name == "gated" and cfg["architecture"] == "gated"
  assert sorted(back) == sorted(params)
  for k in params:
    np.testing.assert_allclose(back[k], params[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_old_export_without_a_recorded_architecture_is_refused(v1, tmp_path):
  """The architecture comes from what the sidecar recorded, never from parameter names (a TopK
  SAE has the baseline's): a sidecar that recorded none is refused, naming the file."""
  shutil.copy(v1 / "gated_export" / "sae.npz", tmp_path / "sae.npz")
  meta = json.load(open(v1 / "gated_export" / "sae.json"))
  meta["config"]["sae"].pop("architecture")
  json.dump(meta, open(tmp_path / "sae.json", "w"))
  with pytest.raises(ValueError, match="records no 'architecture'") as e:
    export.load_npz(str(tmp_path / "sae.npz"))
  assert str(tmp_path / "sae.npz") in str(e.value)


_V1_TRAIN = ["--config=experiments/synthetic.py", "--config.train.batch_size=64",
             "--config.data.d_in=16", "--config.data.m_true=32", "--config.sae.d_sae=64",
             "--config.data.normalise_sample_tokens=2048", "--config.checkpoint.save_every=2"]


def _train_cli(workdir, *extra):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "launch.train", f"--workdir={workdir}",
                         *_V1_TRAIN, *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)


def test_train_cli_adopts_a_v1_workdir_and_refuses_another_run_on_it(v1, tmp_path):
  """A workdir without run.json: its checkpoint's config is the recorded run."""
  workdir = tmp_path / "gated"
  shutil.copytree(v1 / "gated", workdir)
  refused = _train_cli(workdir, "--config.train.steps=6", "--config.sae.d_sae=128",
                       "--allow_changes=train.steps")
  assert refused.returncode == 1 and "sae.d_sae: 64 -> 128" in refused.stderr, refused.stderr
  assert not (workdir / "run.json").exists()
  resumed = _train_cli(workdir, "--config.train.steps=6", "--allow_changes=train.steps")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from" in resumed.stdout
  history = [json.loads(l) for l in (workdir / "history.jsonl").read_text().splitlines()]
  assert history[0]["event"] == "adopted" and history[0]["step"] == 4
  assert history[0]["changes"] == {"train.steps": [4, 6]}
