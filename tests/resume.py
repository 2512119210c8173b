"""The kill -9 check through a real launcher: a run killed with SIGKILL once it has a checkpoint,
then started again with the same command, ends bit-identical to a run never stopped."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def assert_kill_9_then_rerun_equals_uninterrupted(
    command: Callable[[os.PathLike], list[str]], tmp_path, env: dict, steps: int,
    jitter_s: float = 0.0, timeout: float = 300) -> subprocess.CompletedProcess:
  """`command(workdir)` trained uninterrupted in tmp_path/full, and in tmp_path/killed killed
  (SIGKILL) up to `jitter_s` after its first checkpoint appears, then re-run: the two
  params.npz are equal array by array. Returns the uninterrupted run."""
  full = subprocess.run(command(tmp_path / "full"), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert full.returncode == 0, full.stderr[-3000:]

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  while not checkpoint_steps(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  time.sleep(random.uniform(0.0, jitter_s))
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  killed_at = checkpoint_steps(workdir)
  assert killed_at and killed_at[-1] < steps, killed_at

  resumed = subprocess.run(command(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from" in resumed.stdout
  a, b = np.load(tmp_path / "full" / "params.npz"), np.load(workdir / "params.npz")
  assert sorted(a.files) == sorted(b.files)
  for name in a.files:
    np.testing.assert_array_equal(b[name], a[name], err_msg=name)
  return full
