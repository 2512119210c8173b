"""Metric definitions used everywhere (training logs, eval reports, tests): GATED_SAE.md section 5.

Reconstruction metrics are computed from additive sums so that they can be accumulated over many
batches (`reconstruction_sums`, then `reconstruction_metrics`); a single batch is the same call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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

  FVU = E||x - x_hat||^2 / E||x - E[x]||^2 over all tokens and dimensions; explained variance
  = 1 - FVU (SAELens' pooled `explained_variance`); gamma = E||x_hat||^2 /
  E[x . x_hat].
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


def token_sums(x: jax.Array, x_hat: jax.Array, f: jax.Array) -> dict[str, jax.Array]:
  """Additive sums of per-token quantities (SAELens' / SAEBench's per-token means), for
  evaluation only. x, x_hat [batch, d_in]; f [batch, d_sae].

  explained variance per token (SAELens' `explained_variance_legacy`):
  1 - ||x_t - x_hat_t||^2 / ||x_t - mean_batch(x)||^2; it depends on the batch through the mean,
  which is why `reconstruction_metrics`' pooled `explained_variance` is the headline number.
  """
  x32, xh32 = x.astype(jnp.float32), x_hat.astype(jnp.float32)
  norm_in = jnp.linalg.norm(x32, axis=-1)
  norm_out = jnp.linalg.norm(xh32, axis=-1)
  centred_sq = jnp.sum(jnp.square(x32 - jnp.mean(x32, axis=0)), axis=-1)
  err_sq = jnp.sum(jnp.square(x32 - xh32), axis=-1)
  # SAELens guards the ratio the same way: a near-zero input counts its output norm as the ratio.
  ratio = norm_out / jnp.where(norm_in < 1e-4, 1.0, norm_in)
  tiny = jnp.finfo(jnp.float32).tiny
  return {
      "tokens": jnp.asarray(x.shape[0], jnp.float32),
      "l2_norm_in": jnp.sum(norm_in),
      "l2_norm_out": jnp.sum(norm_out),
      "l2_ratio": jnp.sum(ratio),
      "cossim": jnp.sum(jnp.sum(x32 * xh32, axis=-1) / jnp.maximum(norm_in * norm_out, tiny)),
      "explained_variance_per_token": jnp.sum(1.0 - err_sq / jnp.maximum(centred_sq, tiny)),
      "l1": jnp.sum(jnp.abs(f.astype(jnp.float32))),
  }


def token_metrics(s: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means over tokens of `token_sums` (accumulated over batches)."""
  return {k: v / s["tokens"] for k, v in s.items() if k != "tokens"}


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


def max_cosine_to_others(w: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """[features]: each row of `w` [features, d]'s largest cosine similarity with any other row
  (SAEBench's `calculate_max_cosine_sim`), in chunks of rows: never a [features, features]
  matrix."""
  unit = np.asarray(w, np.float64)
  unit = unit / np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-30)
  out = np.empty(len(unit))
  for lo in range(0, len(unit), chunk):
    sims = unit[lo:lo + chunk] @ unit.T
    rows = np.arange(sims.shape[0])
    sims[rows, lo + rows] = -np.inf  # not with itself
    out[lo:lo + chunk] = sims.max(axis=1)
  return out


def log10_feature_density(fire_counts: jax.Array, tokens: jax.Array) -> jax.Array:
  """log10 of each feature's firing frequency (-inf for features that never fired)."""
  return jnp.log10(fire_counts / tokens)


def loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
  """(CE_zero - CE_sae) / (CE_zero - CE_clean): 1 = the SAE costs nothing, 0 = as bad as zeros."""
  return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_div_score(kl_sae: float, kl_ablation: float) -> float:
  """(KL_ablation - KL_sae) / KL_ablation (SAELens' `kl_div_score`): 1 = the spliced LM predicts
  the clean distribution, 0 = as far from it as with the site zero-ablated."""
  return (kl_ablation - kl_sae) / kl_ablation
