"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, arXiv 2412.06410): TopK over the whole batch.

Training keeps the B k largest activations of the batch X [B, d_sae], so a token may use more or
fewer than k latents:
    a = ReLU(W_enc (x - b_dec) + b_enc)     f = a * 1[a >= the (B k)-th largest entry of a]
    L = ||x - x_hat||^2 + alpha ||e - e_hat||^2          (AuxK as in `gsae_jax.sae.topk`)
Inference uses one threshold theta estimated during training (a JumpReLU):
    f(x) = pi * 1[pi > theta],   theta = E_B[ min{ f_ij(B) | f_ij(B) > 0 } ]
The paper states the average over batches; we take an exponential moving average with rate
`threshold_rate` (the authors' code: 0.01), started at the first batch's value rather than
at 0 so that short runs are not biased low.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from gsae_jax.sae.base import Statistic
from gsae_jax.sae.features import ALL
from gsae_jax.sae.topk import TopKSAE, top_k_mask


class BatchTopKSAE(TopKSAE):
  """BatchTopK SAE: k latents per token on average over each training batch."""

  NAME = "batchtopk"
  LOGICAL_AXES = {**TopKSAE.LOGICAL_AXES, "threshold": ()}
  ACTIVATION_BUFFERS = 7  # fitted to XLA's memory_analysis (k ~ 6.6-7.3 on the three meshes)
  # SAELens stores BatchTopK SAEs as JumpReLU with theta broadcast to every feature.
  SAELENS_ARCHITECTURE = "jumprelu"
  SAELENS_TRAINING_ARCHITECTURE = "batchtopk"
  TOKENWISE_LOSS = False  # the B k largest of the whole batch

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        **cls.aux_fields(),
        threshold_rate=0.01,        # EMA rate of theta's estimate (the authors' code)
    ))

  @classmethod
  def validate_config(cls, block, check) -> None:
    super().validate_config(block, check)
    check(0 < block.threshold_rate <= 1, "threshold_rate", "a number in (0, 1]",
          block.threshold_rate)

  def __init__(self, d_in: int, d_sae: int, block=None, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    b = self.default_config() if block is None else block
    self._init_weights(d_in, d_sae, b, encoder_bias=True, rngs=rngs, dtype=dtype)
    self.threshold_rate = float(b.threshold_rate)
    # float32 whatever the parameter dtype: an EMA with rate 0.01 needs the mantissa.
    self.threshold = Statistic(jnp.zeros((), jnp.float32))  # 0: not estimated yet

  def select(self, a: jax.Array, k: int | jax.Array) -> jax.Array:
    """The B k largest entries of the whole batch a [B, d_sae], the others zeroed."""
    return jnp.where(top_k_mask(a, a.shape[0] * k, per_row=False), a, 0.0)

  def encode(self, x: jax.Array) -> jax.Array:
    """Inference: f = ReLU(pi) * 1[pi > theta] (SAELens' JumpReLU; = pi 1[pi > theta] as
    theta >= 0): [batch, d_in] -> [batch, d_sae]; independent of the other tokens."""
    pi = self.pre_activations(x)
    return jnp.where(pi > self.threshold[...], jax.nn.relu(pi), 0.0)

  def loss_terms(self, x, coefficients, dead=None, view=ALL):
    """As TopK's, with the batch's smallest kept activation (`min_kept`, inf if none) for the
    threshold estimate."""
    terms, out = super().loss_terms(x, coefficients, dead, view)
    f = jax.lax.stop_gradient(out["f"])
    out["min_kept"] = jnp.min(jnp.where(f > 0, f, jnp.inf)).astype(jnp.float32)
    return terms, out

  @classmethod
  def sparse_capacity(cls, largest_k: int) -> int:
    """Tokens keep k latents only on average: 128 slots, or 2 k if more."""
    return max(128, 2 * largest_k)

  def slots_needed(self, top, coefficients, dead, dead_capacity):
    """The largest count of a token's values at or above the batch's threshold, found among
    the K slots (it is the true threshold exactly when nothing is missed: then no (K + 1)-th
    value reaches it); AuxK's dead latents as TopK's."""
    slots = top.shape[-1] - 1
    candidates = jnp.where(jnp.arange(slots + 1) < slots, top, -jnp.inf)
    kept = top_k_mask(candidates, top.shape[0] * coefficients["k"], per_row=False)
    threshold = jnp.min(jnp.where(kept, candidates, jnp.inf))
    needed = jnp.max(jnp.sum((top >= threshold) & (top > 0), axis=-1)).astype(jnp.int32)
    too_many_dead = False if dead is None else jnp.sum(dead) > dead_capacity
    return jnp.where(too_many_dead, slots + 1, needed)

  def update_statistics(self, out) -> None:
    """theta <- theta + rate (min_kept - theta); the first estimate is min_kept itself; a batch
    with no positive activation leaves theta unchanged."""
    m, theta = out["min_kept"], self.threshold[...]
    estimate = jnp.where(theta > 0, theta + self.threshold_rate * (m - theta), m)
    self.threshold[...] = jnp.where(jnp.isfinite(m), estimate, theta)

  @classmethod
  def to_saelens(cls, params, block):
    tensors = {k: params[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    d_sae = np.shape(params["W_dec"])[0]
    tensors["threshold"] = np.full((d_sae,), np.asarray(params["threshold"]), np.float32)
    return tensors, {}

  @classmethod
  def from_saelens(cls, tensors, cfg):
    threshold = np.asarray(tensors["threshold"])
    if threshold.min() != threshold.max():
      meta = cfg.get("metadata") or {}
      raise ValueError(
          f"SAELens folder of {meta.get('model_name', '?')} {meta.get('hook_name', '?')}: tensor "
          f"'threshold' varies across features (min {float(threshold.min()):g}, max "
          f"{float(threshold.max()):g}): it is a per-feature threshold, a JumpReLU SAE, not a "
          f"{cls.NAME} one (one theta for all features); load it as 'jumprelu'")
    params = cls.linear_params_from_saelens(tensors, cfg)
    params["threshold"] = np.asarray(threshold.flat[0], np.float32)
    return params, {}
