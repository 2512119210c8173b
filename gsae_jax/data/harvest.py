"""Token windows -> activation shards (format in `shards.py`), resumable and atomic.

LM-agnostic: the caller passes `activation_fn(tokens [batch, T] int32) -> [batch, T, d_model]`.
Shard k always holds windows [k * windows_per_shard, (k + 1) * windows_per_shard), so a re-run
skips the windows of the shards already listed in the manifest and writes the same bytes an
uninterrupted run would. Each shard entry records the sha256 of its token windows, so resuming
over text that changed since refuses instead of mixing two texts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import os
from typing import Callable, Iterable, Iterator

import numpy as np
import tqdm

from gsae_jax.data import shards
from gsae_jax.data.normalise import scale_for_mean_sq
from gsae_jax.errors import ConfigError, DataError, RunMismatch

ActivationFn = Callable[[np.ndarray], np.ndarray]
# May change between runs without changing the output (a moved folder, a smaller LM batch).
_RESUME_IGNORES = ("batch_size", "output_dir")


@dataclasses.dataclass(frozen=True)
class HarvestSpec:
  """What is harvested; stored in the manifest and checked on resume."""

  model_id: str
  site: str  # e.g. 'blocks.6.resid_post'
  layer: int
  d_model: int
  context_length: int
  num_tokens: int  # rows to store (the last window is cut to hit it exactly)
  bos_token_id: int
  revision: str | None = None
  dtype: str = "float32"  # on disk: 'float32' | 'bfloat16'
  exclude_bos: bool = True  # drop every BOS position (window starts and separators)
  windows_per_shard: int = 64
  batch_size: int = 8  # windows per activation_fn call
  normalise_sample_tokens: int = 65536
  seed: int = 0  # normalisation sample


def _flat(d: dict, prefix: str) -> dict:
  """Nested dicts as {'prefix.a.b': value}, so that a difference names the field itself."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}.{k}"))
    else:
      out[f"{prefix}.{k}"] = v
  return out


def _differences(old: dict, new: dict, part: str) -> list[str]:
  """'part.field: old -> new' for each field that changed, fields in _RESUME_IGNORES aside."""
  strip = lambda d: _flat({k: v for k, v in d.items() if k not in _RESUME_IGNORES}, part)
  old, new = strip(old), strip(new)
  return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)]


def _refuse_other_config(folder: str, diff: list[str]) -> None:
  if diff:
    raise RunMismatch(f"{os.path.join(folder, shards.MANIFEST)}: holds a harvest with another "
                      f"config, refusing to mix them ({'; '.join(diff[:5])}); use a new "
                      "output_dir")


def as_stored(creation_config: dict | None) -> dict:
  """The creation config as the manifest stores it (JSON: tuples become lists)."""
  return json.loads(json.dumps(creation_config or {}))


def check_creation_config(folder: str, manifest: dict, creation_config: dict | None) -> None:
  """Refuses `folder`'s harvest when it was made with another creation config (fields in
  _RESUME_IGNORES aside). Needs no LM: callers run it before loading one."""
  _refuse_other_config(folder, _differences(manifest.get("creation_config", {}),
                                            as_stored(creation_config), "creation_config"))


def _new_manifest(spec: HarvestSpec, creation_config: dict) -> dict:
  return {
      "format_version": shards.FORMAT_VERSION,
      "model_id": spec.model_id, "revision": spec.revision, "site": spec.site,
      "layer": spec.layer, "d_model": spec.d_model, "dtype": spec.dtype,
      "context_length": spec.context_length, "exclude_bos": spec.exclude_bos,
      "bos_token_id": spec.bos_token_id, "windows_per_shard": spec.windows_per_shard,
      "token_count": 0, "num_windows": 0, "complete": False,
      "normalisation": None, "shards": [],
      "ctx_columns": list(shards.CTX_COLUMNS),
      "spec": dataclasses.asdict(spec), "creation_config": creation_config,
  }


def _check_resumable(folder: str, manifest: dict, spec: HarvestSpec, creation_config: dict):
  _refuse_other_config(folder, _differences(manifest.get("spec", {}), dataclasses.asdict(spec),
                                            "spec")
                       + _differences(manifest.get("creation_config", {}), creation_config,
                                      "creation_config"))
  for entry in manifest["shards"]:
    path = os.path.join(folder, entry["file"])
    if not os.path.exists(path) or shards.sha256_file(path) != entry["sha256"]:
      raise DataError(f"shard {path}: listed in the manifest but missing or changed; "
                      "delete the output dir to start over")


def _windows_digest(windows: Iterable[np.ndarray]) -> str:
  h = hashlib.sha256()
  for w in windows:
    h.update(np.ascontiguousarray(w, np.int32).tobytes())
  return h.hexdigest()


def _skip_harvested(folder: str, manifest: dict, windows: Iterator[np.ndarray]) -> None:
  """Consumes the windows of the shards already written, refusing text that no longer gives
  them (tokenising again is cheap next to the LM; skipping keeps shard k = windows of shard k)."""
  where = os.path.join(folder, shards.MANIFEST)
  for k, entry in enumerate(manifest["shards"]):
    got = list(itertools.islice(windows, entry["windows"]))
    if len(got) < entry["windows"]:
      raise RunMismatch(f"{where}: the text ran out within the windows of shard {k}, which was "
                        "harvested from longer text; the text source changed since: restore it "
                        "or use a new output_dir")
    expected = entry.get("windows_sha256")  # absent in manifests written before it was recorded
    found = _windows_digest(got)
    if expected is not None and found != expected:
      raise RunMismatch(f"{where}: shard {k} was harvested from other text (sha256 of its "
                        f"{entry['windows']} token windows {expected[:12]}..., now "
                        f"{found[:12]}...); the text source changed since: restore it or use a "
                        "new output_dir")


@contextlib.contextmanager
def _resumable_on_os_error(folder: str, shard: int) -> Iterator[None]:
  """A failed write (disk full, permissions) names the way out: the shards listed before it are
  whole (writes are atomic) and a re-run resumes after them, removing the partial files."""
  try:
    yield
  except OSError as e:
    raise type(e)(e.errno, f"{e.strerror or e} while writing shard {shard} into {folder}; the "
                  "shards before it are kept: fix the cause and re-run the same command to "
                  "resume", e.filename) from e


def _select_rows(tokens: np.ndarray, acts: np.ndarray, window: int, spec: HarvestSpec,
                 budget: int):
  """Rows of one window to keep: acts [rows, d], ctx [rows, 3] (window, position, token)."""
  keep = np.arange(spec.context_length)
  if spec.exclude_bos:
    keep = keep[tokens != spec.bos_token_id]
  keep = keep[:budget]
  ctx = np.stack([np.full(len(keep), window), keep, tokens[keep]], axis=1).astype(np.int32)
  return acts[keep], ctx


def _write_shard(folder: str, index: int, acts: np.ndarray, ctx: np.ndarray, n_windows: int,
                 windows_sha256: str, dtype: np.dtype) -> dict:
  acts_bytes = np.ascontiguousarray(acts.astype(dtype)).tobytes()
  ctx_bytes = np.ascontiguousarray(ctx, np.int32).tobytes()
  # ctx first: a shard counts as written once its acts file and the manifest entry exist.
  shards.write_atomic(os.path.join(folder, shards.ctx_name(index)), ctx_bytes)
  shards.write_atomic(os.path.join(folder, shards.acts_name(index)), acts_bytes)
  return {"file": shards.acts_name(index), "ctx_file": shards.ctx_name(index),
          "tokens": int(acts.shape[0]), "windows": n_windows, "windows_sha256": windows_sha256,
          "sha256": hashlib.sha256(acts_bytes).hexdigest(),
          "ctx_sha256": hashlib.sha256(ctx_bytes).hexdigest()}


def _normalisation(folder: str, manifest: dict, spec: HarvestSpec) -> dict:
  """GATED_SAE.md section 4: E||x||^2 over a seeded uniform sample of all stored rows; the
  loader turns it into scale = sqrt(target / mean_sq_norm) for the configured target."""
  s = shards.open_shards(folder, verify=False, require_complete=False)
  n = min(spec.normalise_sample_tokens, s.num_tokens)
  rows = np.sort(np.random.default_rng(spec.seed).choice(s.num_tokens, n, replace=False))
  x = s.gather(rows).astype(np.float64)
  mean_sq = float(np.mean(np.sum(x * x, axis=1)))
  if not mean_sq > 0:
    raise DataError(f"{folder}: mean squared activation norm is {mean_sq}; cannot normalise")
  return {"mean_sq_norm": mean_sq, "target": "d_model",
          "scale": scale_for_mean_sq(mean_sq, float(spec.d_model)), "sample_tokens": int(n),
          "sample_seed": spec.seed}


def harvest(folder: str, windows: Iterable[np.ndarray], activation_fn: ActivationFn,
            spec: HarvestSpec, creation_config: dict | None = None,
            progress: bool = True) -> dict:
  """Writes shards of `activation_fn(windows)` to `folder`, continuing a stopped harvest there;
  returns the final manifest. `windows` yields [context_length] int32 arrays starting with BOS."""
  if spec.dtype not in shards.DTYPES:
    raise ConfigError(f"harvest dtype={spec.dtype!r}: expected one of {tuple(shards.DTYPES)}")
  if spec.num_tokens <= 0 or spec.windows_per_shard <= 0 or spec.batch_size <= 0:
    raise ConfigError(f"harvest num_tokens={spec.num_tokens}, windows_per_shard="
                      f"{spec.windows_per_shard}, batch_size={spec.batch_size}: expected > 0")
  creation_config = as_stored(creation_config)
  windows = iter(windows)
  if os.path.exists(os.path.join(folder, shards.MANIFEST)):
    manifest = shards.read_manifest(folder)
    _check_resumable(folder, manifest, spec, creation_config)
    if manifest["complete"]:
      return manifest
    _skip_harvested(folder, manifest, windows)
  else:
    manifest = _new_manifest(spec, creation_config)
  os.makedirs(folder, exist_ok=True)
  for stale in glob.glob(os.path.join(folder, "*.tmp")):
    os.remove(stale)  # a write cut short by the stop we are resuming from

  dtype = shards.DTYPES[spec.dtype]
  per = spec.windows_per_shard
  done = len(manifest["shards"])
  tokens_done = sum(e["tokens"] for e in manifest["shards"])
  # closed on errors too: an error line must not be glued to a half-drawn bar
  with tqdm.tqdm(total=spec.num_tokens, initial=tokens_done, unit="tok", unit_scale=True,
                 desc=f"harvest {spec.site}", disable=not progress, smoothing=0.1) as bar:
    window_index = sum(e["windows"] for e in manifest["shards"])
    exhausted = False
    while tokens_done < spec.num_tokens and not exhausted:
      acts_parts, ctx_parts, n_windows, shard_tokens = [], [], 0, 0
      text_hash = hashlib.sha256()
      while n_windows < per and tokens_done + shard_tokens < spec.num_tokens:
        batch = list(itertools.islice(windows, min(spec.batch_size, per - n_windows)))
        if not batch:
          exhausted = True
          break
        tokens = np.stack(batch).astype(np.int32)
        if tokens.shape[1] != spec.context_length:
          raise ValueError(f"window {window_index}: expected length {spec.context_length}, "
                           f"found {tokens.shape[1]}")
        padded = np.concatenate([tokens, np.repeat(tokens[-1:], spec.batch_size - len(batch), 0)])
        acts = np.asarray(activation_fn(padded))[:len(batch)]  # fixed batch: one compilation
        if acts.shape != (*tokens.shape, spec.d_model):
          raise ValueError(f"activation_fn: expected shape {(*tokens.shape, spec.d_model)}, found "
                           f"{acts.shape}")
        if not np.isfinite(acts).all():
          bad = int(np.argmin(np.isfinite(acts).all(axis=(1, 2))))
          raise DataError(f"activation_fn returned NaN or Inf for window {window_index + bad} "
                          f"(shard {done}); nothing written for it")
        for i in range(len(batch)):
          budget = spec.num_tokens - tokens_done - shard_tokens
          if budget <= 0:
            break
          a, c = _select_rows(tokens[i], acts[i], window_index, spec, budget)
          acts_parts.append(a)
          ctx_parts.append(c)
          text_hash.update(tokens[i].tobytes())
          shard_tokens += len(a)
          n_windows += 1
          window_index += 1
          bar.update(len(a))
      if n_windows == 0:
        break
      with _resumable_on_os_error(folder, done):
        entry = _write_shard(folder, done, np.concatenate(acts_parts), np.concatenate(ctx_parts),
                             n_windows, text_hash.hexdigest(), dtype)
        manifest["shards"].append(entry)
        tokens_done += entry["tokens"]
        manifest["token_count"] = tokens_done
        manifest["num_windows"] = window_index
        shards.write_manifest(folder, manifest)
      done += 1
  if tokens_done == 0:
    raise DataError(f"harvest into {folder}: the text gave no complete window of "
                    f"{spec.context_length} tokens")
  manifest["normalisation"] = _normalisation(folder, manifest, spec)
  manifest["complete"] = True
  with _resumable_on_os_error(folder, done):
    shards.write_manifest(folder, manifest)
  return manifest
