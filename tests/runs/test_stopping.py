"""Signals are seen at once, also while the main thread is inside a long C call."""

import os
import signal
import subprocess
import sys
import time

from gsae_jax.runs.stopping import watch_signals

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# A ~20 s matmul in one C call: Python-level handlers would not run until it returns.
_BLOCKED = ("import numpy as np, sys\nfrom gsae_jax.runs.stopping import watch_signals\n"
            "a = np.ones((9000, 9000), np.float32)\n"
            "with watch_signals(graceful=sys.argv[1] == 'graceful'):\n"
            "  print('busy', flush=True)\n  for _ in range(8):\n    a @ a\n"
            "print('finished', flush=True)\n")


def test_graceful_records_the_first_signal_and_restores_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with watch_signals(graceful=True) as requested:
    assert requested() is None
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while requested() is None and time.time() < deadline:
      time.sleep(0.01)
    assert requested() == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before


def _signal_while_busy(mode: str, signals: int) -> tuple[int, float, str]:
  proc = subprocess.Popen([sys.executable, "-c", _BLOCKED, mode], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert proc.stdout.readline().strip() == "busy"
  time.sleep(0.5)
  t0 = time.time()
  for _ in range(signals):
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, time.time() - t0, out + err


def test_not_graceful_exits_at_once_inside_a_long_c_call():
  rc, seconds, output = _signal_while_busy("exit", 1)
  assert rc == 128 + signal.SIGTERM and seconds < 3, (rc, seconds, output)
  assert "SIGTERM: exiting now" in output and "finished" not in output


def test_graceful_second_signal_exits_at_once():
  rc, seconds, output = _signal_while_busy("graceful", 2)
  assert rc == 128 + signal.SIGTERM and seconds < 3, (rc, seconds, output)
  assert "finishing the current step" in output and "the last checkpoint is kept" in output
