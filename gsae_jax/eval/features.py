"""Per-feature summaries for the feature browser, in one streaming pass: each feature's top-k
activating rows, a uniform sample of its active rows, its firing count, activation sum and a
log-spaced activation histogram. Memory is O(d_sae * k), never O(tokens).

Rows are global row indices of a shard folder; every kept row also keeps the feature's
activation on the rows around it (`BEFORE` before, `AFTER` after) so that contexts can be
coloured without encoding again.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BEFORE, AFTER = 8, 4  # context rows shown around an activating row
WIDTH = BEFORE + 1 + AFTER
# Histogram of log10(activation) in the SAE's training units: 0.1-decade bins over [1e-3, 1e3];
# values outside land in the end bins. Fixed edges because one pass cannot know each maximum.
LOG10_LO, LOG10_HI, HIST_BINS = -3.0, 3.0, 60


@dataclasses.dataclass
class Kept:
  """The k best rows per feature under some key, best first; empty slots have key -inf and
  row -1. key/value/row [d_sae, k]; context [d_sae, k, WIDTH] the feature's activations
  on rows row - BEFORE .. row + AFTER."""
  key: np.ndarray
  value: np.ndarray
  row: np.ndarray
  context: np.ndarray

  @classmethod
  def empty(cls, d_sae: int, k: int) -> Kept:
    return cls(np.full((d_sae, k), -np.inf, np.float32), np.zeros((d_sae, k), np.float32),
               np.full((d_sae, k), -1, np.int64), np.zeros((d_sae, k, WIDTH), np.float32))

  def merge(self, other: Kept) -> Kept:
    """The k best of both by key, ties to the lower row (self's rows must precede other's, as
    batches of a pass do: a stable sort then keeps the earlier row)."""
    k = self.key.shape[1]
    key = np.concatenate([self.key, other.key], axis=1)
    order = np.argsort(-key, axis=1, kind="stable")[:, :k]
    take = lambda a, b: np.take_along_axis(
        np.concatenate([a, b], axis=1), order.reshape(order.shape + (1,) * (a.ndim - 2)), axis=1)
    return Kept(take(self.key, other.key), take(self.value, other.value),
                take(self.row, other.row), take(self.context, other.context))


@dataclasses.dataclass
class FeatureStats:
  """Running per-feature summaries of a pass: `top` by activation, `sample` by a hash of
  (row, feature) (a uniform sample without replacement of the rows where it fires)."""
  top: Kept
  sample: Kept
  fire_count: np.ndarray  # [d_sae] int64
  act_sum: np.ndarray  # [d_sae] float64, sum of activations
  hist: np.ndarray  # [d_sae, HIST_BINS] int64 counts of log10(activation) of active rows
  tokens: int = 0

  @classmethod
  def empty(cls, d_sae: int, top_k: int, samples: int) -> FeatureStats:
    return cls(Kept.empty(d_sae, top_k), Kept.empty(d_sae, samples),
               np.zeros(d_sae, np.int64), np.zeros(d_sae, np.float64),
               np.zeros((d_sae, HIST_BINS), np.int64))

  def update(self, batch: dict, first_row: int, n_valid: int) -> FeatureStats:
    """Adds one batch's summary (`batch_summary_fn` output for rows first_row + [0, n_valid))."""
    b = jax.device_get(batch)
    top = Kept(b["top_value"], b["top_value"], first_row + b["top_index"].astype(np.int64),
               b["top_context"])
    sample = Kept(b["sample_key"], b["sample_value"],
                  first_row + b["sample_index"].astype(np.int64), b["sample_context"])
    return FeatureStats(self.top.merge(top), self.sample.merge(sample),
                        self.fire_count + b["fire_count"], self.act_sum + b["act_sum"],
                        self.hist + b["hist"], self.tokens + n_valid)

  def density(self) -> np.ndarray:
    return self.fire_count / max(self.tokens, 1)

  def mean_active(self) -> np.ndarray:
    """Mean activation over the rows where the feature fires (0 for a dead feature)."""
    return np.where(self.fire_count > 0, self.act_sum / np.maximum(self.fire_count, 1), 0.0)

  def max_activation(self) -> np.ndarray:
    return np.maximum(self.top.value[:, 0], 0.0)


def hash_key(rows: jax.Array, features: jax.Array) -> jax.Array:
  """A fixed pseudo-random float32 in [0, 2^24) per (row, feature) (murmur3's finaliser):
  keeping the largest keys is reservoir sampling that does not depend on how rows are batched.
  Float32 holding 24-bit integers exactly, because XLA's CPU top_k is ~40x slower on int32."""
  h = rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) ^ features.astype(jnp.uint32) * jnp.uint32(
      0x85EBCA77)
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  return ((h ^ (h >> 16)) >> 8).astype(jnp.float32)


def hist_bin(values: jax.Array) -> jax.Array:
  """The histogram bin of each activation > 0."""
  width = (LOG10_HI - LOG10_LO) / HIST_BINS
  b = jnp.floor((jnp.log10(jnp.maximum(values, 1e-30)) - LOG10_LO) / width)
  return jnp.clip(b, 0, HIST_BINS - 1).astype(jnp.int32)


def hist_edges() -> np.ndarray:
  """[HIST_BINS + 1] activation values at the bin edges."""
  return 10.0 ** np.linspace(LOG10_LO, LOG10_HI, HIST_BINS + 1)


def summarise_codes(f_ext: jax.Array, first_row: jax.Array, n_valid: jax.Array, top_k: int,
                    samples: int) -> dict:
  """One batch's per-feature summary from its codes f_ext [BEFORE + B + AFTER, d_sae]: rows
  BEFORE .. BEFORE + n_valid are the batch (global rows first_row + i), the others context."""
  batch = f_ext.shape[0] - BEFORE - AFTER
  f_t = f_ext.T  # [d_sae, rows]: top_k works on the last axis
  index = jnp.arange(batch)
  f = jnp.where(index < n_valid, f_t[:, BEFORE:BEFORE + batch], 0.0)
  active = f > 0
  d_sae = f.shape[0]

  def kept(key, k):
    key, idx = jax.lax.top_k(key, min(k, batch))  # ties: lower index first
    window = idx[:, :, None] + jnp.arange(WIDTH)  # f_ext index of row idx - BEFORE + j
    context = jnp.take_along_axis(f_t, window.reshape(d_sae, -1), axis=1).reshape(window.shape)
    return key, idx, jnp.take_along_axis(f, idx, axis=1), context

  # Inactive rows keep value 0 (top) or key -1 (sample): they rank last and read as empty slots;
  # rows past n_valid (the padded last batch) rank below them.
  top_value, top_index, _, top_context = kept(jnp.where(index < n_valid, f, -jnp.inf), top_k)
  keys = jnp.where(active, hash_key(first_row + index[None, :], jnp.arange(d_sae)[:, None]), -1.0)
  sample_key, sample_index, sample_value, sample_context = kept(keys, samples)
  # Inactive entries go past the end, where mode='drop' discards them (a negative index would
  # wrap around to the last feature's last bin).
  bins = jnp.where(active, hist_bin(f) + jnp.arange(d_sae)[:, None] * HIST_BINS,
                   d_sae * HIST_BINS)
  hist = jnp.zeros(d_sae * HIST_BINS, jnp.int32).at[bins.ravel()].add(1, mode="drop")
  return {"top_value": top_value, "top_index": top_index, "top_context": top_context,
          "sample_key": sample_key, "sample_value": sample_value, "sample_index": sample_index,
          "sample_context": sample_context, "fire_count": active.sum(axis=1),
          "act_sum": f.sum(axis=1), "hist": hist.reshape(d_sae, HIST_BINS)}


@functools.lru_cache(maxsize=None)
def batch_summary_fn(graphdef, top_k: int, samples: int):
  """jit fn(params, x_ext [BEFORE + B + AFTER, d_in] in training units, first_row, n_valid)
  -> `summarise_codes` of the SAE's codes."""
  @jax.jit
  def fn(params, x_ext, first_row, n_valid):
    return summarise_codes(nnx.merge(graphdef, params).encode(x_ext), first_row, n_valid,
                           top_k, samples)
  return fn


def context_valid(rows: np.ndarray, windows: np.ndarray, num_rows: int) -> np.ndarray:
  """[n, WIDTH] bool: the context rows (row - BEFORE .. row + AFTER) that exist and lie in the
  centre row's window. `windows` [n, WIDTH] window id of each context row (any value where the
  row does not exist)."""
  ctx_rows = rows[:, None] + np.arange(-BEFORE, AFTER + 1)
  exists = (ctx_rows >= 0) & (ctx_rows < num_rows)
  return exists & (windows == windows[:, BEFORE:BEFORE + 1])


def quantile_groups(values: np.ndarray, groups: int = 4, per_group: int = 3
                    ) -> list[tuple[float, float, np.ndarray]]:
  """Splits a uniform sample of a feature's activations (`values` [S], any order; <= 0 = empty)
  into `groups` quantile ranges of equal sample count, highest first; returns (lowest, highest
  activation, up to `per_group` indices into `values` spread over the range) per non-empty group."""
  idx = np.flatnonzero(values > 0)
  idx = idx[np.argsort(-values[idx], kind="stable")]
  out = []
  for part in np.array_split(idx, groups):
    if len(part):
      pick = part[np.unique(np.linspace(0, len(part) - 1, per_group).round().astype(int))]
      out.append((float(values[part[-1]]), float(values[part[0]]), pick))
  return out


def logit_effects(w_dec: jax.Array, w_u: jax.Array, k: int, chunk: int = 256
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Top-k promoted and suppressed tokens of each unit decoder direction through the
  unembedding: w_dec [d_sae, d_model], w_u [d_model, vocab] -> (up_ids, up_logits, down_ids,
  down_logits), each [d_sae, k]. Chunked so that [chunk, vocab] logits fit in memory."""
  @jax.jit
  def top(w):
    logits = (w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)) @ w_u
    up, up_ids = jax.lax.top_k(logits, k)
    down, down_ids = jax.lax.top_k(-logits, k)
    return up_ids, up, down_ids, -down

  parts = [jax.device_get(top(w_dec[i:i + chunk])) for i in range(0, w_dec.shape[0], chunk)]
  return tuple(np.concatenate([p[j] for p in parts]) for j in range(4))
