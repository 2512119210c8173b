"""The per-folder lock: one holder, the holder named in the refusal, killed holders taken over."""

import os
import signal
import subprocess
import sys
import time

import pytest

from gsae_jax import locking
from gsae_jax.errors import Locked

_HOLD = ("import sys, time\nfrom gsae_jax import locking\n"
         "with locking.hold(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(600)\n")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_hold_creates_the_folder_and_removes_its_file(tmp_path):
  folder = tmp_path / "w"
  with locking.hold(str(folder)):
    assert (folder / locking.LOCK_FILE).exists()
    with pytest.raises(Locked, match=f"in use by pid {os.getpid()}"):
      with locking.hold(str(folder)):
        pass
  assert os.listdir(folder) == []
  with locking.hold(str(folder), enabled=False):
    assert os.listdir(folder) == []


def test_live_holder_refuses_and_killed_holder_is_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Locked) as e:
      with locking.hold(str(tmp_path)):
        pass
    assert f"pid {holder.pid}" in str(e.value) and "\n" not in str(e.value)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert (tmp_path / locking.LOCK_FILE).exists()  # left behind by the kill
  t0 = time.time()
  with locking.hold(str(tmp_path)):
    assert str(os.getpid()) in (tmp_path / locking.LOCK_FILE).read_text()
  assert time.time() - t0 < 5
