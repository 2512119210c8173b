"""SIGTERM and SIGINT, honoured at once even while the main thread waits on the device.

Python runs signal handlers only between bytecodes of the main thread, so a host blocked in a
long XLA call would not see Ctrl-C or a preemption notice until the call returns. Here the C-level
handler's wake-up byte (`signal.set_wakeup_fd`) is read by a watcher thread instead, which acts
immediately: it prints, and either records a stop request (training: finish the step, save, exit)
or ends the process (anything else, and a second signal during training). Ending the process
loses nothing: checkpoints, shards and exports are written atomically.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_WAKE = 0  # byte we write ourselves to end the watcher


@contextlib.contextmanager
def watch_signals(graceful: bool) -> Iterator[Callable[[], str | None]]:
  """Yields `requested()`: the name of the first signal received ('SIGTERM'), or None.

  `graceful`: the first signal only records the request (the caller saves and returns); a second
  one, or any signal when not graceful, exits at once with status 128 + signum. Previous handlers
  come back on exit. Outside the main thread (where handlers cannot be set) it watches nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield lambda: None
    return
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  requested: list[str] = []

  def watch() -> None:
    while data := os.read(read_fd, 1):
      signum = data[0]
      if signum == _WAKE:
        return
      if signum not in SIGNALS:
        continue
      name = signal.Signals(signum).name
      if graceful and not requested:
        requested.append(name)
        print(f"{name}: finishing the current step, then saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)
        continue
      kept = "; the last checkpoint is kept" if graceful else ""
      print(f"{name}: exiting now{kept}", file=sys.stderr, flush=True)
      os._exit(128 + signum)

  # A Python-level handler must exist for the C handler to write the wake-up byte; ours does
  # nothing because the watcher has already acted by the time it runs.
  previous = {s: signal.signal(s, lambda signum, frame: None) for s in SIGNALS}
  previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  watcher = threading.Thread(target=watch, name="signal-watcher", daemon=True)
  watcher.start()
  try:
    yield lambda: requested[0] if requested else None
  finally:
    signal.set_wakeup_fd(previous_fd)
    for s, handler in previous.items():
      signal.signal(s, handler)
    os.write(write_fd, bytes([_WAKE]))
    watcher.join()
    os.close(read_fd)
    os.close(write_fd)
