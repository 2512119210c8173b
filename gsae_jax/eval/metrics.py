"""Metric definitions used everywhere (training logs, eval reports, tests): GATED_SAE.md section 5.

Reconstruction metrics are computed from additive sums so that they can be accumulated over many
batches (`reconstruction_sums`, then `reconstruction_metrics`); a single batch is the same call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DENSE_THRESHOLD = 0.1


def reconstruction_sums(x: jax.Array, x_hat: jax.Array, f: jax.Array | None = None, *,
                        fire_count: jax.Array | None = None) -> dict[str, jax.Array]:
  """Additive sufficient statistics of one batch. x, x_hat [batch, d_in]; f [batch, d_sae], or
  instead its `fire_count` (the sparse step counts on its slots).

  `fire_count` [d_sae] counts the tokens on which each feature fired (L0 is its sum / tokens).
  """
  if fire_count is None:
    fire_count = jnp.sum((f > 0).astype(jnp.float32), axis=0)
  x32, xh32 = x.astype(jnp.float32), x_hat.astype(jnp.float32)
  return {
      "tokens": jnp.asarray(x.shape[0], jnp.float32),
      "sq_err": jnp.sum(jnp.square(x32 - xh32)),
      "x_sum": jnp.sum(x32, axis=0),
      "x_sq": jnp.sum(jnp.square(x32)),
      "x_hat_sq": jnp.sum(jnp.square(xh32)),
      "x_dot_x_hat": jnp.sum(x32 * xh32),
      "fire_count": fire_count,
  }


def reconstruction_metrics(s: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """L0, MSE (per element), FVU, explained variance and gamma from accumulated sums.

  FVU = E||x - x_hat||^2 / E||x - E[x]||^2; gamma = E||x_hat||^2 / E[x . x_hat].
  """
  n = s["tokens"]
  d_in = s["x_sum"].shape[-1]
  total_var = s["x_sq"] - jnp.sum(jnp.square(s["x_sum"])) / n
  fvu = s["sq_err"] / total_var
  return {
      "l0": jnp.sum(s["fire_count"]) / n,
      "mse": s["sq_err"] / (n * d_in),
      "fvu": fvu,
      "explained_variance": 1.0 - fvu,
      "gamma": s["x_hat_sq"] / s["x_dot_x_hat"],
  }


def batch_metrics(x: jax.Array, x_hat: jax.Array, f: jax.Array) -> dict[str, jax.Array]:
  """reconstruction_metrics of a single batch."""
  return reconstruction_metrics(reconstruction_sums(x, x_hat, f))


def dead_fraction(fire_counts: jax.Array) -> jax.Array:
  """Fraction of features that fired on no token of the window. fire_counts [d_sae]."""
  return jnp.mean((fire_counts == 0).astype(jnp.float32))


def dense_fraction(fire_counts: jax.Array, tokens: jax.Array,
                   threshold: float = DENSE_THRESHOLD) -> jax.Array:
  """Fraction of features that fired on more than `threshold` of the window's tokens."""
  return jnp.mean((fire_counts / tokens > threshold).astype(jnp.float32))


def mean_max_cosine(w_dec: jax.Array, true_directions: jax.Array) -> jax.Array:
  """For each true direction [m_true, d_in], the max cosine with a decoder row [d_sae, d_in];
  averaged over true directions (feature recovery on synthetic data)."""
  a = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  b = true_directions / jnp.linalg.norm(true_directions, axis=-1, keepdims=True)
  return jnp.mean(jnp.max(b @ a.T, axis=-1))


def log10_feature_density(fire_counts: jax.Array, tokens: jax.Array) -> jax.Array:
  """log10 of each feature's firing frequency (-inf for features that never fired)."""
  return jnp.log10(fire_counts / tokens)


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
  """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = the SAE costs nothing, 0 = as bad as zeros."""
  return (ce_zero - ce_sae) / (ce_zero - ce_clean)
