"""The activation shard format: raw row-major arrays plus one `manifest.json` per folder.

A folder holds `acts_NNNNN.bin` ([rows, d_model] float32 or bfloat16, no header, memory-mapped on
read) and `ctx_NNNNN.bin` ([rows, 3] int32: window, position, token id of each row), listed with
row counts and sha256 checksums in `manifest.json`. Raw arrays rather than ArrayRecord because the
loader's global shuffle gathers single rows by index: memory-mapped rows are read at ~440k rows/s
per core here with no per-record decode (BUILD_NOTES: shard format).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re

import ml_dtypes
import numpy as np

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


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def write_atomic(path: str, data: bytes) -> None:
  """Writes to `path.tmp`, fsyncs and renames, so a reader never sees a partial file."""
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_manifest(folder: str, manifest: dict) -> None:
  write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=2).encode())


def read_manifest(folder: str) -> dict:
  """The folder's manifest, checked against the schema; a clear error for a missing folder, an
  empty one, bad JSON or a field the loader would misread."""
  if not os.path.isdir(folder):
    raise DataError(f"shard folder {folder}: does not exist")
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    found = sorted(os.listdir(folder))
    what = "the folder is empty" if not found else f"found only {found[:5]}"
    raise DataError(f"shard folder {folder}: expected {MANIFEST} written by launch/harvest.py, "
                    f"{what}")
  try:
    with open(path) as f:
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
  """Memory-mapped, verified shards of one harvest: global row r lives in shard
  `searchsorted(offsets, r, 'right') - 1` at row `r - offsets[shard]`."""

  folder: str
  manifest: dict
  acts: tuple[np.ndarray, ...]  # per shard [rows, d_model] memmaps
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

  def paths(self) -> list[str]:
    return [os.path.join(self.folder, s["file"]) for s in self.manifest["shards"]]

  def mean_sq_norm(self) -> float:
    return float(self.manifest["normalisation"]["mean_sq_norm"])

  def shard_of(self, rows: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.offsets, rows, side="right") - 1

  def gather(self, rows: np.ndarray) -> np.ndarray:
    """[len(rows), d_model] in the on-disk dtype, rows in the given order. Reads shard by shard
    in sorted row order so the page cache sees ascending offsets."""
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    shard = self.shard_of(sorted_rows)
    out = np.empty((len(rows), self.d_model), self.acts[0].dtype if self.acts else np.float32)
    bounds = np.flatnonzero(np.diff(shard)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(rows)]):
      if lo == hi:
        continue
      s = shard[lo]
      out[order[lo:hi]] = self.acts[s][sorted_rows[lo:hi] - self.offsets[s]]
    return out


def _verify_acts(path: str, mm: np.ndarray, expected_sha: str | None) -> None:
  """Checksum and finiteness in one pass over the file."""
  if expected_sha is not None:
    found = sha256_file(path)
    if found != expected_sha:
      raise DataError(f"shard {path}: sha256 mismatch, manifest says {expected_sha[:16]}..., "
                       f"file has {found[:16]}... (corrupted or overwritten)")
  for lo in range(0, mm.shape[0], _CHUNK_ROWS):
    finite = np.isfinite(np.asarray(mm[lo:lo + _CHUNK_ROWS], np.float32)).all(axis=1)
    if not finite.all():
      row = lo + int(np.argmin(finite))
      raise DataError(f"shard {path}: non-finite activations (NaN or Inf) at row {row}")


def open_shards(folder: str, verify: bool = True, require_complete: bool = True) -> ShardSet:
  """Opens a finished harvest. Always checks the manifest and file sizes; with `verify` also every
  checksum and that every activation is finite (one sequential read of the folder, before any
  training)."""
  manifest = read_manifest(folder)
  mpath = os.path.join(folder, MANIFEST)
  if require_complete and not manifest["complete"]:
    raise DataError(f"{mpath}: harvest not finished ({len(manifest['shards'])} shards so far); "
                    "re-run launch/harvest.py with the same config to complete it")
  if not manifest["shards"]:
    raise DataError(f"{mpath}: lists no shards (0 tokens harvested)")
  dtype, d = DTYPES[manifest["dtype"]], manifest["d_model"]
  acts, counts = [], []
  for entry in manifest["shards"]:
    rows = entry["tokens"]
    for name, width, dt, sha in ((entry["file"], d, dtype, entry["sha256"]),
                                 (entry["ctx_file"], len(CTX_COLUMNS), np.dtype(np.int32),
                                  entry["ctx_sha256"])):
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        raise DataError(f"shard {path}: missing (listed in {mpath})")
      expected, found = rows * width * dt.itemsize, os.path.getsize(path)
      if found != expected:
        kind = "truncated" if found < expected else "too long"
        raise DataError(f"shard {path}: {kind}, expected {expected} bytes ({rows} rows x {width} "
                        f"x {dt.itemsize} B), found {found}")
      if verify and name == entry["ctx_file"] and sha256_file(path) != sha:
        raise DataError(f"shard {path}: sha256 mismatch with {mpath} (corrupted or overwritten)")
    path = os.path.join(folder, entry["file"])
    mm = np.memmap(path, dtype=dtype, mode="r", shape=(rows, d))
    if verify:
      _verify_acts(path, mm, entry["sha256"])
    acts.append(mm)
    counts.append(rows)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  return ShardSet(folder, manifest, tuple(acts), offsets)


def read_ctx(folder: str, entry: dict) -> np.ndarray:
  """[rows, 3] int32 (window, position, token) of one shard entry."""
  path = os.path.join(folder, entry["ctx_file"])
  return np.fromfile(path, dtype=np.int32).reshape(-1, len(CTX_COLUMNS))
