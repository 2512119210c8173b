"""Training on activations streamed from the LM through the real CLI: it trains, and kill -9 after
a checkpoint then the same command again ends bit-identical to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 2000
# One CPU device: the bitwise comparison is about resuming, not about the mesh.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _cmd(workdir, tiny_lm):
  return [sys.executable, "-m", "launch.train", f"--workdir={workdir}",
          "--config=experiments/stream_lm.py", f"--config.data.lm.model={tiny_lm}",
          "--config.data.lm.layer=1", "--config.data.lm.context_length=32",
          "--config.data.d_in=32", "--config.data.buffer_windows=8",
          "--config.data.normalise_sample_tokens=256", "--config.sae.d_sae=64",
          "--config.train.batch_size=64", f"--config.train.steps={STEPS}",
          "--config.train.log_every=500", "--config.checkpoint.save_every=100",
          "--config.optim.warmup_steps=10"]


def _checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def test_stream_trains_and_resumes_bit_identically_after_kill_9(tmp_path, tiny_lm):
  full = subprocess.run(_cmd(tmp_path / "full", tiny_lm), cwd=ROOT, env=ENV,
                        capture_output=True, text=True, timeout=300)
  assert full.returncode == 0, full.stderr[-3000:]
  assert f"step {STEPS}/{STEPS}" in full.stdout
  with open(tmp_path / "full" / "source.json") as f:
    source = json.load(f)
  assert (source["source"], source["site"], source["model_id"]) == (
      "lm", "blocks.1.resid_post", tiny_lm)
  assert source["normalisation"]["sample_tokens"] == 256

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(workdir, tiny_lm), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not _checkpoint_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = _checkpoint_steps(workdir)
  assert killed_at and killed_at[-1] < STEPS, killed_at

  resumed = subprocess.run(_cmd(workdir, tiny_lm), cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from" in resumed.stdout
  a, b = np.load(tmp_path / "full" / "params.npz"), np.load(workdir / "params.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    np.testing.assert_array_equal(b[name], a[name], err_msg=name)
