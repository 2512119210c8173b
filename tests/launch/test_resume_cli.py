"""Preemption through the real CLI: kill -9 then resume is bit-identical; SIGTERM saves and exits."""

import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = ["--config=experiments/synthetic.py", "--config.train.batch_size=1024",
          "--config.train.log_every=50", "--config.checkpoint.save_every=50",
          "--config.data.normalise_sample_tokens=8192"]


# One CPU device: the bitwise comparison is about resuming, not about the mesh (covered elsewhere).
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *CONFIG, *extra]


def _checkpoint_steps(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
  steps = "--config.train.steps=400"
  full = subprocess.run(_cmd(tmp_path / "full", steps), cwd=ROOT, env=ENV, capture_output=True, text=True,
                        timeout=300)
  assert full.returncode == 0, full.stderr[-3000:]

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(workdir, steps), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not _checkpoint_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(random.uniform(0.0, 0.5))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = _checkpoint_steps(workdir)
  assert killed_at and killed_at[-1] < 400, killed_at

  resumed = subprocess.run(_cmd(workdir, steps), cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from" in resumed.stdout
  a, b = np.load(tmp_path / "full" / "params.npz"), np.load(workdir / "params.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_sigterm_saves_current_step_and_exits_cleanly(tmp_path):
  proc = subprocess.Popen(_cmd(tmp_path, "--config.train.steps=100000",
                               "--config.checkpoint.save_every=1000000"),
                          cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if line.startswith("step "):
      break
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0
  match = re.search(r"SIGTERM: saved checkpoint at step (\d+)", out)
  assert match, out[-2000:]
  step = int(match.group(1))
  assert step >= 50 and _checkpoint_steps(tmp_path) == [step]
