"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014; GATED_SAE.md section 2).

    pi_gate = W_gate (x - b_dec) + b_gate        f_gate = H(pi_gate)
    pi_mag  = exp(r_mag) * W_gate (x - b_dec) + b_mag
    f       = f_gate * ReLU(pi_mag)              x_hat = W_dec f + b_dec
    L = ||x - x_hat||^2 + lambda ||ReLU(pi_gate)||_1 + ||x - x_hat_frozen(ReLU(pi_gate))||^2
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
from gsae_jax.sae.gate import GATE_BACKWARD_MODES, heaviside


class GatedSAE(SAE):
  """Gated SAE. Switches (paper ablations): `tie_r_mag=False` gives a separate W_mag
  [d_in, d_sae]; `frozen_aux_decoder=False` lets L_aux train W_dec and b_dec."""

  NAME = "gated"
  LOGICAL_AXES = {
      "W_gate": ("d_in", "features"),
      "W_mag": ("d_in", "features"),
      "r_mag": ("features",),
      "b_gate": ("features",),
      "b_mag": ("features",),
      "W_dec": ("features", "d_in"),
      "b_dec": ("d_in",),
  }
  COEFFICIENTS = (Coefficient("l1", "l1_coefficient", "l1_warmup_steps",
                              description="lambda on ||ReLU(pi_gate)||_1"),)
  # forward: encoder, decoder, aux decoder; backward: encoder dW, decoder dW and df, aux df.
  FLOPS_PER_TOKEN_PER_NM = 14
  # Fitted to XLA's memory_analysis (k ~ 3.8: gate and magnitude paths, two decoder products).
  ACTIVATION_BUFFERS = 4
  DECODER_PRODUCTS = 2  # x_hat, and L_aux's x_hat_frozen
  SAELENS_ARCHITECTURE = "gated"
  SAELENS_TRAINING_ARCHITECTURE = "gated"
  SUPPORT_BIAS = "b_gate"

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        l1_coefficient=1.0,         # lambda (on normalised activations, E||x||^2 = d_in)
        l1_warmup_steps=0,          # linear lambda warm-up from 0
        gate_backward="zero",       # 'zero' (paper) | 'straight_through' | 'rectangle'
        gate_eps=1.0,               # rectangle bandwidth
        gate_clip=False,            # straight_through: clip to |z| <= 1
        tie_r_mag=True,             # ablation: False gives a separate W_mag
        frozen_aux_decoder=True,    # ablation: False lets L_aux train W_dec, b_dec
    ))

  @classmethod
  def validate_config(cls, block, check) -> None:
    super().validate_config(block, check)
    check(block.gate_backward in GATE_BACKWARD_MODES, "gate_backward",
          f"one of {GATE_BACKWARD_MODES}", block.gate_backward)
    check(block.gate_eps > 0, "gate_eps", "> 0", block.gate_eps)

  def __init__(self, d_in: int, d_sae: int, block=None, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    b = self.default_config() if block is None else block
    if b.gate_backward not in GATE_BACKWARD_MODES:
      raise ValueError(f"sae.gated.gate_backward={b.gate_backward!r}: expected one of "
                       f"{GATE_BACKWARD_MODES}")
    self.gate_backward, self.gate_eps, self.gate_clip = b.gate_backward, b.gate_eps, b.gate_clip
    self.tie_r_mag, self.frozen_aux_decoder = b.tie_r_mag, b.frozen_aux_decoder
    w_dec = random_unit_rows(rngs.params(), d_sae, d_in, dtype)
    self.W_dec = nnx.Param(w_dec)
    self.W_gate = nnx.Param(w_dec.T)
    if self.tie_r_mag:
      self.r_mag = nnx.Param(jnp.zeros((d_sae,), dtype))
    else:
      self.W_mag = nnx.Param(w_dec.T)
    self.b_gate = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.b_mag = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.b_dec = nnx.Param(jnp.zeros((d_in,), dtype))

  def pre_activations(self, x: jax.Array, view=ALL) -> tuple[jax.Array, jax.Array]:
    """(pi_gate, pi_mag), each [batch, d_sae] (the view's features); one shared matmul when
    r_mag is tied."""
    xw, b_dec_w = centered_matmul(x, self.b_dec[...], self.W_gate[...], view, "W_gate")
    pi_gate = xw + (view.take(self.b_gate[...]) - b_dec_w)
    if self.tie_r_mag:
      scale = view.take(jnp.exp(self.r_mag[...]))
      pi_mag = scale * xw + (view.take(self.b_mag[...]) - scale * b_dec_w)
    else:
      xw_mag, b_dec_w_mag = centered_matmul(x, self.b_dec[...], self.W_mag[...], view, "W_mag")
      pi_mag = xw_mag + (view.take(self.b_mag[...]) - b_dec_w_mag)
    return pi_gate, pi_mag

  def _features(self, pi_gate: jax.Array, pi_mag: jax.Array) -> jax.Array:
    f_gate = heaviside(pi_gate, self.gate_backward, self.gate_eps, self.gate_clip)
    return f_gate * jax.nn.relu(pi_mag)

  def encode(self, x: jax.Array) -> jax.Array:
    """f(x) = H(pi_gate) * ReLU(pi_mag): [batch, d_in] -> [batch, d_sae]."""
    return self._features(*self.pre_activations(x))

  def loss_terms(self, x: jax.Array, coefficients: Mapping[str, jax.Array],
                 dead: jax.Array | None = None, view=ALL):
    """({reconstruct, sparsity, aux}, {f, x_hat}); each term a batch mean of per-token sums."""
    pi_gate, pi_mag = self.pre_activations(x, view)
    f = self._features(pi_gate, pi_mag)
    x_hat = self.decode(f, view)
    relu_gate = jax.nn.relu(pi_gate)
    w_dec, b_dec = self.W_dec[...], self.b_dec[...]
    if self.frozen_aux_decoder:  # the paper: L_aux trains the gate only, never the decoder
      w_dec, b_dec = jax.lax.stop_gradient(w_dec), jax.lax.stop_gradient(b_dec)
    x_hat_aux = view.decode(relu_gate, w_dec) + b_dec
    terms = {
        "reconstruct": sum_sq(x - x_hat),
        "sparsity": coefficients["l1"] * jnp.mean(jnp.sum(relu_gate, axis=-1)),
        "aux": sum_sq(x - x_hat_aux),
    }
    return terms, {"f": f, "x_hat": x_hat}

  def support_score(self, x, coefficients, view):
    """pi_gate: f, ReLU(pi_gate) and their gradients vanish where pi_gate <= 0 (the paper's
    zero gate backward); the rectangle backward reaches eps/2 below (the score adds eps, a
    margin against rounding at the kernel's edge); straight-through reaches every feature, so
    it has no sparse step."""
    if self.gate_backward == "straight_through":
      return None
    pi_gate = self.pre_activations(x, view)[0]
    return pi_gate + self.gate_eps if self.gate_backward == "rectangle" else pi_gate

  def reinit_features(self, dead: jax.Array, directions: jax.Array, enc_norm: jax.Array) -> None:
    resample_linear_pair(self, "W_gate", dead, directions, enc_norm)
    if self.tie_r_mag:
      self.r_mag[...] = reset_where(dead, self.r_mag[...])
    else:
      self.W_mag[...] = jnp.where(dead[None, :], directions.T * enc_norm, self.W_mag[...])
    self.b_gate[...] = reset_where(dead, self.b_gate[...])
    self.b_mag[...] = reset_where(dead, self.b_mag[...])

  def encoder_weight(self) -> jax.Array:
    return self.W_gate[...]

  @classmethod
  def to_saelens(cls, params, block):
    if "W_mag" in params:
      raise ValueError("SAELens has no Gated SAE with an untied W_mag (sae.gated.tie_r_mag=False); "
                       "export it as .npz instead")
    tensors = {"W_enc": params["W_gate"], "W_dec": params["W_dec"], "b_dec": params["b_dec"],
               "b_gate": params["b_gate"], "b_mag": params["b_mag"], "r_mag": params["r_mag"]}
    return tensors, {}

  @classmethod
  def from_saelens(cls, tensors, cfg):
    params = {"W_gate": tensors["W_enc"], "r_mag": tensors["r_mag"], "b_gate": tensors["b_gate"],
              "b_mag": tensors["b_mag"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
    return {k: np.asarray(v) for k, v in params.items()}, {"tie_r_mag": True}
