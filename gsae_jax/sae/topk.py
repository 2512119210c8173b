"""TopK SAE (Gao et al. 2024, arXiv 2406.04093) with the AuxK dead-latent loss.

    pi = W_enc (x - b_pre) + b_enc       z = ReLU(TopK_k(pi))       x_hat = W_dec z + b_pre
    e = sg(x - x_hat)    z_aux = ReLU(TopK_{k_aux}(pi on the dead latents))    e_hat = W_dec z_aux
    L = ||x - x_hat||^2 + alpha ||e - e_hat||^2                  (b_pre is our b_dec)
The paper's Eq. (3) prints z = TopK(W_enc (x - b_pre)), without b_enc or ReLU; its released
training code (sparse_autoencoder/train.py) and SAELens' "topk" use ReLU(TopK(. + b_enc)), which
is the default here; `eq3_literal=True` gives Eq. (3) as printed.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gsae_jax.sae import features
from gsae_jax.sae.base import (ALL, SAE, Coefficient, centered_matmul, random_unit_rows,
                               reset_where, resample_linear_pair, sum_sq)


def _order_key(values: jax.Array) -> jax.Array:
  """uint32 keys with the order of the float32 values (sign-magnitude bits made monotone)."""
  bits = jax.lax.bitcast_convert_type(values.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def top_k_mask(values: jax.Array, k: int | jax.Array, per_row: bool = True) -> jax.Array:
  """True at the k largest entries of each row of values [batch, n] (per_row) or of the whole
  array (not per_row); ties with the k-th value are kept too.

  The k-th largest key is found bit by bit from the top (32 counting passes): exact for any k,
  a traced int32 included (a k sweep's members select at their own k in one compiled step), and
  each pass is an elementwise compare and a sum, so a feature-sharded [batch, d_sae] stays
  sharded. lax.top_k instead makes XLA all-gather the rows (10-16 shard buffers measured on
  meshes (2, 4), (4, 2), (1, 8)) and, over the whole batch, sort batch x d_sae values.
  """
  key = _order_key(jax.lax.stop_gradient(values))
  axis = -1 if per_row else None

  def set_bit(i, t):
    candidate = t | (jnp.uint32(1 << 31) >> i.astype(jnp.uint32))
    count = jnp.sum(key >= (candidate[..., None] if per_row else candidate), axis=axis)
    return jnp.where(count >= k, candidate, t)

  t = jnp.zeros(values.shape[:-1] if per_row else (), jnp.uint32)
  t = jax.lax.fori_loop(0, 32, set_bit, t)
  return key >= (t[..., None] if per_row else t)


class TopKSAE(SAE):
  """TopK SAE: exactly k latents per token (fewer where fewer than k pre-activations are > 0)."""

  NAME = "topk"
  LOGICAL_AXES = {
      "W_enc": ("d_in", "features"),
      "b_enc": ("features",),
      "W_dec": ("features", "d_in"),
      "b_dec": ("d_in",),
  }
  COEFFICIENTS = (
      Coefficient("k", "k", integer=True, description="latents kept per token"),
      Coefficient("aux_k", "aux_k_coefficient", description="alpha on the AuxK loss"),
  )
  # forward: encoder, decoder, AuxK decoder (2nM each); backward: encoder dW, decoder df and dW,
  # AuxK decoder dz and dW (AuxK trains the dead latents' decoder rows too).
  FLOPS_PER_TOKEN_PER_NM = 16
  ACTIVATION_BUFFERS = 6  # fitted to XLA's memory_analysis (k ~ 5.5-6.3 on the three meshes)
  DECODER_PRODUCTS = 2    # x_hat and AuxK's e_hat
  SAELENS_ARCHITECTURE = "topk"
  SAELENS_TRAINING_ARCHITECTURE = "topk"

  @classmethod
  def aux_fields(cls) -> dict:
    """The config fields TopK, BatchTopK and Matryoshka share (Gao et al.'s values)."""
    return dict(
        k=32,                       # latents per token (the paper's GPT-2 runs use 32)
        k_aux=0,                    # dead latents in AuxK; 0: d_in // 2 (the paper: "a power of
                                    # two close to d_model / 2"); capped at d_sae
        aux_k_coefficient=1 / 32,   # alpha
    )

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        **cls.aux_fields(),
        eq3_literal=False,          # True: z = TopK(W_enc (x - b_pre)) as printed in Eq. (3): no
                                    # b_enc, no ReLU (kept values may be < 0); no SAELens export
    ))

  @classmethod
  def validate_config(cls, block, check) -> None:
    super().validate_config(block, check)
    check(float(block.k_aux) == int(block.k_aux) and block.k_aux >= 0, "k_aux",
          "an integer >= 0 (0: d_in // 2)", block.k_aux)
    if "eq3_literal" in block:  # TopK's own field (BatchTopK and Matryoshka select on ReLU(pi))
      check(isinstance(block.eq3_literal, bool), "eq3_literal", "True or False",
            block.eq3_literal)

  def __init__(self, d_in: int, d_sae: int, block=None, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    b = self.default_config() if block is None else block
    self._init_weights(d_in, d_sae, b, encoder_bias=not b.eq3_literal, rngs=rngs, dtype=dtype)

  def _init_weights(self, d_in: int, d_sae: int, b, *, encoder_bias: bool, rngs: nnx.Rngs,
                    dtype: Any) -> None:
    """Sizes from the block; the paper's init (A.1): unit-norm random decoder rows, the encoder
    their transpose, zero biases (b_pre: `sae.init_b_dec`, the paper takes a geometric median)."""
    self.k = int(b.k)
    if not 1 <= self.k <= d_sae:
      raise ValueError(f"sae.{self.NAME}.k={b.k}: expected an integer in [1, d_sae={d_sae}]")
    self.k_aux = min(int(b.k_aux) or max(d_in // 2, 1), d_sae)
    self.relu = encoder_bias  # both are absent only in Eq. (3) as printed
    w_dec = random_unit_rows(rngs.params(), d_sae, d_in, dtype)
    self.W_dec = nnx.Param(w_dec)
    self.W_enc = nnx.Param(w_dec.T)
    if encoder_bias:
      self.b_enc = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.b_dec = nnx.Param(jnp.zeros((d_in,), dtype))

  def pre_activations(self, x: jax.Array, view=ALL) -> jax.Array:
    """pi = W_enc (x - b_dec) + b_enc: [batch, d_in] -> [batch, d_sae] (the view's features)."""
    xw, b_dec_w = centered_matmul(x, self.b_dec[...], self.W_enc[...], view, "W_enc")
    return xw + (view.take(self.b_enc[...]) - b_dec_w) if self.relu else xw - b_dec_w

  def _positive(self, pi: jax.Array) -> jax.Array:
    # ReLU commutes with the selection (it only zeroes kept values that are <= 0), so selecting
    # on ReLU(pi) gives ReLU(TopK(pi)) and lets BatchTopK share the code.
    return jax.nn.relu(pi) if self.relu else pi

  def select(self, a: jax.Array, k: int | jax.Array) -> jax.Array:
    """The k largest entries of each token's a [batch, d_sae], the others zeroed."""
    return jnp.where(top_k_mask(a, k), a, 0.0)

  def encode(self, x: jax.Array) -> jax.Array:
    """z = ReLU(TopK_k(pi)) at the module's k: [batch, d_in] -> [batch, d_sae]."""
    return self.select(self._positive(self.pre_activations(x)), self.k)

  def reconstruction(self, x: jax.Array, f: jax.Array, view=ALL) -> tuple[jax.Array, jax.Array]:
    """(reconstruction loss term, x_hat): ||x - x_hat||^2."""
    x_hat = self.decode(f, view)
    return sum_sq(x - x_hat), x_hat

  def aux_loss(self, x: jax.Array, e: jax.Array, pi: jax.Array, dead: jax.Array | None,
               view=ALL) -> jax.Array:
    """||e - e_hat||^2 (A.2): the top-k_aux dead latents of each token reconstruct the main
    model's error e [batch, d_in] through W_dec without b_dec. e gets no gradient (the released
    code detaches it; the paper is silent), so AuxK trains only the dead latents (and b_dec
    through their pre-activations). `pi` is at the view's features; the sparse step gives the
    dead latents a view of their own (`dead_latents`), where pi is recomputed."""
    if dead is None:
      return jnp.zeros((), pi.dtype)
    aux = view.dead_latents(dead)
    if aux is not view:
      pi = self.pre_activations(x, aux)
    dead = aux.take(dead) & aux.valid
    a = jnp.where(dead, self._positive(pi), -jnp.inf)
    # With fewer than k_aux dead latents the k_aux-th value is -inf: `dead` keeps alive ones out.
    z_aux = jnp.where(dead & top_k_mask(a, self.k_aux), a, 0.0)
    return sum_sq(jax.lax.stop_gradient(e) - aux.decode(z_aux, self.W_dec[...]))

  def loss_terms(self, x: jax.Array, coefficients: Mapping[str, jax.Array],
                 dead: jax.Array | None = None, view=ALL):
    """({reconstruct, aux}, {f, x_hat}) at coefficients k and aux_k; in a k sweep, k is the
    member's traced value and the module's own k (the grid's largest) is unused."""
    pi = self.pre_activations(x, view)
    f = self.select(self._positive(pi), coefficients["k"])
    reconstruct, x_hat = self.reconstruction(x, f, view)
    terms = {"reconstruct": reconstruct,
             "aux": coefficients["aux_k"] * self.aux_loss(x, x - x_hat, pi, dead, view)}
    return terms, {"f": f, "x_hat": x_hat}

  def support_score(self, x, coefficients, view):
    """The selection's values: each token's support is its k largest."""
    return self._positive(self.pre_activations(x, view))

  POSITIVE_SUPPORT = False  # the k largest: found by top_k

  @classmethod
  def sparse_capacity(cls, largest_k: int) -> int:
    """k: each token's support is exactly its k largest (one more slot tells ties)."""
    return largest_k

  def slots_needed(self, top, coefficients, dead, dead_capacity):
    """k, or more where the k-th value ties later ones (top_k_mask keeps ties); ReLU zeros add
    nothing. All K + 1 slots (does not fit) if k > K or AuxK has more than dead_capacity
    dead latents."""
    k = coefficients["k"]
    slots = top.shape[-1] - 1
    kept = (top >= features.column(top, k - 1)[..., None]) & (top > 0 if self.relu else True)
    needed = jnp.max(jnp.sum(kept, axis=-1)).astype(jnp.int32)
    too_many_dead = False if dead is None else jnp.sum(dead) > dead_capacity
    return jnp.where((k > slots) | too_many_dead, slots + 1, needed)

  def reinit_features(self, dead: jax.Array, directions: jax.Array, enc_norm: jax.Array) -> None:
    resample_linear_pair(self, "W_enc", dead, directions, enc_norm)
    if self.relu:
      self.b_enc[...] = reset_where(dead, self.b_enc[...])

  def encoder_weight(self) -> jax.Array:
    return self.W_enc[...]

  @classmethod
  def to_saelens(cls, params, block):
    # SAELens "topk": ReLU(TopK((x - b_dec) W_enc + b_enc)), the default here exactly.
    if block.eq3_literal:
      raise ValueError(f"SAELens 'topk' applies ReLU after TopK; sae.{cls.NAME}.eq3_literal=True "
                       "keeps negative values: export it as .npz instead")
    tensors = {k: params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return tensors, {"k": int(block.k), "rescale_acts_by_decoder_norm": False}

  @classmethod
  def linear_params_from_saelens(cls, tensors, cfg) -> dict[str, np.ndarray]:
    """W_enc, b_enc, W_dec, b_dec; a folder trained with SAELens' rescale_acts_by_decoder_norm
    (pre-activations times ||W_dec row||) gets the norms folded in: the same codes and
    reconstructions with unit-norm decoder rows."""
    params = {k: np.asarray(tensors[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if cfg.get("rescale_acts_by_decoder_norm"):
      norms = np.linalg.norm(params["W_dec"], axis=-1)
      params["W_enc"] = params["W_enc"] * norms
      params["b_enc"] = params["b_enc"] * norms
      params["W_dec"] = params["W_dec"] / norms[:, None]
    return params

  @classmethod
  def from_saelens(cls, tensors, cfg):
    return cls.linear_params_from_saelens(tensors, cfg), {"k": int(cfg["k"]),
                                                          "eq3_literal": False}
