"""Activation normalisation (GATED_SAE.md section 4): one scale so that E||x||^2 = target."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalisation_scale(sample: jax.Array, target_sq_norm: float | None) -> float:
  """Scale c with E||c x||_2^2 = target over `sample` [tokens, d_in]; 1.0 when target is None."""
  if target_sq_norm is None:
    return 1.0
  mean_sq = float(jnp.mean(jnp.sum(jnp.square(sample.astype(jnp.float32)), axis=-1)))
  return scale_for_mean_sq(mean_sq, target_sq_norm)


def scale_for_mean_sq(mean_sq: float, target_sq_norm: float | None) -> float:
  """sqrt(target / E||x||^2), the one normalisation formula; 1.0 when target is None."""
  if target_sq_norm is None:
    return 1.0
  if not mean_sq > 0:
    raise ValueError(f"cannot normalise activations: mean squared norm is {mean_sq}")
  return (target_sq_norm / mean_sq) ** 0.5


def resolve_target(target, d_in: int) -> float | None:
  """Config value -> target squared norm: 'd_model' means d_in, 'off'/None none, or a number."""
  if target in (None, "off"):
    return None
  if target == "d_model":
    return float(d_in)
  value = float(target)
  if value <= 0:
    raise ValueError(f"data.normalise_target={target!r}: expected 'd_model', 'off' or a positive number")
  return value
