"""JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435), with the paper's pseudo-derivatives.

    pi(x)  = W_enc x + b_enc  (Eq. 8; `pre_encoder_bias`: W_enc (x - b_dec) + b_enc)
    theta  = exp(log_threshold)  [d_sae]
    f(x)   = JumpReLU_theta(pi) = pi * H(pi - theta)         x_hat = W_dec f + b_dec
    L      = ||x - x_hat||^2 + lambda ||f||_0,      ||f||_0 = sum_i H(pi_i - theta_i)
Backward (paper Eqs. 11-12; K(u) = 1[|u| < 1/2] the rectangle kernel, eps the bandwidth):
    d JumpReLU / d pi = H(pi - theta)     ð JumpReLU / ð theta = -(theta / eps) K((pi - theta) / eps)
    d H(pi - theta) / d pi = 0            ð H(pi - theta) / ð theta = -(1 / eps) K((pi - theta) / eps)
so the L0 term trains the thresholds alone; log_threshold's gradient is theta * dL/dtheta.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gsae_jax.sae.base import (ALL, SAE, Coefficient, centered_matmul, reset_where,
                               resample_linear_pair, sum_sq)
from gsae_jax.sae.constraints import unit_rows
from gsae_jax.sae.gate import rectangle


# The paper's two discontinuous functions of (z, theta), z [batch, d_sae] and theta [d_sae], as
# custom VJPs. Both keep (z, theta) as residuals, so the forward's pi serves both backwards.

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
  """JumpReLU_theta(z) = z * H(z - theta). Backward: the true derivative H(z - theta) w.r.t. z
  (no straight-through estimate into the encoder) and Eq. 11 w.r.t. theta."""
  return z * (z > theta).astype(z.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
  """H(z - theta). Backward: nothing w.r.t. z (the paper gives H no derivative there, so the L0
  term never reaches the encoder) and Eq. 12 w.r.t. theta."""
  return (z > theta).astype(z.dtype)


def _save_residuals(fn):
  return lambda z, theta, eps: (fn(z, theta, eps), (z, theta))


def _theta_cotangent(per_element: jax.Array, theta: jax.Array) -> jax.Array:
  """Sum over the batch axes theta was broadcast along: [batch, d_sae] -> [d_sae]."""
  return jnp.sum(per_element, axis=tuple(range(per_element.ndim - theta.ndim)))


def _jumprelu_bwd(eps, residuals, g):
  z, theta = residuals
  dz = g * (z > theta).astype(z.dtype)
  return dz, _theta_cotangent(-theta * rectangle(z - theta, eps) * g, theta)


def _step_bwd(eps, residuals, g):
  z, theta = residuals
  return None, _theta_cotangent(-rectangle(z - theta, eps) * g, theta)


jumprelu.defvjp(_save_residuals(jumprelu), _jumprelu_bwd)
step.defvjp(_save_residuals(step), _step_bwd)


class JumpReLUSAE(SAE):
  """JumpReLU SAE with an L0 penalty. Shapes as in `SAE`.

  `bandwidth` and `init_threshold` are in the paper's units, where activations have
  E||x||^2 = 1; ours have E||x||^2 = d_in (GATED_SAE.md section 4), so pre-activations are
  sqrt(d_in) times larger and the module multiplies both by sqrt(d_in).
  """

  NAME = "jumprelu"
  LOGICAL_AXES = {
      "W_enc": ("d_in", "features"),
      "b_enc": ("features",),
      "log_threshold": ("features",),
      "W_dec": ("features", "d_in"),
      "b_dec": ("d_in",),
  }
  COEFFICIENTS = (Coefficient("l0", "l0_coefficient", "l0_warmup_steps",
                              description="lambda on ||f||_0 = sum_i H(pi_i - theta_i)"),)
  FLOPS_PER_TOKEN_PER_NM = 10  # as the baseline: forward 4nM (encoder, decoder), backward 6nM
  # Fitted to XLA's memory_analysis (k ~ 4.5-4.9): pi is kept for both backwards beside f, and
  # the [batch, d_sae] threshold cotangents are materialised before their batch sums.
  ACTIVATION_BUFFERS = 5
  DECODER_PRODUCTS = 1
  SAELENS_ARCHITECTURE = "jumprelu"
  SAELENS_TRAINING_ARCHITECTURE = "jumprelu"
  SUPPORT_BIAS = "b_enc"
  # The loss does not need it (it is invariant to scaling a decoder row up and its encoder
  # column, b_enc entry and threshold down), but unit rows fix the scale in which the bandwidth
  # and the thresholds are measured.
  UNIT_NORM_DECODER = True

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        l0_coefficient=1.0,         # lambda on normalised activations (E||x||^2 = d_in): the
                                    # paper's lambda (E||x||^2 = 1) times d_in
        l0_warmup_steps=10_000,     # the paper's linear lambda warm-up from 0
        bandwidth=0.001,            # epsilon of K, paper units (x sqrt(d_in) here)
        init_threshold=0.001,       # theta at init and resampling, paper units (x sqrt(d_in))
        pre_encoder_bias=False,     # False: the paper's Eq. 8, pi = W_enc x + b_enc; True:
                                    # pi = W_enc (x - b_dec) + b_enc (its code's use_pre_enc_bias)
    ))

  @classmethod
  def validate_config(cls, block, check) -> None:
    super().validate_config(block, check)
    check(np.isfinite(block.bandwidth) and block.bandwidth > 0, "bandwidth", "a finite number > 0",
          block.bandwidth)
    check(np.isfinite(block.init_threshold) and block.init_threshold > 0, "init_threshold",
          "a finite number > 0 (theta is log-parameterised)", block.init_threshold)
    check(isinstance(block.pre_encoder_bias, bool), "pre_encoder_bias", "True or False",
          block.pre_encoder_bias)

  def __init__(self, d_in: int, d_sae: int, block=None, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    b = self.default_config() if block is None else block
    units = math.sqrt(d_in)  # the paper's E||x||^2 = 1 -> our E||x||^2 = d_in
    self.bandwidth = float(b.bandwidth) * units
    self.init_log_threshold = math.log(float(b.init_threshold) * units)
    self.pre_encoder_bias = bool(b.pre_encoder_bias)
    # The paper's (and Gemma Scope's) init: He-uniform decoder rows rescaled to unit norm (the
    # uniform's scale cancels), W_enc = W_dec^T (untied later), zero biases, theta = init.
    w_dec = unit_rows(jax.random.uniform(rngs.params(), (d_sae, d_in), jnp.float32, -1.0, 1.0))
    w_dec = w_dec.astype(dtype)
    self.W_dec = nnx.Param(w_dec)
    self.W_enc = nnx.Param(w_dec.T)
    self.b_enc = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.log_threshold = nnx.Param(jnp.full((d_sae,), self.init_log_threshold, dtype))
    self.b_dec = nnx.Param(jnp.zeros((d_in,), dtype))

  def pre_activations(self, x: jax.Array, view=ALL) -> jax.Array:
    """pi(x): [batch, d_in] -> [batch, d_sae] (the view's features)."""
    if not self.pre_encoder_bias:
      return view.encoder(x, self.W_enc[...], "W_enc") + view.take(self.b_enc[...])
    xw, b_dec_w = centered_matmul(x, self.b_dec[...], self.W_enc[...], view, "W_enc")
    return xw + (view.take(self.b_enc[...]) - b_dec_w)

  def threshold(self) -> jax.Array:
    """theta = exp(log_threshold) [d_sae]: log-parameterised so that it stays positive."""
    return jnp.exp(self.log_threshold[...])

  def encode(self, x: jax.Array) -> jax.Array:
    """f(x) = pi * H(pi - theta): [batch, d_in] -> [batch, d_sae]."""
    return jumprelu(self.pre_activations(x), self.threshold(), self.bandwidth)

  def support_score(self, x, coefficients, view):
    """pi - theta + eps: f is non-zero where pi > theta and the pseudo-derivatives (Eqs. 11-12)
    where |pi - theta| < eps / 2 (eps rather than eps / 2: a margin against rounding at the
    kernel's edge)."""
    return self.pre_activations(x, view) - self.threshold() + self.bandwidth

  def loss_terms(self, x: jax.Array, coefficients: Mapping[str, jax.Array],
                 dead: jax.Array | None = None, view=ALL):
    """({reconstruct, sparsity}, {f, x_hat})."""
    pi = self.pre_activations(x, view)
    theta = view.take(self.threshold())
    f = jumprelu(pi, theta, self.bandwidth)
    x_hat = self.decode(f, view)
    l0 = jnp.sum(step(pi, theta, self.bandwidth), axis=-1)  # ||f||_0, trains theta alone
    terms = {
        "reconstruct": sum_sq(x - x_hat),
        "sparsity": coefficients["l0"] * jnp.mean(l0),
    }
    return terms, {"f": f, "x_hat": x_hat}

  def reinit_features(self, dead: jax.Array, directions: jax.Array, enc_norm: jax.Array) -> None:
    resample_linear_pair(self, "W_enc", dead, directions, enc_norm)
    self.b_enc[...] = reset_where(dead, self.b_enc[...])
    self.log_threshold[...] = reset_where(dead, self.log_threshold[...], self.init_log_threshold)

  def encoder_weight(self) -> jax.Array:
    return self.W_enc[...]

  @classmethod
  def to_saelens(cls, params, block):
    b_enc = np.asarray(params["b_enc"])
    if not block.pre_encoder_bias:  # SAELens subtracts b_dec before W_enc: add b_dec W_enc back
      b_enc = b_enc + np.asarray(params["b_dec"]) @ np.asarray(params["W_enc"])
    threshold = np.exp(np.asarray(params["log_threshold"], np.float64))
    return {"W_enc": params["W_enc"], "b_enc": b_enc, "W_dec": params["W_dec"],
            "b_dec": params["b_dec"], "threshold": threshold}, {}

  @classmethod
  def from_saelens(cls, tensors, cfg):
    # SAELens encodes ReLU(pi) * 1[pi > theta]: equal to pi * H(pi - theta) only for theta > 0,
    # which is also the only threshold log_threshold can hold.
    threshold = np.asarray(tensors["threshold"])
    bad = threshold <= 0
    if np.any(bad):
      raise ValueError(
          f"SAELens JumpReLU tensor 'threshold' (sae_weights.safetensors): expected every value "
          f"> 0 (gsae_jax trains log(threshold)), found {int(bad.sum())} of {threshold.size} "
          f"values <= 0 (min {float(threshold.min()):g})")
    params = {k: np.asarray(tensors[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    params["log_threshold"] = np.log(threshold.astype(np.float64)).astype(threshold.dtype)
    # load_saelens accepts only apply_b_dec_to_input=true folders (b_dec is subtracted first).
    # A folder we exported from the paper's Eq. 8 form says so in its metadata: unfold b_enc.
    ours = ((cfg.get("metadata") or {}).get("gsae_jax_architecture_config") or {})
    pre_encoder_bias = bool(ours.get("pre_encoder_bias", True))
    if not pre_encoder_bias:
      params["b_enc"] = (params["b_enc"].astype(np.float64)
                         - params["b_dec"].astype(np.float64) @ params["W_enc"].astype(np.float64)
                         ).astype(params["b_enc"].dtype)
    return params, {"pre_encoder_bias": pre_encoder_bias}
