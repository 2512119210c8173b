"""The interface every SAE architecture declares, and the math helpers they share.

An architecture is one module under `gsae_jax/sae/` holding one `SAE` subclass plus a line in
`gsae_jax/sae/registry.py`. The class states, next to its equations, everything the rest of the
framework asks of it: its config block and defaults, its named loss coefficients, the logical
axes of its parameters (sharding), its cost (FLOPs per token, `[batch, d_sae]` buffers: the
plan and the benchmarks), its SAELens name and parameter mapping (export / import) and how
resampling re-initialises a feature. Nothing outside the module names an architecture.

Storage layout follows SAELens: encoder weights are [d_in, d_sae] (the papers' W_enc
transposed) and the decoder is W_dec [d_sae, d_in], so the papers' decoder "columns" are rows.
Training splits a module into a pure dict (`nnx.split` + `nnx.to_pure_dict`) and rebuilds it
inside jit with `nnx.merge`, so every method is a pure function of (params, inputs).
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gsae_jax.sae.features import ALL, AllFeatures

Check = Any  # callable(ok: bool, field: str, expected: str, found) raising ValueError


@dataclasses.dataclass(frozen=True)
class Coefficient:
  """A named scalar of an architecture's loss that a sweep may vary.

  `field` is its value's field in the architecture's config block; `warmup_field` (optional) a
  field holding the steps of a linear warm-up from 0. `integer` coefficients (TopK's k) are
  swept by selecting at the grid's largest value and masking per member.
  """
  name: str
  field: str
  warmup_field: str | None = None
  integer: bool = False
  description: str = ""


class Statistic(nnx.Variable):
  """A non-trained quantity estimated during training (e.g. BatchTopK's inference threshold).

  It lives beside the parameters (checkpointed, exported, sharded by LOGICAL_AXES) but gets no
  gradient: `SAE.update_statistics` sets it after each optimiser step.
  """


class SAE(nnx.Module):
  """Abstract sparse autoencoder. Shapes: x [batch, d_in], f [batch, d_sae].

  Subclasses set the class attributes below, take `__init__(d_in, d_sae, block, *, rngs, dtype)`
  and implement the abstract methods (nnx.Module's metaclass is an ABCMeta: a subclass missing
  one cannot be instantiated, so it fails at `describe`, before any training).
  """

  NAME: ClassVar[str]
  # Logical axes per parameter ('d_in', 'features'); `gsae_jax.sharding` maps them to the mesh.
  LOGICAL_AXES: ClassVar[dict[str, tuple[str, ...]]]
  COEFFICIENTS: ClassVar[tuple[Coefficient, ...]]
  # Dense train step FLOPs per token in units of n*M (forward + backward), for benchmarks.
  FLOPS_PER_TOKEN_PER_NM: ClassVar[int]
  # [batch, d_sae] buffers alive at the peak of one train step (plan.py), and the number of
  # f @ W_dec products per step (each a 'model'-axis all-reduce when features are sharded).
  ACTIVATION_BUFFERS: ClassVar[int]
  DECODER_PRODUCTS: ClassVar[int]
  # The `architecture` of the SAELens folder this SAE exports to; None: no SAELens equivalent.
  SAELENS_ARCHITECTURE: ClassVar[str | None]
  # SAELens' training class with the same loss (`sae_lens.registry`; benchmarks time it beside
  # ours); None: SAELens trains no such SAE.
  SAELENS_TRAINING_ARCHITECTURE: ClassVar[str | None] = None
  # Decoder rows kept at unit norm by the optimiser (gradient projection + renormalisation).
  UNIT_NORM_DECODER: ClassVar[bool] = True
  # The per-feature bias added to `support_score` (benchmarks and tests set a state's L0 with
  # it); None where L0 is a coefficient (TopK's k).
  SUPPORT_BIAS: ClassVar[str | None] = None
  # The loss is a mean over tokens of per-token terms, so a batch may be processed in parts
  # (`train.batch_chunks`); False for losses that select over the whole batch (BatchTopK).
  TOKENWISE_LOSS: ClassVar[bool] = True

  # --- config -------------------------------------------------------------------------
  @classmethod
  @abc.abstractmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The architecture's config block (`config.sae.<NAME>`) with its defaults."""

  @classmethod
  def validate_config(cls, block, check: Check) -> None:
    """Checks the block's fields with `check(ok, field, expected, found)` (field names are
    relative to the block). The default checks every coefficient and warm-up field."""
    for c in cls.COEFFICIENTS:
      value = block[c.field]
      if c.integer:
        check(float(value) == int(value) and value >= 1, c.field, "an integer >= 1", value)
      else:
        check(np.isfinite(value) and value >= 0, c.field, "a finite number >= 0", value)
      if c.warmup_field:
        check(block[c.warmup_field] >= 0, c.warmup_field, ">= 0", block[c.warmup_field])

  @classmethod
  def with_coefficient_bound(cls, block, name: str, largest: float):
    """The block to build a sweep's modules from when coefficient `name` goes up to `largest`
    (integer coefficients are static sizes, e.g. top_k's k: they are set to the grid's max)."""
    coef = cls.coefficient(name)
    if not coef.integer:
      return block
    block = block.copy_and_resolve_references()
    block[coef.field] = int(largest)
    return block

  @classmethod
  def coefficient(cls, name: str) -> Coefficient:
    for c in cls.COEFFICIENTS:
      if c.name == name:
        return c
    raise ValueError(f"{cls.NAME} SAE has no coefficient {name!r}; "
                     f"expected one of {[c.name for c in cls.COEFFICIENTS]}")

  # --- math ---------------------------------------------------------------------------
  @abc.abstractmethod
  def encode(self, x: jax.Array) -> jax.Array:
    """Inference codes f(x): [batch, d_in] -> [batch, d_sae]."""

  def decode(self, f: jax.Array, view=ALL) -> jax.Array:
    """x_hat = f W_dec + b_dec: [batch, d_sae] (or the view's [batch, K]) -> [batch, d_in]."""
    return view.decode(f, self.W_dec[...]) + self.b_dec[...]

  @abc.abstractmethod
  def loss_terms(self, x: jax.Array, coefficients: Mapping[str, jax.Array],
                 dead: jax.Array | None = None, view=ALL):
    """Training forward: ({term: scalar}, {'f': codes, 'x_hat': reconstruction, ...}).

    Each term is a batch mean of per-token sums; the loss is their sum. `coefficients` maps
    every name in COEFFICIENTS to its (possibly traced, warmed-up) value. `dead` [d_sae] bool
    marks the features that fired on no token of the last `train.feature_window_tokens`
    (for dead-latent losses such as TopK's AuxK; None outside training). `view`
    (`gsae_jax.sae.features`) says which features the per-feature arrays hold: all of them, or
    each token's active slots in the sparse step, where 'f' is [batch, K].
    """

  # --- the sparse step (gsae_jax.sae.features) ------------------------------------------
  def support_score(self, x: jax.Array, coefficients: Mapping[str, jax.Array],
                    view: AllFeatures) -> jax.Array | None:
    """[batch, d_sae] scores whose positive entries contain, for each token, every feature
    with a non-zero value or gradient in `loss_terms` (computed through `view`, which keeps
    the encoder products for the step to reuse); None: no sparse step (the default)."""
    return None

  @classmethod
  def sparse_capacity(cls, largest_k: int) -> int:
    """Default slots per token on the sparse path (`train.sparse_capacity=0`), given the run's
    largest integer coefficient (0 if none): 128, since a trained SAE's per-token L0 varies
    (max 72 at mean 32 in the benchmark's state) and an overflowing step runs dense."""
    return 128

  # The support is exactly {support_score > 0} and `slots_needed` is the default below, so the
  # sparse step may find it by compaction (`kernels.rows.positive_slots`) instead of a top-k.
  POSITIVE_SUPPORT = True

  def slots_needed(self, top: jax.Array, coefficients: Mapping[str, jax.Array],
                   dead: jax.Array | None, dead_capacity: int) -> jax.Array:
    """How many leading slots hold every token's support (int32 []): `top` [batch, K + 1]
    holds each token's K + 1 highest scores, sorted (read it with whole-array operations, see
    `features.slots`). K + 1 means the K slots miss part of some support. The default: the
    largest count of positive scores."""
    return jnp.max(jnp.sum(top > 0, axis=-1)).astype(jnp.int32)

  def update_statistics(self, out: Mapping[str, jax.Array]) -> None:
    """After an optimiser step: update `Statistic` variables from loss_terms' outputs."""

  # --- resampling (Bricken et al. 2023) ------------------------------------------------
  @abc.abstractmethod
  def reinit_features(self, dead: jax.Array, directions: jax.Array, enc_norm: jax.Array) -> None:
    """Dead features [d_sae] get decoder row = direction [d_sae, d_in], encoder column =
    direction * enc_norm, and their per-feature parameters reset to initial values."""

  @abc.abstractmethod
  def encoder_weight(self) -> jax.Array:
    """The [d_in, d_sae] matrix whose column norms resampling uses."""

  # --- SAELens interop -----------------------------------------------------------------
  # An architecture with a SAELens equivalent overrides both; the defaults refuse.
  @classmethod
  def to_saelens(cls, params: Mapping[str, np.ndarray], block) -> tuple[dict, dict]:
    """(tensors, extra cfg.json fields) of the SAELens folder; params act on raw activations."""
    raise ValueError(f"SAELens has no {cls.NAME} SAE; export it as .npz instead")

  @classmethod
  def from_saelens(cls, tensors: Mapping[str, np.ndarray], cfg: Mapping) -> tuple[dict, dict]:
    """(params in our names, block overrides) from a SAELens folder's tensors and cfg.json."""
    raise ValueError(f"gsae_jax's {cls.NAME} SAE has no SAELens equivalent to import")


# ----------------------------------------------------------------------------- shared math

def random_unit_rows(key: jax.Array, rows: int, cols: int, dtype=jnp.float32) -> jax.Array:
  """[rows, cols] Gaussian matrix with each row scaled to unit L2 norm."""
  w = jax.random.normal(key, (rows, cols), jnp.float32)
  return (w / jnp.linalg.norm(w, axis=-1, keepdims=True)).astype(dtype)


def centered_matmul(x: jax.Array, b_dec: jax.Array, w: jax.Array, view=None,
                    name: str = "") -> tuple[jax.Array, jax.Array]:
  """(x - b_dec) @ w split as (x @ w, b_dec @ w): [batch, d_sae] and [d_sae], both at the
  view's features (weight `name`; see `gsae_jax.sae.features`).

  Folding b_dec @ w into the per-feature biases gives the same value, but b_dec's gradient becomes
  a [d_sae] x [d_sae, d_in] product instead of a [batch, d_sae] x [d_sae, d_in] matmul (2 n M
  FLOPs per token saved) and no centred [batch, d_in] copy of x is made.
  """
  view = ALL if view is None else view
  return view.encoder(x, w, name), view.take(b_dec @ w)


def sum_sq(v: jax.Array) -> jax.Array:
  """Batch mean of the per-token squared L2 norm: [batch, d] -> scalar."""
  return jnp.mean(jnp.sum(jnp.square(v), axis=-1))


def reset_where(dead: jax.Array, value: jax.Array, to: float | jax.Array = 0.0) -> jax.Array:
  """`value` [d_sae] with the dead features set to `to`."""
  return jnp.where(dead, to, value)


def resample_linear_pair(sae: SAE, encoder: str, dead: jax.Array, directions: jax.Array,
                         enc_norm: jax.Array) -> None:
  """The common part of resampling: decoder rows and the `encoder` weight's columns of the dead
  features are set from `directions` [d_sae, d_in]."""
  sae.W_dec[...] = jnp.where(dead[:, None], directions, sae.W_dec[...])
  w = getattr(sae, encoder)
  w[...] = jnp.where(dead[None, :], directions.T * enc_norm, w[...])
