"""One writer per folder: an advisory `fcntl.flock` on `<folder>/.lock`.

The kernel drops a flock when its process dies (kill -9 included), so a lock left by a killed
run is taken over by the next one without any staleness guess. The file holds the holder's pid,
host, start time and command, for the refusal message, and is removed on release. On file
systems without flock (some network mounts) taking the lock fails with an OSError naming it.
Object stores (gs://, s3://) have no locks: there `hold` only creates the folder, and keeping
one writer per folder is the job scheduler's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Iterator

from gsae_jax.data import storage
from gsae_jax.errors import Locked

LOCK_FILE = ".lock"


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      h = json.load(f)
    return (f"pid {h['pid']} on {h['host']} since {h['started']} "
            f"({' '.join(h['command'])[:120]})")
  except (OSError, ValueError, KeyError, TypeError):
    return "another process"


def _acquire(path: str) -> int:
  """An fd holding the flock on the file now at `path` (retries if a releasing holder unlinked
  the file between our open and our flock)."""
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise Locked(f"{os.path.dirname(path)} is in use by {_holder(path)}; wait for it to "
                   f"finish or stop it (a killed holder releases it by itself)") from None
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd
    os.close(fd)


@contextlib.contextmanager
def hold(folder: str, enabled: bool = True) -> Iterator[None]:
  """Holds `folder`'s lock (creating the folder) for the block; raises `Locked` naming the live
  holder. With `enabled=False` (processes other than the first of a multi-process run, which
  share the first one's lock) it does nothing; on an object store it only creates the folder."""
  if not enabled:
    yield
    return
  storage.makedirs(folder)
  if not storage.is_local(folder):
    yield
    return
  path = os.path.join(folder, LOCK_FILE)
  fd = _acquire(path)
  try:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)  # while still holding it: a waiter that opened it retries on a new file
    os.close(fd)
