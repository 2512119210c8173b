"""Token windows -> activation shards (format in `shards.py`), resumable and atomic, from one
process or many.

LM-agnostic: the caller passes `activation_fn(tokens [batch, T] int32)` giving one
[batch, T, d] array per target folder (one folder per hook site: one LM pass serves them all).

Layout (`plan_shards`, a pure function of the text and the spec): shard k always holds windows
[k * W, (k + 1) * W) (W = windows_per_shard), the last window cut so that the rows total
num_tokens exactly, so every shard's bytes depend on the text and the spec alone. Each shard
entry records the sha256 of its token windows, so resuming over text that changed since refuses
instead of mixing two texts.

Processes: with P processes, shard k is harvested by process k % P (`shard_owner`). Every
process packs the whole text (cheap next to the LM) to know where each shard starts and where
num_tokens cuts, and feeds the LM its own shards' windows only, batch_size / P per call. LM calls
are collectives over the global mesh, so before each call the processes exchange whether they
have windows left (`Processes.allgather`): a process that has none feeds padding and drops the
output, and all stop together. The same exchange carries failures, so that one process's error
stops the others instead of leaving them waiting in a collective.

Progress: each process lists the shards it finished in `progress/process_{p}.json` (after the
shard's files, atomically). A re-run, with any process count, skips the shards listed there or in
a partial manifest.json (the single-process format of earlier versions), after checking their
checksums (each process those it owns) and their text. When every process is done, process 0
merges the lists, computes the normalisation, commits manifest.json (complete=True) and removes
the progress files: the folder is then byte-identical to one written by one uninterrupted process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import tqdm

from gsae_jax.data import shards, storage
from gsae_jax.data.normalise import scale_for_mean_sq
from gsae_jax.errors import ConfigError, DataError, RunMismatch

# tokens [batch, T] int32 -> one [batch, T, d] array per target, in target order.
ActivationFn = Callable[[np.ndarray], Sequence[np.ndarray]]
# May change between runs without changing the output (a moved folder, a smaller LM batch,
# another mesh: the rows do not depend on them in exact arithmetic).
_RESUME_IGNORES = ("batch_size", "output_dir", "mesh")
PROGRESS_DIR = "progress"  # per-process lists of finished shards, removed at the commit
# What a process tells the others before each LM call (and at the barriers).
_DONE, _MORE, _FAILED = 0, 1, 2


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
  batch_size: int = 8  # windows per activation_fn call, over all processes together
  normalise_sample_tokens: int = 65536
  seed: int = 0  # normalisation sample


# Spec fields that fix which rows go where: every target of one pass must agree on them.
_PLAN_FIELDS = ("context_length", "num_tokens", "bos_token_id", "exclude_bos",
                "windows_per_shard", "batch_size")


@dataclasses.dataclass(frozen=True)
class Target:
  """One folder fed by the pass: its spec (site, width, dtype) and creation config."""

  folder: str
  spec: HarvestSpec
  creation_config: dict | None = None


@dataclasses.dataclass(frozen=True)
class Processes:
  """This process's place among the harvest's processes, and the one collective it needs:
  `allgather(code)` returns every process's code in process order (and is a barrier)."""

  index: int = 0
  count: int = 1
  allgather: Callable[[int], Sequence[int]] = lambda code: [code]


@dataclasses.dataclass(frozen=True)
class PlannedShard:
  """Shard `index`: windows [first_window, first_window + len(windows)); window i keeps its first
  rows[i] rows (after dropping BOS positions when the spec says so)."""

  index: int
  first_window: int
  windows: tuple[np.ndarray, ...]  # [context_length] int32 each
  rows: tuple[int, ...]
  windows_sha256: str  # the text's fingerprint, recorded in the shard's entry


def plan_shards(windows: Iterable[np.ndarray], spec: HarvestSpec) -> Iterator[PlannedShard]:
  """The shards a harvest of `windows` writes, in order, read lazily (one shard's windows at a
  time): W windows each, until the rows reach num_tokens (the last window cut) or the text ends."""
  windows, total, first = iter(windows), 0, 0
  for index in itertools.count():
    chunk, rows = [], []
    while len(chunk) < spec.windows_per_shard and total < spec.num_tokens:
      w = next(windows, None)
      if w is None:
        break
      w = np.asarray(w).astype(np.int32)
      if w.shape != (spec.context_length,):
        raise ValueError(f"window {first + len(chunk)}: expected length {spec.context_length}, "
                         f"found {w.shape[-1]}")
      kept = spec.context_length - int(np.sum(w == spec.bos_token_id)) if spec.exclude_bos \
          else spec.context_length
      rows.append(min(kept, spec.num_tokens - total))
      chunk.append(w)
      total += rows[-1]
    if not chunk:
      return
    yield PlannedShard(index, first, tuple(chunk), tuple(rows), windows_digest(chunk))
    first += len(chunk)
    if len(chunk) < spec.windows_per_shard:  # the text ran out
      return


def shard_owner(index: int, process_count: int) -> int:
  """The process that harvests shard `index`: round robin, so that processes finish together."""
  return index % process_count


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
    raise RunMismatch(f"{storage.join(folder, shards.MANIFEST)}: holds a harvest with another "
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


def windows_digest(windows: Iterable[np.ndarray]) -> str:
  h = hashlib.sha256()
  for w in windows:
    h.update(np.ascontiguousarray(w, np.int32).tobytes())
  return h.hexdigest()


# ---- progress: what is done, from the manifest and every process's part file ------------------

def _part_path(folder: str, process: int) -> str:
  return storage.join(storage.join(folder, PROGRESS_DIR), f"process_{process}.json")


def _part_paths(folder: str) -> list[str]:
  return sorted(storage.matching(storage.join(folder, PROGRESS_DIR), "process_*.json"))


def _read_part(path: str) -> dict[int, dict]:
  """{shard index: entry} of one process's part file."""
  try:
    return {int(k): e for k, e in json.loads(storage.read_bytes(path))["shards"].items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DataError(f"{path}: not a harvest progress file ({e}); delete the output dir to start "
                    "over") from None


@dataclasses.dataclass
class _Folder:
  """A target's state: its manifest as found (None: a new harvest) and the finished shards."""

  target: Target
  manifest: dict | None
  done: dict[int, dict]  # shard index -> entry, from the manifest and all part files
  mine: dict[int, dict]  # this process's part file, which it extends

  @property
  def complete(self) -> bool:
    return self.manifest is not None and self.manifest["complete"]


def _read_folder(target: Target, process: int) -> _Folder:
  """The target's progress; refuses a folder harvested with another spec or config."""
  folder, spec = target.folder, target.spec
  manifest = None
  if storage.exists(storage.join(folder, shards.MANIFEST)):
    manifest = shards.read_manifest(folder)
    _refuse_other_config(folder, _differences(manifest.get("spec", {}), dataclasses.asdict(spec),
                                              "spec")
                         + _differences(manifest.get("creation_config", {}),
                                        target.creation_config, "creation_config"))
  parts = _part_paths(folder)
  if parts and manifest is None:
    raise DataError(f"{folder}: holds harvest progress files but no {shards.MANIFEST}; delete "
                    "the output dir to start over")
  # A partial manifest lists shards 0, 1, ... in order (single-process runs of earlier versions
  # and the commit's first step); part files name their shards.
  done = dict(enumerate(manifest["shards"])) if manifest else {}
  for path in parts:
    done.update(_read_part(path))
  mine_path = _part_path(folder, process)
  mine = _read_part(mine_path) if storage.exists(mine_path) else {}
  return _Folder(target, manifest, done, mine)


def _check_owned_checksums(f: _Folder, processes: Processes) -> None:
  """The finished shards this process owns still hold the bytes listed (the read of the folder
  is split between the processes)."""
  for k, entry in sorted(f.done.items()):
    if shard_owner(k, processes.count) != processes.index:
      continue
    path = storage.join(f.target.folder, entry["file"])
    if not storage.exists(path) or shards.sha256_file(path) != entry["sha256"]:
      raise DataError(f"shard {path}: listed as harvested but missing or changed; delete the "
                      "output dir to start over")


def _check_text(f: _Folder, shard: PlannedShard) -> None:
  """A finished shard must come from the same windows today (tokenising again is cheap next to
  the LM; a changed text would mix two texts in one folder)."""
  entry = f.done.get(shard.index)
  if entry is None:
    return
  where = storage.join(f.target.folder, shards.MANIFEST)
  if len(shard.windows) < entry["windows"]:
    _refuse_ran_out(where, shard.index)
  expected = entry.get("windows_sha256")  # absent in manifests written before it was recorded
  if expected is not None and shard.windows_sha256 != expected:
    raise RunMismatch(f"{where}: shard {shard.index} was harvested from other text (sha256 of its "
                      f"{entry['windows']} token windows {expected[:12]}..., now "
                      f"{shard.windows_sha256[:12]}...); the text source changed since: restore "
                      "it or use a new output_dir")


def _refuse_ran_out(where: str, index: int) -> None:
  raise RunMismatch(f"{where}: the text ran out within the windows of shard {index}, which was "
                    "harvested from longer text; the text source changed since: restore it or "
                    "use a new output_dir")


def _verified(plan: Iterator[PlannedShard], folders: list[_Folder],
              wanted: Callable[[PlannedShard], bool]) -> Iterator[PlannedShard]:
  """`plan`, after checking the text of every finished shard before anything is written: the
  shards up to the last finished one are read now, those `wanted` kept in memory (tokens only)."""
  last = max((k for f in folders for k in f.done), default=-1)
  head, seen = [], -1
  for shard in plan:
    for f in folders:
      _check_text(f, shard)
    if wanted(shard):
      head.append(shard)
    seen = shard.index
    if seen >= last:
      break
  if seen < last:  # the plan ended before a finished shard
    missing = min(k for f in folders for k in f.done if k > seen)
    _refuse_ran_out(storage.join(folders[0].target.folder, shards.MANIFEST), missing)
  return itertools.chain(head, plan)


# ---- writing ---------------------------------------------------------------------------------

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


def kept_positions(tokens: np.ndarray, spec: HarvestSpec, budget: int) -> np.ndarray:
  """Positions of one window whose rows are stored: BOS dropped if asked, at most `budget`."""
  keep = np.arange(spec.context_length)
  if spec.exclude_bos:
    keep = keep[tokens != spec.bos_token_id]
  return keep[:budget]


def _write_shard(folder: str, index: int, acts: np.ndarray, ctx: np.ndarray, n_windows: int,
                 windows_sha256: str, dtype: np.dtype) -> dict:
  acts_bytes = np.ascontiguousarray(acts, dtype).tobytes()  # no copy before this when stored dtype
  ctx_bytes = np.ascontiguousarray(ctx, np.int32).tobytes()
  # ctx first: a shard counts as written once its acts file and its progress entry exist.
  shards.write_atomic(storage.join(folder, shards.ctx_name(index)), ctx_bytes)
  shards.write_atomic(storage.join(folder, shards.acts_name(index)), acts_bytes)
  return {"file": shards.acts_name(index), "ctx_file": shards.ctx_name(index),
          "tokens": int(acts.shape[0]), "windows": n_windows, "windows_sha256": windows_sha256,
          "sha256": hashlib.sha256(acts_bytes).hexdigest(),
          "ctx_sha256": hashlib.sha256(ctx_bytes).hexdigest()}


class _ShardWriter:
  """Collects one shard's rows batch by batch and writes it, with its progress entry, into every
  folder that lacks it."""

  def __init__(self, folders: list[_Folder], processes: Processes, bar: tqdm.tqdm):
    self.folders, self.processes, self.bar = folders, processes, bar
    self.shard: PlannedShard | None = None
    self.acts: list[list[np.ndarray]] = []
    self.ctx: list[np.ndarray] = []

  def add(self, shard: PlannedShard, lo: int, tokens: np.ndarray,
          outputs: Sequence[np.ndarray]) -> None:
    """Rows of windows lo, lo + 1, ... of `shard` (tokens [n, T]; outputs padded beyond n)."""
    if self.shard is not shard:
      self.shard, self.acts, self.ctx = shard, [[] for _ in self.folders], []
    if len(outputs) != len(self.folders):
      raise ValueError(f"activation_fn: expected {len(self.folders)} arrays (one per target), "
                       f"found {len(outputs)}")
    outputs = [np.asarray(o)[:len(tokens)] for o in outputs]
    for f, acts in zip(self.folders, outputs):
      expected = (*tokens.shape, f.target.spec.d_model)
      if acts.shape != expected:
        raise ValueError(f"activation_fn: expected shape {expected} for "
                         f"{f.target.spec.site}, found {acts.shape}")
      if not np.isfinite(acts).all():
        bad = int(np.argmin(np.isfinite(acts).all(axis=(1, 2))))
        raise DataError(f"activation_fn returned NaN or Inf for window "
                        f"{shard.first_window + lo + bad} (shard {shard.index}); nothing written "
                        "for it")
    spec = self.folders[0].target.spec
    for i in range(len(tokens)):
      keep = kept_positions(tokens[i], spec, shard.rows[lo + i])
      window = np.full(len(keep), shard.first_window + lo + i)
      self.ctx.append(np.stack([window, keep, tokens[i][keep]], axis=1).astype(np.int32))
      for parts, acts in zip(self.acts, outputs):
        parts.append(acts[i][keep])
      self.bar.update(len(keep))
    if lo + len(tokens) == len(shard.windows):
      self._write()

  def _write(self) -> None:
    shard, ctx = self.shard, np.concatenate(self.ctx)
    for f, acts in zip(self.folders, self.acts):
      if shard.index in f.done:
        continue
      folder = f.target.folder
      with _resumable_on_os_error(folder, shard.index):
        entry = _write_shard(folder, shard.index, np.concatenate(acts), ctx, len(shard.windows),
                             shard.windows_sha256, shards.DTYPES[f.target.spec.dtype])
        f.done[shard.index] = f.mine[shard.index] = entry
        storage.makedirs(storage.join(folder, PROGRESS_DIR))
        shards.write_atomic(_part_path(folder, self.processes.index),
                            json.dumps({"shards": f.mine}, indent=1).encode())
    self.shard, self.acts, self.ctx = None, [], []


# ---- the lockstep ----------------------------------------------------------------------------

def _exchange(processes: Processes, code: int, error: BaseException | None) -> Sequence[int]:
  """Every process's code (a barrier). A failure anywhere stops every process: its own error
  where it happened, a pointer to the failed process elsewhere."""
  codes = list(processes.allgather(_FAILED if error is not None else code))
  if error is not None:
    raise error
  failed = [p for p, c in enumerate(codes) if c == _FAILED]
  if failed:
    raise DataError(f"harvest: process {failed[0]} of {processes.count} failed (its output says "
                    "why); stopping this one too; fix the cause and re-run every process to "
                    "resume")
  return codes


def _attempt(fn: Callable[[], Any]) -> tuple[Any, BaseException | None]:
  """(fn(), None), or (None, its error) kept for the next exchange: local work between two
  exchanges must not leave the other processes waiting in one."""
  try:
    return fn(), None
  except Exception as e:  # noqa: BLE001 (re-raised by _exchange)
    return None, e


def _padded(tokens: np.ndarray | None, rows: int, spec: HarvestSpec) -> np.ndarray:
  """[rows, T]: `tokens` and copies of its last window (one compiled batch shape), or BOS
  windows for a process that has no window left for this call."""
  if tokens is None:
    return np.full((rows, spec.context_length), spec.bos_token_id, np.int32)
  return np.concatenate([tokens, np.repeat(tokens[-1:], rows - len(tokens), 0)])


def _batches(shards_todo: Iterable[PlannedShard], todo: Callable[[PlannedShard], bool],
             per_call: int) -> Iterator[tuple[PlannedShard, int]]:
  """(shard, first window) of each of this process's LM calls: batches never span two shards, so
  a shard's batches are the same whatever else the process harvests."""
  for shard in shards_todo:
    if todo(shard):
      for lo in range(0, len(shard.windows), per_call):
        yield shard, lo


def _lockstep(batches: Iterator[tuple[PlannedShard, int]], activation_fn: ActivationFn,
              writer: _ShardWriter, processes: Processes, per_call: int, spec: HarvestSpec,
              error: BaseException | None) -> None:
  """This process's LM calls, in step with every other process's: before each call all say
  whether they have windows left; one with none feeds padding; all stop when none has any."""
  while True:
    item = None
    if error is None:
      item, error = _attempt(lambda: next(batches, None))
    if _MORE not in _exchange(processes, _DONE if item is None else _MORE, error):
      return
    tokens = None if item is None else np.stack(item[0].windows[item[1]:item[1] + per_call])
    outputs = activation_fn(_padded(tokens, per_call, spec))  # a collective: every process calls
    if item is not None:
      error = _attempt(lambda: writer.add(*item, tokens, outputs))[1]


class _Counted:
  """The plan, remembering how many shards it has given (every process reads all of it)."""

  def __init__(self, plan: Iterator[PlannedShard]):
    self.plan, self.count = plan, 0

  def __iter__(self) -> "_Counted":
    return self

  def __next__(self) -> PlannedShard:
    shard = next(self.plan)
    self.count = shard.index + 1
    return shard


def _start(folders: list[_Folder]) -> None:
  """Process 0, once every process has read the folders: removes the temp files of writes cut
  short and writes the manifest of a new harvest (its config, no shards yet)."""
  for f in folders:
    folder = f.target.folder
    storage.makedirs(folder)
    for stale in storage.matching(folder, "*.tmp") + storage.matching(
        storage.join(folder, PROGRESS_DIR), "*.tmp"):
      storage.remove(stale)  # a write cut short by the stop we are resuming from
    if f.manifest is None:
      shards.write_manifest(folder, _new_manifest(f.target.spec, f.target.creation_config))


def _commit(target: Target, num_shards: int) -> None:
  """Process 0, after every process finished: manifest.json listing shards 0..K-1, then the
  normalisation and complete=True; the progress files go."""
  folder, spec = target.folder, target.spec
  f = _read_folder(target, 0)
  missing = [k for k in range(num_shards) if k not in f.done]
  if missing:
    raise DataError(f"{folder}: shard {missing[0]} of {num_shards} is missing after every process "
                    "finished (its progress entry was lost); re-run to harvest it")
  manifest = f.manifest
  with _resumable_on_os_error(folder, num_shards - 1):
    manifest["shards"] = [f.done[k] for k in range(num_shards)]
    manifest["token_count"] = sum(e["tokens"] for e in manifest["shards"])
    manifest["num_windows"] = sum(e["windows"] for e in manifest["shards"])
    shards.write_manifest(folder, manifest)  # partial, every shard listed: a resumable state
    for path in _part_paths(folder):
      storage.remove(path)
    storage.remove_empty_dir(storage.join(folder, PROGRESS_DIR))
    manifest["normalisation"] = _normalisation(folder, spec)
    manifest["complete"] = True
    shards.write_manifest(folder, manifest)


def _normalisation(folder: str, spec: HarvestSpec) -> dict:
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


def _check_targets(targets: Sequence[Target], processes: Processes) -> HarvestSpec:
  """The spec the targets share (their rows are the same rows), after checking each."""
  if not targets:
    raise ValueError("harvest: expected at least one target folder")
  for t in targets:
    s = t.spec
    if s.dtype not in shards.DTYPES:
      raise ConfigError(f"harvest dtype={s.dtype!r}: expected one of {tuple(shards.DTYPES)}")
    if s.num_tokens <= 0 or s.windows_per_shard <= 0 or s.batch_size <= 0:
      raise ConfigError(f"harvest num_tokens={s.num_tokens}, windows_per_shard="
                        f"{s.windows_per_shard}, batch_size={s.batch_size}: expected > 0")
    for field in _PLAN_FIELDS:
      if getattr(s, field) != getattr(targets[0].spec, field):
        raise ValueError(f"harvest targets {targets[0].folder} and {t.folder}: {field} "
                         f"{getattr(targets[0].spec, field)} != {getattr(s, field)}; one pass "
                         "feeds folders of the same windows and rows")
  folders = [os.path.abspath(t.folder) if storage.is_local(t.folder) else t.folder
             for t in targets]
  if len(set(folders)) < len(folders):
    raise ValueError(f"harvest targets: expected distinct folders, found {folders}")
  spec = targets[0].spec
  if spec.batch_size % processes.count:
    raise ConfigError(f"harvest batch_size={spec.batch_size}: expected a multiple of the "
                      f"{processes.count} processes (each feeds batch_size / "
                      f"{processes.count} windows to every LM call)")
  return spec


def _progress_bar(folders: list[_Folder], spec: HarvestSpec, processes: Processes,
                  enabled: bool) -> tqdm.tqdm:
  """Rows stored, rate and ETA; with several processes, this process's rows (no total)."""
  sites = ", ".join(f.target.spec.site for f in folders)
  total, initial, desc = None, 0, f"harvest {sites}"
  if processes.count == 1:
    total = spec.num_tokens
    initial = sum(e["tokens"] for k, e in folders[0].done.items()
                  if all(k in f.done for f in folders))
  else:
    desc += f" [process {processes.index} of {processes.count}]"
  # closed on errors too: an error line must not be glued to a half-drawn bar
  return tqdm.tqdm(total=total, initial=initial, unit="tok", unit_scale=True, desc=desc,
                   disable=not enabled, smoothing=0.1)


# ---- entry points ----------------------------------------------------------------------------

def harvest(folder: str, windows: Iterable[np.ndarray],
            activation_fn: Callable[[np.ndarray], np.ndarray], spec: HarvestSpec,
            creation_config: dict | None = None, progress: bool = True,
            processes: Processes = Processes()) -> dict:
  """Writes shards of `activation_fn(windows)` ([batch, T] -> [batch, T, d]) to `folder`,
  continuing a stopped harvest there; returns the final manifest. `windows` yields
  [context_length] int32 arrays starting with BOS."""
  target = Target(folder, spec, creation_config)
  return harvest_targets([target], windows, lambda tokens: [activation_fn(tokens)], progress,
                         processes)[0]


def harvest_targets(targets: Sequence[Target], windows: Iterable[np.ndarray],
                    activation_fn: ActivationFn, progress: bool = True,
                    processes: Processes = Processes()) -> list[dict]:
  """One pass over `windows` feeding every target folder (the manifest of each, in order). As
  process `processes.index` of `processes.count`: every process passes the same windows and
  targets and harvests its own shards (module docstring); all return the committed manifests."""
  spec = _check_targets(targets, processes)
  targets = [dataclasses.replace(t, creation_config=as_stored(t.creation_config)) for t in targets]
  folders = [_read_folder(t, processes.index) for t in targets]
  if all(f.complete for f in folders):
    return [f.manifest for f in folders]
  unfinished = [i for i, f in enumerate(folders) if not f.complete]
  folders = [folders[i] for i in unfinished]
  plan = _Counted(plan_shards(windows, spec))
  per_call = spec.batch_size // processes.count

  def todo(shard: PlannedShard) -> bool:  # this process's, and missing from some folder
    return (shard_owner(shard.index, processes.count) == processes.index
            and any(shard.index not in f.done for f in folders))

  def unfinished_outputs(tokens: np.ndarray) -> list[np.ndarray]:  # one LM call for all
    outputs = activation_fn(tokens)
    return [outputs[i] for i in unfinished]

  def prepare() -> Iterator[PlannedShard]:  # every process reads and checks before any writes
    for f in folders:
      _check_owned_checksums(f, processes)
    return _verified(plan, folders, todo)
  shards_todo, error = _attempt(prepare)
  _exchange(processes, _DONE, error)
  if plan.count == 0:  # the same on every process: all read the same text
    raise DataError(f"harvest into {folders[0].target.folder}: the text gave no complete window "
                    f"of {spec.context_length} tokens")

  error = _attempt(lambda: _start(folders))[1] if processes.index == 0 else None
  with _progress_bar(folders, spec, processes, progress) as bar:
    _lockstep(_batches(shards_todo, todo, per_call), unfinished_outputs,
              _ShardWriter(folders, processes, bar), processes, per_call, spec, error)
  error = None
  if processes.index == 0:
    error = _attempt(lambda: [_commit(f.target, plan.count) for f in folders])[1]
  _exchange(processes, _DONE, error)
  return [shards.read_manifest(t.folder) for t in targets]
