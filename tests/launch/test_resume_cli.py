"""Preemption through the real CLI: kill -9 then resume is bit-identical; SIGTERM saves and exits."""

import os
import re
import signal
import subprocess
import sys

from tests import resume
from tests.resume import ROOT

CONFIG = ["--config=experiments/synthetic.py", "--config.train.batch_size=1024",
          "--config.train.log_every=50", "--config.checkpoint.save_every=50",
          "--config.data.normalise_sample_tokens=8192"]


# One CPU device: the bitwise comparison is about resuming, not about the mesh (covered elsewhere).
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _cmd(workdir, *extra):
  return [sys.executable, "-m", "launch.train", f"--workdir={workdir}", *CONFIG, *extra]


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
  steps = 400
  resume.assert_kill_9_then_rerun_equals_uninterrupted(
      lambda w: _cmd(w, f"--config.train.steps={steps}"), tmp_path, ENV, steps, jitter_s=0.5)


def test_kill_9_then_rerun_equals_uninterrupted_for_a_sweep(tmp_path):
  """A sweep on CPU holds its members apart (`sweep.execution='auto'` -> 'separate'): the
  checkpoint stacks them and the restore splits them again, bit for bit."""
  steps = 200
  resume.assert_kill_9_then_rerun_equals_uninterrupted(
      lambda w: _cmd(w, f"--config.train.steps={steps}", "--config.sweep.grid=(0.5,2.0)"),
      tmp_path, ENV, steps, jitter_s=0.5)


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
  assert step >= 50 and resume.checkpoint_steps(tmp_path) == [step]
