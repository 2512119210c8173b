"""The activation shard format: raw row-major arrays plus one `manifest.json` per folder.

A folder (a local path or any `etils.epath` path such as gs://, see `storage.py`) holds
`acts_NNNNN.bin` ([rows, d_model] float32 or bfloat16, no header) and `ctx_NNNNN.bin` ([rows, 3]
int32: window, position, token id of each row), listed with row counts and sha256 checksums in
`manifest.json`. Raw arrays rather than ArrayRecord because the loader's global shuffle gathers
single rows by index from memory-mapped local files (~440k rows/s per core here, no per-record
decode; BUILD_NOTES: shard format), and its block shuffle reads a block of rows as one byte range.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import re
from functools import cached_property

import ml_dtypes
import numpy as np

from gsae_jax.data import storage
from gsae_jax.errors import DataError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
CTX_COLUMNS = ("window", "position", "token")  # columns of ctx_NNNNN.bin
_CHUNK_ROWS = 1 << 14  # rows per read when verifying a shard
_REQUIRED = ("d_model", "dtype", "token_count", "shards", "complete", "normalisation")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_PLAIN_NAME = "a plain file name inside the folder (no path separator, not '.' or '..')"


def acts_name(index: int) -> str:
  return f"acts_{index:05d}.bin"


def ctx_name(index: int) -> str:
  return f"ctx_{index:05d}.bin"


def sha256_file(path: storage.PathLike) -> str:
  h = hashlib.sha256()
  with storage.open_read(path) as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


write_atomic = storage.write_atomic  # a reader never sees a partial file (local: fsync + rename)


def write_manifest(folder: storage.PathLike, manifest: dict) -> None:
  write_atomic(storage.join(folder, MANIFEST), json.dumps(manifest, indent=2).encode())


def read_manifest(folder: storage.PathLike) -> dict:
  """The folder's manifest, checked against the schema; a clear error for a missing folder, an
  empty one, bad JSON or a field the loader would misread."""
  folder = os.fspath(folder)
  if not storage.is_dir(folder):
    raise DataError(f"shard folder {folder}: does not exist")
  path = storage.join(folder, MANIFEST)
  if not storage.exists(path):
    found = storage.list_names(folder)
    what = "the folder is empty" if not found else f"found only {found[:5]}"
    raise DataError(f"shard folder {folder}: expected {MANIFEST} written by launch/harvest.py, "
                    f"{what}")
  try:
    with storage.open_read(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror})") from None
  _check_manifest(path, manifest)
  return manifest


def _show(value) -> str:
  """repr of a found value, cut so that the message stays one short line."""
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and value > 0)


def _is_plain_name(name) -> bool:
  """True for a file name that stays inside the folder it is joined to."""
  return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
          and not any(sep and sep in name for sep in ("/", os.sep, os.altsep))
          and not os.path.isabs(name))


def _check_manifest(path: str, manifest) -> None:
  """DataError naming `path` and the first field that has the wrong type or range, a shard file
  name that leaves the folder or is listed twice, or a token_count that the shards do not sum to.
  Reads no shard file."""
  if not isinstance(manifest, dict):
    raise DataError(f"{path}: expected a JSON object, found a {type(manifest).__name__}")
  for key in _REQUIRED:
    if key not in manifest:
      raise DataError(f"{path}: missing field {key!r}")

  def need(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
      raise DataError(f"{path}: {field}: expected {expected}, found {_show(value)}")

  m = manifest
  if "format_version" in m:
    need(_is_int(m["format_version"]) and m["format_version"] == FORMAT_VERSION,
         "format_version", m["format_version"],
         f"{FORMAT_VERSION} (re-harvest with this version's launch/harvest.py)")
  need(_is_int(m["d_model"]) and m["d_model"] > 0, "d_model", m["d_model"], "an int > 0")
  need(isinstance(m["dtype"], str) and m["dtype"] in DTYPES, "dtype", m["dtype"],
       f"one of {tuple(DTYPES)}")
  need(_is_int(m["token_count"]) and m["token_count"] >= 0, "token_count", m["token_count"],
       "an int >= 0")
  need(isinstance(m["complete"], bool), "complete", m["complete"], "true or false")
  if "num_windows" in m:
    need(_is_int(m["num_windows"]) and m["num_windows"] >= 0, "num_windows", m["num_windows"],
         "an int >= 0")
  for key in ("model_id", "site"):
    if key in m:
      need(isinstance(m[key], str), key, m[key], "a string")
  norm = m["normalisation"]
  if norm is None:
    need(not m["complete"], "normalisation", norm,
         "an object with mean_sq_norm and scale once complete is true")
  else:
    need(isinstance(norm, dict), "normalisation", norm, "an object or null")
    for key in ("mean_sq_norm", "scale"):
      need(_is_positive_number(norm.get(key)), f"normalisation.{key}", norm.get(key),
           "a finite number > 0")
  need(isinstance(m["shards"], list), "shards", m["shards"], "a list")
  listed, total = {}, 0  # file name -> the field that lists it
  for i, entry in enumerate(m["shards"]):
    need(isinstance(entry, dict), f"shards[{i}]", entry, "an object")
    for key in ("file", "ctx_file"):
      name = entry.get(key)
      need(_is_plain_name(name), f"shards[{i}].{key}", name, _PLAIN_NAME)
      need(name not in listed, f"shards[{i}].{key}", name,
           f"a file listed once (it is also {listed.get(name)})")
      listed[name] = f"shards[{i}].{key}"
    for key in ("sha256", "ctx_sha256"):
      need(isinstance(entry.get(key), str) and _SHA256.fullmatch(entry[key]) is not None,
           f"shards[{i}].{key}", entry.get(key), "64 lowercase hex digits")
    for key in ("tokens", "windows"):
      need(_is_int(entry.get(key)) and entry[key] > 0, f"shards[{i}].{key}", entry.get(key),
           "an int > 0")
    total += entry["tokens"]
  need(m["token_count"] == total, "token_count", m["token_count"],
       f"{total}, the sum of shards[].tokens")


@dataclasses.dataclass(frozen=True)
class ShardSet:
  """Verified shards of one harvest: global row r lives in shard
  `searchsorted(offsets, r, 'right') - 1` at row `r - offsets[shard]`. Rows are read either by
  index from memory maps (`acts`, `gather`: local folders only) or as contiguous byte ranges
  (`byte_ranges`: any storage)."""

  folder: str
  manifest: dict
  offsets: np.ndarray  # [n_shards + 1] int64, cumulative row counts

  @property
  def d_model(self) -> int:
    return int(self.manifest["d_model"])

  @property
  def dtype(self) -> np.dtype:
    """The stored dtype (float32 or bfloat16)."""
    return DTYPES[self.manifest["dtype"]]

  @property
  def num_tokens(self) -> int:
    return int(self.offsets[-1])

  @property
  def row_bytes(self) -> int:
    return self.d_model * self.dtype.itemsize

  def paths(self) -> list[str]:
    return [storage.join(self.folder, s["file"]) for s in self.manifest["shards"]]

  def mean_sq_norm(self) -> float:
    return float(self.manifest["normalisation"]["mean_sq_norm"])

  def shard_of(self, rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.offsets, rows, side="right") - 1

  @cached_property
  def acts(self) -> tuple[np.ndarray, ...]:
    """Per shard [rows, d_model] read-only memory maps, made on first use (local folders)."""
    return tuple(np.memmap(path, dtype=self.dtype, mode="r", shape=(e["tokens"], self.d_model))
                 for path, e in zip(self.paths(), self.manifest["shards"]))

  def gather(self, rows: np.ndarray) -> np.ndarray:
    """[len(rows), d_model] in the on-disk dtype, rows in the given order. Reads shard by shard
    in sorted row order so the page cache sees ascending offsets. A remote folder is read with
    one byte-range request per run of consecutive rows, `storage.READ_THREADS` at a time (fine
    for a sample, e.g. the normalisation's; training reads remote folders with the block
    shuffle)."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = np.asarray(rows)[order]
    out = np.empty((len(rows), self.d_model), self.dtype)
    if not storage.is_local(self.folder):
      out[order] = self._read_runs(sorted_rows)
      return out
    shard = self.shard_of(sorted_rows)
    bounds = np.flatnonzero(np.diff(shard)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
      if lo == hi:
        continue
      s = shard[lo]
      out[order[lo:hi]] = self.acts[s][sorted_rows[lo:hi] - self.offsets[s]]
    return out

  def _read_runs(self, sorted_rows: np.ndarray) -> np.ndarray:
    """Ascending `sorted_rows` through `storage.FileReader` byte ranges, concurrently."""
    reader = storage.FileReader()
    cuts = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.r_[0, cuts]
    stops = np.r_[cuts, len(sorted_rows)]

    def read(run: tuple[int, int]) -> np.ndarray:
      first, last = int(sorted_rows[run[0]]), int(sorted_rows[run[1] - 1])
      parts = [np.frombuffer(reader.read(path, offset, size), self.dtype)
               for path, offset, size, _ in self.byte_ranges(first, last + 1)]
      return np.concatenate(parts).reshape(-1, self.d_model)

    with concurrent.futures.ThreadPoolExecutor(storage.READ_THREADS) as pool:
      runs = list(pool.map(read, zip(starts, stops)))
    reader.close()
    # a repeated row id starts a new run, so it is read once per repetition
    return np.concatenate(runs) if runs else np.empty((0, self.d_model), self.dtype)

  def byte_ranges(self, start: int, stop: int) -> list[tuple[str, int, int, int]]:
    """Rows [start, stop) as (path, byte offset, byte count, first row in that shard) per shard
    they span, in order: one sequential read each."""
    out, paths = [], self.paths()
    for s in range(int(self.shard_of(np.array([start]))[0]), len(paths)):
      lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
      if lo >= hi:
        break
      local = int(lo - self.offsets[s])
      out.append((paths[s], local * self.row_bytes, int(hi - lo) * self.row_bytes, local))
    return out


def first_non_finite(x: np.ndarray) -> int | None:
  """Index of the first row of [rows, d_model] `x` holding a NaN or Inf; None if there is none."""
  finite = np.isfinite(x).all(axis=1)
  return None if finite.all() else int(np.argmin(finite))


def non_finite_error(path: str, row: int) -> DataError:
  return DataError(f"shard {path}: non-finite activations (NaN or Inf) at row {row}")


def _verify_acts(path: str, rows: int, d_model: int, dtype: np.dtype, expected_sha: str) -> None:
  """Checksum and finiteness in one sequential pass over the file."""
  h, chunk_bytes, bad_row = hashlib.sha256(), _CHUNK_ROWS * d_model * dtype.itemsize, None
  with storage.open_read(path) as f:
    for lo in range(0, rows, _CHUNK_ROWS):
      chunk = f.read(chunk_bytes)
      h.update(chunk)
      if bad_row is None:
        bad = first_non_finite(np.frombuffer(chunk, dtype).reshape(-1, d_model))
        bad_row = None if bad is None else lo + bad
  found = h.hexdigest()
  if found != expected_sha:  # reported first: a corrupted file explains a NaN
    raise DataError(f"shard {path}: sha256 mismatch, manifest says {expected_sha[:16]}..., "
                    f"file has {found[:16]}... (corrupted or overwritten)")
  if bad_row is not None:
    raise non_finite_error(path, bad_row)


def open_shards(folder: storage.PathLike, verify: bool = True,
                require_complete: bool = True) -> ShardSet:
  """Opens a finished harvest in a local folder or any epath folder (gs://...). Always checks the
  manifest and file sizes; with `verify` also every checksum and that every activation is finite
  (one sequential read of the folder, before any training)."""
  folder = os.fspath(folder)
  manifest = read_manifest(folder)
  mpath = storage.join(folder, MANIFEST)
  if require_complete and not manifest["complete"]:
    raise DataError(f"{mpath}: harvest not finished ({len(manifest['shards'])} shards so far); "
                    "re-run launch/harvest.py with the same config to complete it")
  if not manifest["shards"]:
    raise DataError(f"{mpath}: lists no shards (0 tokens harvested)")
  dtype, d = DTYPES[manifest["dtype"]], manifest["d_model"]
  for entry in manifest["shards"]:
    rows = entry["tokens"]
    for name, width, dt, sha in ((entry["file"], d, dtype, entry["sha256"]),
                                 (entry["ctx_file"], len(CTX_COLUMNS), np.dtype(np.int32),
                                  entry["ctx_sha256"])):
      path = storage.join(folder, name)
      if not storage.is_file(path):
        raise DataError(f"shard {path}: missing (listed in {mpath})")
      expected, found = rows * width * dt.itemsize, storage.size(path)
      if found != expected:
        kind = "truncated" if found < expected else "too long"
        raise DataError(f"shard {path}: {kind}, expected {expected} bytes ({rows} rows x {width} "
                        f"x {dt.itemsize} B), found {found}")
      if verify and name == entry["ctx_file"] and sha256_file(path) != sha:
        raise DataError(f"shard {path}: sha256 mismatch with {mpath} (corrupted or overwritten)")
    if verify:
      _verify_acts(storage.join(folder, entry["file"]), rows, d, dtype, entry["sha256"])
  counts = [entry["tokens"] for entry in manifest["shards"]]
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return ShardSet(folder, manifest, offsets)


def read_ctx(folder: storage.PathLike, entry: dict) -> np.ndarray:
  """[rows, 3] int32 (window, position, token) of one shard entry."""
  with storage.open_read(storage.join(folder, entry["ctx_file"])) as f:
    return np.frombuffer(bytearray(f.read()), dtype=np.int32).reshape(-1, len(CTX_COLUMNS))
