"""Where an SAE's per-feature quantities live: every feature (dense) or each token's active slots.

An architecture writes its loss once against a *feature view*; the dense train step passes
`AllFeatures()` ([batch, d_sae] arrays) and the sparse step passes `TokenSlots`, where each token
carries K feature indices (its support, found by `lax.top_k` on the architecture's
`support_score`) and every per-feature array is [batch, K]. The encoder product's values are taken
from the dense product the support was found with (so the two paths compute the same numbers),
and in the backward pass the decoder, the encoder-weight gradient and every per-feature gradient
touch only the K slots of each token: gathers and scatter-adds of O(batch K d_in), instead of the
[batch, d_sae] x [d_sae, d_in] products of the dense path.

A view's methods:
  encoder(x, w, name)  x @ w at the view's features ([batch, F]); `name` keys the cached product
  take(v)              a per-feature vector [d_sae] at the view's features
  decode(f, w_dec)     sum over the view's features of f * W_dec rows: [batch, d_in]
  group_decodes(f, w_dec, bounds)  the partial decodes of feature ranges [lo, hi) (Matryoshka)
  fire_count(f)        [d_sae] count of tokens with f > 0
  dead_latents(dead)   the view of the `dead` features (AuxK), with `valid` marking real slots
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp

from gsae_jax.kernels import rows

_IN_BOUNDS = "promise_in_bounds"  # indices come from top_k / nonzero: no bounds checks


class _Precision:
  """Matmuls in `compute_dtype` (e.g. bfloat16) with float32 results; None: the inputs' dtype."""

  def __init__(self, compute_dtype=None):
    self.compute_dtype = compute_dtype

  def cast(self, a: jax.Array) -> jax.Array:
    return a if self.compute_dtype is None else a.astype(self.compute_dtype)

  def matmul(self, a: jax.Array, b: jax.Array) -> jax.Array:
    if self.compute_dtype is None:
      return a @ b
    return jnp.matmul(self.cast(a), self.cast(b), preferred_element_type=jnp.float32)

  def einsum(self, spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    if self.compute_dtype is None:
      return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, self.cast(a), self.cast(b), preferred_element_type=jnp.float32)


class AllFeatures(_Precision):
  """Every feature: per-feature arrays are [batch, d_sae] (or [d_sae] for parameters).

  `products` (optional) holds encoder products already computed, by weight name (the sparse
  step's dense fallback reuses the product its support search made).
  """

  valid = True

  def __init__(self, products: Mapping[str, jax.Array] | None = None, compute_dtype=None):
    super().__init__(compute_dtype)
    self.products = dict(products or {})

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    if name in self.products:
      return _cached_product(self.cast(x), self.cast(w), self.products[name])
    return self.matmul(x, w)

  def take(self, v: jax.Array) -> jax.Array:
    return v

  def decode(self, f: jax.Array, w_dec: jax.Array) -> jax.Array:
    return self.matmul(f, w_dec)

  def group_decodes(self, f: jax.Array, w_dec: jax.Array, bounds) -> jax.Array:
    return jnp.stack([self.matmul(f[:, lo:hi], w_dec[lo:hi])
                      for lo, hi in zip(bounds, bounds[1:])])

  def fire_count(self, f: jax.Array) -> jax.Array:
    return jnp.sum((f > 0).astype(jnp.float32), axis=0)

  def dead_latents(self, dead: jax.Array) -> "AllFeatures":
    return self


ALL = AllFeatures()


class Recorder(AllFeatures):
  """AllFeatures that keeps each encoder product it computes (the support search's products)."""

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    self.products[name] = self.matmul(x, w)
    return self.products[name]


class SparseCodes(AllFeatures):
  """All features, but `decode` reads only each token's non-zero codes (the CPU row kernels)
  when every token of the batch has at most `slots` of them, and is the dense product otherwise
  (a `lax.cond`): evaluation's decode of a trained SAE's sparse codes, not differentiated.
  Dense wherever the kernels cannot run (not CPU, bf16) or `slots` is over 1/16 of the
  dictionary. (On a multi-device mesh XLA gathers the kernel's operands to each device.)"""

  def __init__(self, slots: int = 256):
    super().__init__()
    self.slots = slots

  def decode(self, f: jax.Array, w_dec: jax.Array) -> jax.Array:
    if (f.dtype not in (jnp.float32, jnp.float64) or w_dec.dtype != f.dtype
        or 16 * self.slots > f.shape[-1] or not rows.available()):
      return super().decode(f, w_dec)
    idx, count = rows.positive_slots(jnp.abs(f), self.slots)  # then padding where f = 0
    return jax.lax.cond(jnp.max(count) <= self.slots,
                        lambda: rows.bag(jnp.take_along_axis(f, idx, axis=1), idx, w_dec),
                        lambda: f @ w_dec)


class TokenSlots(_Precision):
  """Each token's K active features: idx [batch, K] distinct feature indices."""

  valid = True

  def __init__(self, idx: jax.Array, d_sae: int, products: Mapping[str, jax.Array],
               dead_capacity: int, compute_dtype=None, kernels: bool = False):
    super().__init__(compute_dtype)
    self.idx, self.d_sae, self.products = idx, d_sae, dict(products)
    self.dead_capacity = dead_capacity
    # `gsae_jax.kernels.rows` for the row gathers and scatter-adds (CPU, float32/64 matmuls)
    self.kernels = kernels and compute_dtype is None

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    return _slot_product(self.cast(x), self.cast(w), self.products[name], self.idx, self.kernels)

  def take(self, v: jax.Array) -> jax.Array:
    return v.at[self.idx].get(mode=_IN_BOUNDS)

  def decode(self, f: jax.Array, w_dec: jax.Array) -> jax.Array:
    if self.kernels:
      return rows.bag(f, self.idx, w_dec)
    # Autodiff gives the decoder gradient as a scatter-add of the [batch, K, d_in] rows f * dx_hat.
    return self.einsum("bk,bkn->bn", f, self.cast(w_dec).at[self.idx].get(mode=_IN_BOUNDS))

  def group_decodes(self, f: jax.Array, w_dec: jax.Array, bounds) -> jax.Array:
    groups = [(self.idx >= lo) & (self.idx < hi) for lo, hi in zip(bounds, bounds[1:])]
    if self.kernels:  # each bag skips the other groups' (zeroed) slots
      return jnp.stack([rows.bag(jnp.where(g, f, 0.0), self.idx, w_dec) for g in groups])
    w_rows = self.cast(w_dec).at[self.idx].get(mode=_IN_BOUNDS)  # one gather for every group
    return self.einsum("gbk,bkn->gbn", jnp.where(jnp.stack(groups), f, 0.0), w_rows)

  def fire_count(self, f: jax.Array) -> jax.Array:
    fired = (f > 0).astype(jnp.float32).reshape(-1)
    counts = jnp.zeros((self.d_sae,), jnp.float32)
    return counts.at[self.idx.reshape(-1)].add(fired, mode=_IN_BOUNDS)

  def dead_latents(self, dead: jax.Array) -> "Columns":
    return Columns.of(dead, self.dead_capacity, self.compute_dtype)


class Columns(_Precision):
  """The same D features for every token (AuxK's dead latents): per-feature arrays [batch, D].

  Built from a [d_sae] mask with a fixed capacity; slots past the mask's count hold feature 0
  and are marked invalid by `valid` [D]. The sparse step falls back to dense when the mask has
  more than `capacity` features, so no feature is ever dropped.
  """

  def __init__(self, idx: jax.Array, valid: jax.Array, compute_dtype=None):
    super().__init__(compute_dtype)
    self.idx, self.valid = idx, valid

  @classmethod
  def of(cls, mask: jax.Array, capacity: int, compute_dtype=None) -> "Columns":
    (idx,) = jnp.nonzero(mask, size=capacity, fill_value=0)
    return cls(idx, jnp.arange(capacity) < jnp.sum(mask), compute_dtype)

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    return self.matmul(x, w.at[:, self.idx].get(mode=_IN_BOUNDS))

  def take(self, v: jax.Array) -> jax.Array:
    return v.at[self.idx].get(mode=_IN_BOUNDS)

  def decode(self, f: jax.Array, w_dec: jax.Array) -> jax.Array:
    return self.matmul(f, w_dec.at[self.idx].get(mode=_IN_BOUNDS))


# ------------------------------------------------------------------- products with a known value

@jax.custom_vjp
def _cached_product(x: jax.Array, w: jax.Array, xw: jax.Array) -> jax.Array:
  """x @ w [batch, d_sae] whose value `xw` was computed before (outside the differentiated
  function); the backward is the matmul's."""
  return xw


def _cached_product_fwd(x, w, xw):
  return xw, (x, w)


def _cached_product_bwd(residuals, g):
  x, w = residuals  # in the compute dtype; products accumulate in float32
  g = g.astype(x.dtype)
  dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.matmul(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
  return dx, dw, None


_cached_product.defvjp(_cached_product_fwd, _cached_product_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _slot_product(x: jax.Array, w: jax.Array, xw: jax.Array, idx: jax.Array,
                  kernels: bool = False) -> jax.Array:
  """(x @ w) at each token's slots: [batch, K], read from the dense product xw [batch, d_sae].

  Backward: dw[:, idx[b, k]] += x[b] g[b, k] as a scatter-add of [batch K, d_in] rows into
  dw^T (rows are contiguous there), and dx[b] = sum_k g[b, k] w[:, idx[b, k]]; with `kernels`,
  by `gsae_jax.kernels.rows` (no [batch, K, d_in] temporaries).
  """
  return jnp.take_along_axis(xw, idx, axis=1)


def _slot_product_fwd(x, w, xw, idx, kernels):
  return _slot_product(x, w, xw, idx, kernels), (x, w, idx)


def _slot_product_bwd(kernels, residuals, g):
  x, w, idx = residuals  # x, w in the compute dtype; the scatter-add accumulates in float32
  d_in, d_sae = w.shape
  if kernels:  # float32 / float64 throughout (TokenSlots turns kernels off for bf16)
    g = g.astype(w.dtype)
    return rows.bag(g, idx, w.T), rows.scatter(g, idx, x, d_sae).T, None, None
  g = g.astype(jnp.float32)
  xg = (g[..., None] * x[:, None, :].astype(jnp.float32)).reshape(-1, d_in)
  dw_t = jnp.zeros((d_sae, d_in), jnp.float32).at[idx.reshape(-1)].add(xg, mode=_IN_BOUNDS)
  dx = jnp.einsum("bk,bkn->bn", g.astype(x.dtype), w.T.at[idx].get(mode=_IN_BOUNDS),
                  preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw_t.T.astype(w.dtype), None, None


_slot_product.defvjp(_slot_product_fwd, _slot_product_bwd)


def slots(score: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """(top, idx), each [batch, capacity + 1]: each token's capacity + 1 highest scores, sorted,
  and their features. `SAE.slots_needed(top, ...)` says how many leading slots hold every
  token's support (capacity + 1: they do not fit).

  Neither output is sliced here, and `top` is read with whole-array operations (`column`):
  XLA:CPU turned a top_k with sliced outputs into a full sort (6 s instead of 0.3 s at
  [4096, 10240]); the train step slices `idx` in its own jitted computation.
  """
  return jax.lax.top_k(score, capacity + 1)


def column(top: jax.Array, i: jax.Array | int) -> jax.Array:
  """top[:, i] ([batch]) for a possibly traced i, as a masked sum (see `slots`)."""
  return jnp.sum(jnp.where(jnp.arange(top.shape[-1]) == i, top, 0), axis=-1)
