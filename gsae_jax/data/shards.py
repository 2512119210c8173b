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
import os

import ml_dtypes
import numpy as np

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
CTX_COLUMNS = ("window", "position", "token")  # columns of ctx_NNNNN.bin
_CHUNK_ROWS = 1 << 14  # rows per read when verifying a shard


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
  """The folder's manifest; a clear error for a missing folder, an empty one or bad JSON."""
  if not os.path.isdir(folder):
    raise ValueError(f"shard folder {folder}: does not exist")
  path = os.path.join(folder, MANIFEST)
  if not os.path.exists(path):
    found = sorted(os.listdir(folder))
    what = "the folder is empty" if not found else f"found only {found[:5]}"
    raise ValueError(f"shard folder {folder}: expected {MANIFEST} written by launch/harvest.py, "
                     f"{what}")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  for key in ("d_model", "dtype", "token_count", "shards", "complete", "normalisation"):
    if key not in manifest:
      raise ValueError(f"{path}: missing field {key!r}")
  return manifest


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
      raise ValueError(f"shard {path}: sha256 mismatch, manifest says {expected_sha[:16]}..., "
                       f"file has {found[:16]}... (corrupted or overwritten)")
  for lo in range(0, mm.shape[0], _CHUNK_ROWS):
    finite = np.isfinite(np.asarray(mm[lo:lo + _CHUNK_ROWS], np.float32)).all(axis=1)
    if not finite.all():
      row = lo + int(np.argmin(finite))
      raise ValueError(f"shard {path}: non-finite activations (NaN or Inf) at row {row}")


def open_shards(folder: str, verify: bool = True, require_complete: bool = True) -> ShardSet:
  """Opens a finished harvest. Always checks file sizes; with `verify` also every checksum and
  that every activation is finite (one sequential read of the folder, before any training)."""
  manifest = read_manifest(folder)
  mpath = os.path.join(folder, MANIFEST)
  if require_complete and not manifest["complete"]:
    raise ValueError(f"{mpath}: harvest not finished ({len(manifest['shards'])} shards so far); "
                     "re-run launch/harvest.py with the same config to complete it")
  if manifest["dtype"] not in DTYPES:
    raise ValueError(f"{mpath}: dtype expected one of {tuple(DTYPES)}, found {manifest['dtype']!r}")
  if not manifest["shards"]:
    raise ValueError(f"{mpath}: lists no shards (0 tokens harvested)")
  dtype, d = DTYPES[manifest["dtype"]], int(manifest["d_model"])
  acts, counts = [], []
  for entry in manifest["shards"]:
    rows = int(entry["tokens"])
    for name, width, dt, sha in ((entry["file"], d, dtype, entry["sha256"]),
                                 (entry["ctx_file"], len(CTX_COLUMNS), np.dtype(np.int32),
                                  entry["ctx_sha256"])):
      path = os.path.join(folder, name)
      if not os.path.exists(path):
        raise ValueError(f"shard {path}: missing (listed in {mpath})")
      expected, found = rows * width * dt.itemsize, os.path.getsize(path)
      if found != expected:
        kind = "truncated" if found < expected else "too long"
        raise ValueError(f"shard {path}: {kind}, expected {expected} bytes ({rows} rows x {width} "
                         f"x {dt.itemsize} B), found {found}")
      if verify and name == entry["ctx_file"] and sha256_file(path) != sha:
        raise ValueError(f"shard {path}: sha256 mismatch with {mpath} (corrupted or overwritten)")
    path = os.path.join(folder, entry["file"])
    mm = np.memmap(path, dtype=dtype, mode="r", shape=(rows, d))
    if verify:
      _verify_acts(path, mm, entry["sha256"])
    acts.append(mm)
    counts.append(rows)
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  if offsets[-1] != int(manifest["token_count"]):
    raise ValueError(f"{mpath}: token_count={manifest['token_count']} but shards hold "
                     f"{offsets[-1]} rows")
  return ShardSet(folder, manifest, tuple(acts), offsets)


def read_ctx(folder: str, entry: dict) -> np.ndarray:
  """[rows, 3] int32 (window, position, token) of one shard entry."""
  path = os.path.join(folder, entry["ctx_file"])
  return np.fromfile(path, dtype=np.int32).reshape(-1, len(CTX_COLUMNS))
