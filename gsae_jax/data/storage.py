"""Files on any storage: local paths through `os`, other `etils.epath` paths (gs://, s3://, ...)
through epath, behind the few calls the shard format needs.

Reads of activations are byte ranges through a `RangeReader`, so the block shuffle reads a bucket
with the same code as a local disk (tests run it on the local file system). gs:// paths need
epath's GCS backend installed (`gcsfs`, or TensorFlow's gfile).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import threading
from typing import BinaryIO, Iterator, Protocol

from etils import epath

from gsae_jax.errors import DataError

PathLike = str | os.PathLike
READ_THREADS = 16  # concurrent range reads of a remote file: a bucket serves requests in parallel


def is_local(path: PathLike) -> bool:
  """True for a path on the local file system (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


def join(folder: PathLike, name: str) -> str:
  folder = os.fspath(folder)
  return os.path.join(folder, name) if is_local(folder) else os.fspath(epath.Path(folder) / name)


def exists(path: PathLike) -> bool:
  return os.path.exists(path) if is_local(path) else epath.Path(path).exists()


def is_dir(path: PathLike) -> bool:
  return os.path.isdir(path) if is_local(path) else epath.Path(path).is_dir()


def is_file(path: PathLike) -> bool:
  return os.path.isfile(path) if is_local(path) else epath.Path(path).is_file()


def list_names(folder: PathLike) -> list[str]:
  """Sorted names of the folder's entries."""
  if is_local(folder):
    return sorted(os.listdir(folder))
  return sorted(p.name for p in epath.Path(folder).iterdir())


def matching(folder: PathLike, pattern: str) -> list[str]:
  """Paths of the folder's entries whose names match the glob `pattern` (none if no folder)."""
  if not is_dir(folder):
    return []
  return [join(folder, n) for n in list_names(folder) if fnmatch.fnmatch(n, pattern)]


def remove(path: PathLike) -> None:
  if is_local(path):
    os.remove(path)
  else:
    epath.Path(path).unlink()


def remove_empty_dir(folder: PathLike) -> None:
  """Removes the folder if it is empty (object stores have no empty folders: nothing to do)."""
  if is_local(folder):
    with contextlib.suppress(OSError):
      os.rmdir(folder)


def size(path: PathLike) -> int:
  return os.path.getsize(path) if is_local(path) else epath.Path(path).stat().length


def open_read(path: PathLike) -> BinaryIO:
  return open(path, "rb") if is_local(path) else epath.Path(path).open("rb")


def read_bytes(path: PathLike) -> bytes:
  with open_read(path) as f:
    return f.read()


def makedirs(folder: PathLike) -> None:
  """Creates the folder and its parents (object stores: a no-op beyond epath's own)."""
  if is_local(folder):
    os.makedirs(folder, exist_ok=True)
  else:
    epath.Path(folder).mkdir(parents=True, exist_ok=True)


class AppendFile:
  """A text file written line by line and flushed at each write: a local file opened for
  appending; elsewhere (object stores cannot append) the whole object is rewritten with its
  earlier content, which suits small logs such as metrics.jsonl."""

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)
    if is_local(self.path):
      self._file, self._text = open(self.path, "a"), None
    else:
      self._file, self._text = None, read_bytes(self.path).decode() if exists(self.path) else ""

  def write(self, text: str) -> None:
    if self._file is not None:
      self._file.write(text)
      self._file.flush()
    else:
      self._text += text
      write_atomic(self.path, self._text.encode())

  def close(self) -> None:
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> "AppendFile":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@contextlib.contextmanager
def open_atomic(path: PathLike) -> Iterator[BinaryIO]:
  """A binary file to write that readers see only once it is whole. Local: `path.tmp`, fsynced
  and renamed on success, removed on failure. Object stores make an object visible only once its
  upload completes, so other paths are written directly."""
  path = os.fspath(path)
  if not is_local(path):
    with epath.Path(path).open("wb") as f:
      yield f
    return
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_atomic(path: PathLike, data: bytes) -> None:
  """Writes `data` so that a reader never sees a partial file (`open_atomic`)."""
  with open_atomic(path) as f:
    f.write(data)


class RangeReader(Protocol):
  """Reads `size` bytes at byte `offset` of the file at `path`; safe to call from many threads."""

  def read(self, path: str, offset: int, size: int) -> bytes: ...


class FileReader:
  """`RangeReader` for any path: `os.pread` on a cached descriptor for local files (positional,
  so threads share it), an epath file opened, seeked and read for the others."""

  def __init__(self):
    self._fds: dict[str, int] = {}
    self._lock = threading.Lock()

  def _fd(self, path: str) -> int:
    with self._lock:
      if path not in self._fds:
        self._fds[path] = os.open(path, os.O_RDONLY)
      return self._fds[path]

  def read(self, path: str, offset: int, size: int) -> bytes:
    if is_local(path):
      fd, parts, done = self._fd(path), [], 0
      while done < size:  # pread may return less than asked (signals, some file systems)
        part = os.pread(fd, size - done, offset + done)
        if not part:
          break
        parts.append(part)
        done += len(part)
      data = b"".join(parts)
    else:
      with epath.Path(path).open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
      raise DataError(f"shard {path}: expected {size} bytes at offset {offset}, found "
                      f"{len(data)} (file shorter than its manifest says)")
    return data

  def close(self) -> None:
    with self._lock:
      for fd in self._fds.values():
        os.close(fd)
      self._fds.clear()

  def __del__(self):
    self.close()
