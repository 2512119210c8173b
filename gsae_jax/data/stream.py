"""Streaming from the LM (`data.source='lm'`): training batches of activations as the LM produces
them, harvest and training in one job, nothing written to disk.

The text is packed into BOS-prefixed windows exactly as a harvest packs it (`data.lm` is a
harvest-style block). Group g is windows [g * G, (g + 1) * G) (G = `data.buffer_windows`); its
kept rows (BOS excluded, as a harvest keeps them) are mixed by the seeded bijection
`permute(i, n_g, seed, g)` and appended to the row stream; batch b is stream rows
[b * B, (b + 1) * B), so batches straddle groups and every row is used once. The iterator state is
(group, offset in it, batches done): a restore re-tokenises the text, skips g * G windows, runs the
LM on group g and skips `offset` rows, which gives exactly the batches an uninterrupted run gives.
One pass over the text: when it runs out, `__next__` raises StopIteration (the training loop then
saves a checkpoint and stops).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from gsae_jax import configs
from gsae_jax.data import harvest, shards
from gsae_jax.data.normalise import resolve_target, scale_for_mean_sq
from gsae_jax.data.permutation import permute
from gsae_jax.errors import ConfigError, DataError, RunMismatch

ActivationFn = Callable[[np.ndarray], np.ndarray]  # tokens [batch, T] -> [batch, T, d] float32


def _check(ok: bool, field: str, expected: str, found) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: expected {expected}, found {found!r}")


def validate(data) -> None:
  """Cheap checks of `config.data` for source 'lm': fields and types; loads neither the LM nor
  the text."""
  from gsae_jax.runs import harvesting  # the harvest's field rules; runs is above data

  configs.check_int(data.get("d_in"), "data.d_in", 1, " (the width of the LM site)")
  configs.check_int(data.get("buffer_windows"), "data.buffer_windows", 1)
  lm = data.get("lm")
  _check(hasattr(lm, "items"), "data.lm", "a harvest-style block (model, site, layer, text, ...)",
         lm)
  harvesting.validate_lm_block(lm, "data.lm.")


class LMGroups:
  """Group g of the stream: its kept rows [rows, d] float32 in stream order, computed on demand.
  Reading groups in order continues one pass over the text; an earlier group (a restore, the
  b_dec mean's rewind) starts the text again."""

  def __init__(self, open_windows: Callable[[], Iterator[np.ndarray]], activation_fn: ActivationFn,
               spec: harvest.HarvestSpec, buffer_windows: int, seed: int):
    self._open_windows, self._activation_fn = open_windows, activation_fn
    self.spec, self.buffer_windows, self.seed = spec, buffer_windows, seed
    self._windows: Iterator[np.ndarray] | None = None
    self._next = 0  # the group `_windows` stands at
    self._cached: tuple[int, np.ndarray | None, str | None] | None = None  # (g, rows, digest)

  def get(self, g: int) -> np.ndarray | None:
    """Group g, or None when the text ends before it."""
    if self._cached is None or self._cached[0] != g:
      self._cached = (g, *self._read(g))
    return self._cached[1]

  def digest(self, g: int) -> str | None:
    """sha256 of group g's token windows (the harvest's text fingerprint) once it was read;
    None before, or when the text ends before it."""
    return self._cached[2] if self._cached is not None and self._cached[0] == g else None

  def _read(self, g: int) -> tuple[np.ndarray | None, str | None]:
    if self._windows is None or g < self._next:
      self._windows, self._next = self._open_windows(), 0
    skip = (g - self._next) * self.buffer_windows
    next(itertools.islice(self._windows, skip, skip), None)  # consumes `skip` windows
    windows = list(itertools.islice(self._windows, self.buffer_windows))
    self._next = g + 1
    if not windows:
      return None, None
    tokens = np.stack(windows).astype(np.int32)
    return self._compute(g, tokens), harvest.windows_digest(tokens)

  def _compute(self, g: int, tokens: np.ndarray) -> np.ndarray:
    first = g * self.buffer_windows
    acts = self._activations(tokens)
    finite = np.isfinite(acts).all(axis=(1, 2))
    if not finite.all():
      raise DataError(f"{self.spec.model_id} {self.spec.site}: NaN or Inf activations in window "
                      f"{first + int(np.argmin(finite))} of the text (after skip_windows)")
    # The rows a harvest stores (BOS left out as the spec says; a stream has no row budget), as
    # flat indices, so that mixing them is one gather: no third copy of the group in memory.
    T = self.spec.context_length
    kept = np.concatenate([i * T + harvest.kept_positions(t, self.spec, T)
                           for i, t in enumerate(tokens)])
    order = permute(np.arange(len(kept)), len(kept), self.seed, g)
    return acts.reshape(-1, acts.shape[-1])[kept[order]]

  def _activations(self, tokens: np.ndarray) -> np.ndarray:
    """[n, T, d] of `tokens` [n, T] in `spec.dtype`, in LM calls of exactly `spec.batch_size`
    windows (the last one padded with copies of its final window): one shape, one compilation."""
    batch, d = self.spec.batch_size, self.spec.d_model
    out = np.empty((*tokens.shape, d), shards.DTYPES[self.spec.dtype])
    for start in range(0, len(tokens), batch):
      chunk = tokens[start:start + batch]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
      acts = np.asarray(self._activation_fn(padded))
      if acts.shape != (*padded.shape, d):
        raise ValueError(f"activation_fn: expected shape {(*padded.shape, d)}, found "
                         f"{acts.shape}")
      out[start:start + len(chunk)] = acts[:len(chunk)]
    return out


def first_rows_mean_sq(groups: LMGroups, num_rows: int) -> tuple[float, int]:
  """(E||x||^2, rows used) over the first `num_rows` rows of the stream (all of them when the
  text gives fewer): the stream's normalisation sample, the same on every restart."""
  total, used, g = 0.0, 0, 0
  while used < num_rows and (group := groups.get(g)) is not None:
    x = group[:num_rows - used].astype(np.float64)
    total += float(np.sum(x * x))
    used += len(x)
    g += 1
  if used == 0:
    raise DataError(f"{groups.spec.model_id}: the text gave no complete window of "
                    f"{groups.spec.context_length} tokens (data.lm.text, data.lm.skip_windows)")
  return total / used, used


class LMStream:
  """`BatchIterator` over an `LMGroups` stream: [batch, d] rows (float32, or bfloat16 when the LM
  and the step both compute in bf16) times `scale`, placed with `sharding`. State: group, offset
  in it and batches done, plus what must match on restore."""

  def __init__(self, groups: LMGroups, batch_size: int, sharding: NamedSharding,
               scale: float = 1.0, description: dict | None = None):
    self.groups, self.batch_size, self.sharding = groups, batch_size, sharding
    self.scale, self.description = float(scale), description or {}
    self._group, self._offset, self._batches = 0, 0, 0

  def __iter__(self):
    return self

  def next_rows(self) -> np.ndarray:
    """The next batch [batch, d] unscaled, on the host; StopIteration (the state unchanged) when
    the text cannot fill it."""
    parts, need, g, offset = [], self.batch_size, self._group, self._offset
    while need:
      group = self.groups.get(g)
      if group is None:
        raise StopIteration
      part = group[offset:offset + need]
      parts.append(part)
      need -= len(part)
      offset += len(part)
      if offset == len(group):
        g, offset = g + 1, 0
    self._group, self._offset, self._batches = g, offset, self._batches + 1
    return np.concatenate(parts)

  def __next__(self) -> jax.Array:
    x = self.next_rows()
    if self.scale != 1.0:
      x *= x.dtype.type(self.scale)  # bf16: rounded once more, as the bf16 matmul would
    return jax.device_put(x, self.sharding)

  def _layout(self) -> dict:
    """What places the rows at (group, offset): must match on restore (the text is checked by its
    fingerprint). The LM, the site and the batch size may change (--allow_changes): the state
    counts rows, not batches."""
    spec = self.groups.spec
    return {"seed": self.groups.seed, "buffer_windows": self.groups.buffer_windows,
            "context_length": spec.context_length, "exclude_bos": spec.exclude_bos}

  def get_state(self) -> dict:
    return {"group": self._group, "offset": self._offset, "batches": self._batches,
            "windows_sha256": self.groups.digest(self._group) if self._offset else None,
            **self._layout()}

  def set_state(self, state: dict) -> None:
    """Restores a state of `get_state`; refuses one of another layout, or one inside a group
    whose text changed since (checked by reading that group, which comes next anyway)."""
    diff = [f"{k}: {state.get(k)!r} -> {v!r}" for k, v in self._layout().items()
            if state.get(k) != v]
    if diff:
      raise RunMismatch(f"data iterator state from another LM stream (saved -> now: "
                        f"{'; '.join(diff)}); use a new --workdir")
    g, saved = int(state["group"]), state.get("windows_sha256")
    if saved is not None:
      self.groups.get(g)
      found = self.groups.digest(g)
      if found != saved:
        raise RunMismatch(f"the token windows (text or tokenizer) changed since the checkpoint: "
                          f"window group {g} (windows {g * self.groups.buffer_windows}.. after "
                          f"skip_windows) had sha256 {saved[:12]}..., now "
                          f"{found[:12] + '...' if found else 'no windows'}"
                          "; restore the text or use a new --workdir")
    self._group, self._offset, self._batches = g, int(state["offset"]), int(state["batches"])


def _checked_spec(lm_config, model, tokenizer, dtype: str) -> harvest.HarvestSpec:
  """What is streamed (rows in `dtype` on the host), once the LM is known; refuses a layer it
  lacks or a missing BOS."""
  from gsae_jax.runs import harvesting  # the harvest's checks; runs is above data

  cfg = model.config
  bos = harvesting.checked_bos(model, tokenizer, "data.lm.", lm_config.model)
  if lm_config.layer >= cfg.n_layers:
    raise ConfigError(f"config.data.lm.layer: expected < {cfg.n_layers} (layers of "
                      f"{cfg.model_id}), found {lm_config.layer}")
  site = f"blocks.{lm_config.layer}.{lm_config.site}"
  # num_tokens and the shard fields only size harvests: a stream has no row budget.
  return harvest.HarvestSpec(
      model_id=cfg.model_id, revision=getattr(cfg, "revision", None), site=site,
      layer=lm_config.layer, d_model=int(model.site_dim(site)),
      context_length=lm_config.context_length, num_tokens=0, bos_token_id=bos, dtype=dtype,
      exclude_bos=lm_config.exclude_bos, batch_size=lm_config.batch_size)


def make_groups(data, model, tokenizer, keep_bf16: bool = False) -> LMGroups:
  """The group stream `config.data` describes, over a loaded LM; checks data.d_in against the
  site's width. With `keep_bf16` and an LM computing in bf16, rows stay bf16 (cast on the
  device; no float32 copy on the host)."""
  from gsae_jax.runs import harvesting  # text packing shared with the harvest; runs is above data

  bf16 = keep_bf16 and data.lm.model_dtype == "bfloat16"
  spec = _checked_spec(data.lm, model, tokenizer, "bfloat16" if bf16 else "float32")
  dtype = jnp.bfloat16 if bf16 else jnp.float32
  if data.d_in != spec.d_model:
    raise ConfigError(f"config.data.d_in: expected the width {spec.d_model} of {spec.site} in "
                      f"{spec.model_id}, found {data.d_in}")

  def activation_fn(tokens: np.ndarray) -> np.ndarray:
    return np.asarray(model.activations(tokens, [spec.site], dtype=dtype)[spec.site])

  return LMGroups(lambda: harvesting.text_windows(data.lm, tokenizer, spec.bos_token_id),
                  activation_fn, spec, data.buffer_windows, data.seed)


def make_lm_source(config, out: NamedSharding, lm_and_tokenizer=None):
  """`sources.BatchSource` streaming `config.data.lm`'s LM (loaded here unless given). One
  process only; the normalisation scale comes from the first `data.normalise_sample_tokens`
  rows of the stream."""
  from gsae_jax.data.sources import BatchSource
  from gsae_jax.runs import harvesting

  if jax.process_count() > 1:
    raise ConfigError(f"config.data.source='lm': streaming from the LM runs in one process, "
                      f"found {jax.process_count()}; for several processes harvest shards with "
                      "launch/harvest.py and train with data.source='shards'")
  data = config.data
  model, tokenizer = lm_and_tokenizer or harvesting.load_lm(data.lm)
  groups = make_groups(data, model, tokenizer,
                       keep_bf16=config.train.get("compute_dtype", "float32") == "bfloat16")
  spec = groups.spec
  target = resolve_target(data.normalise_target, spec.d_model)
  scale, normalisation = 1.0, None
  if target is not None:
    mean_sq, rows = first_rows_mean_sq(groups, data.normalise_sample_tokens)
    scale = scale_for_mean_sq(mean_sq, target)
    normalisation = {"mean_sq_norm": mean_sq, "target": target, "scale": scale,
                     "sample_tokens": rows}
  # What identifies the activations (source.json, the run's identity), as a manifest says it.
  description = {"model_id": spec.model_id, "revision": spec.revision, "site": spec.site,
                 "layer": spec.layer, "context_length": spec.context_length,
                 "exclude_bos": spec.exclude_bos, "bos_token_id": spec.bos_token_id,
                 "text": data.lm.text.to_dict(), "skip_windows": data.lm.skip_windows,
                 "normalisation": normalisation}
  batches = LMStream(groups, config.train.batch_size, out, scale, description)
  return BatchSource(spec.d_model, batches, scale, None)
