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

from typing import Mapping

import jax
import jax.numpy as jnp

_IN_BOUNDS = "promise_in_bounds"  # indices come from top_k / nonzero: no bounds checks


class AllFeatures:
  """Every feature: per-feature arrays are [batch, d_sae] (or [d_sae] for parameters).

  `products` (optional) holds encoder products already computed, by weight name (the sparse
  step's dense fallback reuses the product its support search made).
  """

  valid = True

  def __init__(self, products: Mapping[str, jax.Array] | None = None):
    self.products = dict(products or {})

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    if name in self.products:
      return _cached_product(x, w, self.products[name])
    return x @ w

  def take(self, v: jax.Array) -> jax.Array:
    return v

  def decode(self, f: jax.Array, w_dec: jax.Array) -> jax.Array:
    return f @ w_dec

  def group_decodes(self, f: jax.Array, w_dec: jax.Array, bounds) -> jax.Array:
    return jnp.stack([f[:, lo:hi] @ w_dec[lo:hi] for lo, hi in zip(bounds, bounds[1:])])

  def fire_count(self, f: jax.Array) -> jax.Array:
    return jnp.sum((f > 0).astype(jnp.float32), axis=0)

  def dead_latents(self, dead: jax.Array) -> "AllFeatures":
    return self


ALL = AllFeatures()


class Recorder(AllFeatures):
  """AllFeatures that keeps each encoder product it computes (the support search's products)."""

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    self.products[name] = x @ w
    return self.products[name]


class TokenSlots:
  """Each token's K active features: idx [batch, K] distinct feature indices."""

  valid = True

  def __init__(self, idx: jax.Array, d_sae: int, products: Mapping[str, jax.Array],
               dead_capacity: int):
    self.idx, self.d_sae, self.products = idx, d_sae, dict(products)
    self.dead_capacity = dead_capacity

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    return _slot_product(x, w, self.products[name], self.idx)

  def take(self, v: jax.Array) -> jax.Array:
    return v.at[self.idx].get(mode=_IN_BOUNDS)

  def decode(self, f: jax.Array, w_dec: jax.Array) -> jax.Array:
    # Autodiff gives the decoder gradient as a scatter-add of the [batch, K, d_in] rows f * dx_hat.
    return jnp.einsum("bk,bkn->bn", f, w_dec.at[self.idx].get(mode=_IN_BOUNDS))

  def group_decodes(self, f: jax.Array, w_dec: jax.Array, bounds) -> jax.Array:
    rows = w_dec.at[self.idx].get(mode=_IN_BOUNDS)  # one gather for every group
    groups = jnp.stack([(self.idx >= lo) & (self.idx < hi) for lo, hi in zip(bounds, bounds[1:])])
    return jnp.einsum("gbk,bkn->gbn", jnp.where(groups, f, 0.0), rows)

  def fire_count(self, f: jax.Array) -> jax.Array:
    fired = (f > 0).astype(jnp.float32).reshape(-1)
    return jnp.zeros((self.d_sae,), jnp.float32).at[self.idx.reshape(-1)].add(fired, mode=_IN_BOUNDS)

  def dead_latents(self, dead: jax.Array) -> "Columns":
    return Columns.of(dead, self.dead_capacity)


class Columns:
  """The same D features for every token (AuxK's dead latents): per-feature arrays [batch, D].

  Built from a [d_sae] mask with a fixed capacity; slots past the mask's count hold feature 0
  and are marked invalid by `valid` [D]. The sparse step falls back to dense when the mask has
  more than `capacity` features, so no feature is ever dropped.
  """

  def __init__(self, idx: jax.Array, valid: jax.Array):
    self.idx, self.valid = idx, valid

  @classmethod
  def of(cls, mask: jax.Array, capacity: int) -> "Columns":
    (idx,) = jnp.nonzero(mask, size=capacity, fill_value=0)
    return cls(idx, jnp.arange(capacity) < jnp.sum(mask))

  def encoder(self, x: jax.Array, w: jax.Array, name: str) -> jax.Array:
    return x @ w.at[:, self.idx].get(mode=_IN_BOUNDS)

  def take(self, v: jax.Array) -> jax.Array:
    return v.at[self.idx].get(mode=_IN_BOUNDS)

  def decode(self, f: jax.Array, w_dec: jax.Array) -> jax.Array:
    return f @ w_dec.at[self.idx].get(mode=_IN_BOUNDS)


# ------------------------------------------------------------------- products with a known value

@jax.custom_vjp
def _cached_product(x: jax.Array, w: jax.Array, xw: jax.Array) -> jax.Array:
  """x @ w [batch, d_sae] whose value `xw` was computed before (outside the differentiated
  function); the backward is the matmul's."""
  return xw


def _cached_product_fwd(x, w, xw):
  return xw, (x, w)


def _cached_product_bwd(residuals, g):
  x, w = residuals
  return g @ w.T, x.T @ g, None


_cached_product.defvjp(_cached_product_fwd, _cached_product_bwd)


@jax.custom_vjp
def _slot_product(x: jax.Array, w: jax.Array, xw: jax.Array, idx: jax.Array) -> jax.Array:
  """(x @ w) at each token's slots: [batch, K], read from the dense product xw [batch, d_sae].

  Backward: dw[:, idx[b, k]] += x[b] g[b, k] as a scatter-add of [batch K, d_in] rows into
  dw^T (rows are contiguous there), and dx[b] = sum_k g[b, k] w[:, idx[b, k]].
  """
  return jnp.take_along_axis(xw, idx, axis=1)


def _slot_product_fwd(x, w, xw, idx):
  return _slot_product(x, w, xw, idx), (x, w, idx)


def _slot_product_bwd(residuals, g):
  x, w, idx = residuals
  d_in, d_sae = w.shape
  rows = (g[..., None] * x[:, None, :]).reshape(-1, d_in)
  dw_t = jnp.zeros((d_sae, d_in), w.dtype).at[idx.reshape(-1)].add(rows, mode=_IN_BOUNDS)
  dx = jnp.einsum("bk,bkn->bn", g, w.T.at[idx].get(mode=_IN_BOUNDS))
  return dx, dw_t.T.astype(w.dtype), None, None


_slot_product.defvjp(_slot_product_fwd, _slot_product_bwd)


def slots(score: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """(top [batch, capacity + 1] sorted scores, idx [batch, capacity]) of each token: the
  capacity highest-scoring features, and one more score to tell whether the support fits.

  Read `top` with whole-array operations (`column`, `last`): XLA:CPU turns a top_k whose values
  are sliced into a full sort (5 s instead of 0.08 s at [4096, 10240]).
  """
  top, idx = jax.lax.top_k(score, capacity + 1)
  return top, idx[:, :capacity]


def column(top: jax.Array, i: jax.Array | int) -> jax.Array:
  """top[:, i] ([batch]) for a possibly traced i, as a masked sum (see `slots`)."""
  return jnp.sum(jnp.where(jnp.arange(top.shape[-1]) == i, top, 0), axis=-1)


def last(top: jax.Array) -> jax.Array:
  """The (K + 1)-th score of each token: the smallest of its sorted top ([batch])."""
  return jnp.min(top, axis=-1)
