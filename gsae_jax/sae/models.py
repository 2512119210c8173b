"""Gated SAE and the ReLU-L1 baseline as Flax NNX modules (GATED_SAE.md sections 1-2).

Storage layout follows SAELens: encoder weights are [d_in, d_sae] (the paper's W_gate / W_enc
transposed) and the decoder is W_dec [d_sae, d_in], so decoder "columns" of the paper are rows
here. Every parameter's logical axes are listed in `LOGICAL_AXES`; `gsae_jax.sharding` maps them
to mesh axes. Training splits a module to a pure dict with `nnx.split` and rebuilds it inside jit
with `nnx.merge`, so all methods are pure functions of (params, inputs).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gsae_jax.sae.gate import GATE_BACKWARD_MODES, heaviside

ARCHITECTURES = ("gated", "baseline")


def random_unit_rows(key: jax.Array, rows: int, cols: int, dtype=jnp.float32) -> jax.Array:
  """[rows, cols] Gaussian matrix with each row scaled to unit L2 norm."""
  w = jax.random.normal(key, (rows, cols), jnp.float32)
  return (w / jnp.linalg.norm(w, axis=-1, keepdims=True)).astype(dtype)


def centered_matmul(x: jax.Array, b_dec: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(x - b_dec) @ w split as (x @ w, b_dec @ w): [batch, d_sae] and [d_sae].

  Folding b_dec @ w into the per-feature biases gives the same value, but b_dec's gradient becomes
  a [d_sae] x [d_sae, d_in] product instead of a [batch, d_sae] x [d_sae, d_in] matmul (2 n M
  FLOPs per token saved) and no centred [batch, d_in] copy of x is made.
  """
  return x @ w, b_dec @ w


def _sum_sq(v: jax.Array) -> jax.Array:
  """Batch mean of the per-token squared L2 norm: [batch, d] -> scalar."""
  return jnp.mean(jnp.sum(jnp.square(v), axis=-1))


class GatedSAE(nnx.Module):
  """Gated SAE. Shapes: x [batch, d_in], f [batch, d_sae].

  Switches (paper ablations): `tie_r_mag=False` gives a separate W_mag [d_in, d_sae];
  `frozen_aux_decoder=False` lets L_aux train W_dec and b_dec.
  """

  LOGICAL_AXES = {
      "W_gate": ("d_in", "features"),
      "W_mag": ("d_in", "features"),
      "r_mag": ("features",),
      "b_gate": ("features",),
      "b_mag": ("features",),
      "W_dec": ("features", "d_in"),
      "b_dec": ("d_in",),
  }

  def __init__(self, d_in: int, d_sae: int, *, rngs: nnx.Rngs, gate_backward: str = "zero",
               gate_eps: float = 1.0, gate_clip: bool = False, tie_r_mag: bool = True,
               frozen_aux_decoder: bool = True, dtype: Any = jnp.float32):
    if gate_backward not in GATE_BACKWARD_MODES:
      raise ValueError(f"sae.gate_backward={gate_backward!r}: expected one of {GATE_BACKWARD_MODES}")
    self.gate_backward, self.gate_eps, self.gate_clip = gate_backward, gate_eps, gate_clip
    self.tie_r_mag, self.frozen_aux_decoder = tie_r_mag, frozen_aux_decoder
    w_dec = random_unit_rows(rngs.params(), d_sae, d_in, dtype)
    self.W_dec = nnx.Param(w_dec)
    self.W_gate = nnx.Param(w_dec.T)
    if tie_r_mag:
      self.r_mag = nnx.Param(jnp.zeros((d_sae,), dtype))
    else:
      self.W_mag = nnx.Param(w_dec.T)
    self.b_gate = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.b_mag = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.b_dec = nnx.Param(jnp.zeros((d_in,), dtype))

  def pre_activations(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(pi_gate, pi_mag), each [batch, d_sae]; one shared matmul when r_mag is tied."""
    xw, b_dec_w = centered_matmul(x, self.b_dec[...], self.W_gate[...])
    pi_gate = xw + (self.b_gate[...] - b_dec_w)
    if self.tie_r_mag:
      scale = jnp.exp(self.r_mag[...])
      pi_mag = scale * xw + (self.b_mag[...] - scale * b_dec_w)
    else:
      xw_mag, b_dec_w_mag = centered_matmul(x, self.b_dec[...], self.W_mag[...])
      pi_mag = xw_mag + (self.b_mag[...] - b_dec_w_mag)
    return pi_gate, pi_mag

  def _features(self, pi_gate: jax.Array, pi_mag: jax.Array) -> jax.Array:
    f_gate = heaviside(pi_gate, self.gate_backward, self.gate_eps, self.gate_clip)
    return f_gate * jax.nn.relu(pi_mag)

  def encode(self, x: jax.Array) -> jax.Array:
    """f(x) = H(pi_gate) * ReLU(pi_mag): [batch, d_in] -> [batch, d_sae]."""
    return self._features(*self.pre_activations(x))

  def decode(self, f: jax.Array) -> jax.Array:
    """x_hat = f W_dec + b_dec: [batch, d_sae] -> [batch, d_in]."""
    return f @ self.W_dec[...] + self.b_dec[...]

  def loss_terms(self, x: jax.Array, l1_coefficient: jax.Array | float):
    """Returns ({reconstruct, sparsity, aux}, {f, x_hat}); each term a batch mean of per-token sums."""
    pi_gate, pi_mag = self.pre_activations(x)
    f = self._features(pi_gate, pi_mag)
    x_hat = self.decode(f)
    relu_gate = jax.nn.relu(pi_gate)
    w_dec, b_dec = self.W_dec[...], self.b_dec[...]
    if self.frozen_aux_decoder:
      w_dec, b_dec = jax.lax.stop_gradient(w_dec), jax.lax.stop_gradient(b_dec)
    x_hat_aux = relu_gate @ w_dec + b_dec
    terms = {
        "reconstruct": _sum_sq(x - x_hat),
        "sparsity": l1_coefficient * jnp.mean(jnp.sum(relu_gate, axis=-1)),
        "aux": _sum_sq(x - x_hat_aux),
    }
    return terms, {"f": f, "x_hat": x_hat}

  def reinit_features(self, dead: jax.Array, directions: jax.Array, enc_norm: jax.Array) -> None:
    """Resampling (Bricken et al. 2023): dead features get decoder row = direction [d_sae, d_in],
    encoder column = direction * enc_norm, biases and r_mag reset to 0."""
    col = dead[None, :]
    self.W_dec[...] = jnp.where(dead[:, None], directions, self.W_dec[...])
    self.W_gate[...] = jnp.where(col, directions.T * enc_norm, self.W_gate[...])
    if self.tie_r_mag:
      self.r_mag[...] = jnp.where(dead, 0.0, self.r_mag[...])
    else:
      self.W_mag[...] = jnp.where(col, directions.T * enc_norm, self.W_mag[...])
    self.b_gate[...] = jnp.where(dead, 0.0, self.b_gate[...])
    self.b_mag[...] = jnp.where(dead, 0.0, self.b_mag[...])

  def encoder_weight(self) -> jax.Array:
    """The [d_in, d_sae] matrix whose column norms resampling uses."""
    return self.W_gate[...]


class BaselineSAE(nnx.Module):
  """ReLU SAE with L1 penalty (GATED_SAE.md section 1). Shapes as in GatedSAE."""

  LOGICAL_AXES = {
      "W_enc": ("d_in", "features"),
      "b_enc": ("features",),
      "W_dec": ("features", "d_in"),
      "b_dec": ("d_in",),
  }

  def __init__(self, d_in: int, d_sae: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
    w_dec = random_unit_rows(rngs.params(), d_sae, d_in, dtype)
    self.W_dec = nnx.Param(w_dec)
    self.W_enc = nnx.Param(w_dec.T)
    self.b_enc = nnx.Param(jnp.zeros((d_sae,), dtype))
    self.b_dec = nnx.Param(jnp.zeros((d_in,), dtype))

  def encode(self, x: jax.Array) -> jax.Array:
    """f(x) = ReLU(W_enc (x - b_dec) + b_enc): [batch, d_in] -> [batch, d_sae]."""
    xw, b_dec_w = centered_matmul(x, self.b_dec[...], self.W_enc[...])
    return jax.nn.relu(xw + (self.b_enc[...] - b_dec_w))

  def decode(self, f: jax.Array) -> jax.Array:
    """x_hat = f W_dec + b_dec."""
    return f @ self.W_dec[...] + self.b_dec[...]

  def loss_terms(self, x: jax.Array, l1_coefficient: jax.Array | float):
    """Returns ({reconstruct, sparsity}, {f, x_hat})."""
    f = self.encode(x)
    x_hat = self.decode(f)
    terms = {
        "reconstruct": _sum_sq(x - x_hat),
        "sparsity": l1_coefficient * jnp.mean(jnp.sum(f, axis=-1)),
    }
    return terms, {"f": f, "x_hat": x_hat}

  def reinit_features(self, dead: jax.Array, directions: jax.Array, enc_norm: jax.Array) -> None:
    """Resampling: see GatedSAE.reinit_features."""
    self.W_dec[...] = jnp.where(dead[:, None], directions, self.W_dec[...])
    self.W_enc[...] = jnp.where(dead[None, :], directions.T * enc_norm, self.W_enc[...])
    self.b_enc[...] = jnp.where(dead, 0.0, self.b_enc[...])

  def encoder_weight(self) -> jax.Array:
    return self.W_enc[...]


def build_sae(sae_config, d_in: int, seed: int):
  """Builds the architecture named by `sae_config.architecture` (an ml_collections ConfigDict)."""
  rngs = nnx.Rngs(params=seed)
  dtype = jnp.dtype(sae_config.param_dtype)
  if sae_config.architecture == "gated":
    return GatedSAE(d_in, sae_config.d_sae, rngs=rngs, gate_backward=sae_config.gate_backward,
                    gate_eps=sae_config.gate_eps, gate_clip=sae_config.gate_clip,
                    tie_r_mag=sae_config.tie_r_mag, frozen_aux_decoder=sae_config.frozen_aux_decoder,
                    dtype=dtype)
  if sae_config.architecture == "baseline":
    return BaselineSAE(d_in, sae_config.d_sae, rngs=rngs, dtype=dtype)
  raise ValueError(f"sae.architecture={sae_config.architecture!r}: expected one of {ARCHITECTURES}")
