"""ReLU SAE with an L1 penalty, the Gated paper's baseline (GATED_SAE.md section 1).

    f = ReLU(W_enc (x - b_dec) + b_enc)      x_hat = W_dec f + b_dec
    L = ||x - x_hat||^2 + lambda ||f||_1
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gsae_jax.sae.base import (ALL, SAE, Coefficient, centered_matmul, random_unit_rows,
                               reset_where, resample_linear_pair, sum_sq)


class BaselineSAE(SAE):
  """ReLU SAE with L1 penalty. Shapes as in `SAE`."""

  NAME = "baseline"
  LOGICAL_AXES = {
      "W_enc": ("d_in", "features"),
      "b_enc": ("features",),
      "W_dec": ("features", "d_in"),
      "b_dec": ("d_in",),
  }
  COEFFICIENTS = (Coefficient("l1", "l1_coefficient", "l1_warmup_steps",
                              description="lambda on ||f||_1"),)
  FLOPS_PER_TOKEN_PER_NM = 10  # forward 4nM (encoder, decoder), backward 6nM
  ACTIVATION_BUFFERS = 3       # fitted to XLA's memory_analysis (k ~ 2.8)
  DECODER_PRODUCTS = 1
  SAELENS_ARCHITECTURE = "standard"
  SAELENS_TRAINING_ARCHITECTURE = "standard"
  SUPPORT_BIAS = "b_enc"

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        l1_coefficient=1.0,         # lambda (on normalised activations, E||x||^2 = d_in)
        l1_warmup_steps=0,          # linear lambda warm-up from 0
    ))

  def __init__(self, d_in: int, d_sae: int, block=None, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    del block  # no architecture-specific construction options
    w_dec = random_unit_rows(rngs.params(), d_sae, d_in, dtype)
    self.W_dec = nnx.Param(w_dec)
    self.W_enc = nnx.Param(w_dec.T)
    self.b_enc = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.b_dec = nnx.Param(jnp.zeros((d_in,), dtype))

  def pre_activations(self, x: jax.Array, view=ALL) -> jax.Array:
    """pi = W_enc (x - b_dec) + b_enc: [batch, d_in] -> [batch, d_sae] (the view's features)."""
    xw, b_dec_w = centered_matmul(x, self.b_dec[...], self.W_enc[...], view, "W_enc")
    return xw + (view.take(self.b_enc[...]) - b_dec_w)

  def encode(self, x: jax.Array, view=ALL) -> jax.Array:
    """f(x) = ReLU(W_enc (x - b_dec) + b_enc): [batch, d_in] -> [batch, d_sae]."""
    return jax.nn.relu(self.pre_activations(x, view))

  def support_score(self, x, coefficients, view):
    """pi: ReLU's value and gradient vanish where pi <= 0."""
    return self.pre_activations(x, view)

  def loss_terms(self, x: jax.Array, coefficients: Mapping[str, jax.Array],
                 dead: jax.Array | None = None, view=ALL):
    """({reconstruct, sparsity}, {f, x_hat})."""
    f = self.encode(x, view)
    x_hat = self.decode(f, view)
    terms = {
        "reconstruct": sum_sq(x - x_hat),
        "sparsity": coefficients["l1"] * jnp.mean(jnp.sum(f, axis=-1)),
    }
    return terms, {"f": f, "x_hat": x_hat}

  def reinit_features(self, dead: jax.Array, directions: jax.Array, enc_norm: jax.Array) -> None:
    resample_linear_pair(self, "W_enc", dead, directions, enc_norm)
    self.b_enc[...] = reset_where(dead, self.b_enc[...])

  def encoder_weight(self) -> jax.Array:
    return self.W_enc[...]

  @classmethod
  def to_saelens(cls, params, block):
    return {k: params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, {}

  @classmethod
  def from_saelens(cls, tensors, cfg):
    return {k: np.asarray(tensors[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}, {}
