"""Sparse features in superposition with known ground truth (for tests and the first main job).

x = sum_i a_i m_i d_i with d_i [m_true, d_in] random unit directions, a_i ~ Bernoulli(fire_prob)
and magnitudes m_i ~ Uniform(mag_low, mag_high) > 0. Batches are a pure function of (key, step),
so a run is reproducible from its seed and resumable at any step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from gsae_jax.sae.base import random_unit_rows


@dataclasses.dataclass(frozen=True)
class SyntheticFeatures:
  """Ground-truth dictionary and firing statistics."""

  directions: jax.Array  # [m_true, d_in], unit rows
  fire_prob: float
  mag_low: float
  mag_high: float

  @classmethod
  def create(cls, seed: int, d_in: int, m_true: int, fire_prob: float,
             mag_low: float = 0.5, mag_high: float = 1.5) -> "SyntheticFeatures":
    if not 0 < fire_prob <= 1:
      raise ValueError(f"data.fire_prob={fire_prob}: expected a probability in (0, 1]")
    if not 0 < mag_low <= mag_high:
      raise ValueError(f"data.mag_low={mag_low}, data.mag_high={mag_high}: expected 0 < low <= high")
    return cls(random_unit_rows(jax.random.key(seed), m_true, d_in), fire_prob, mag_low, mag_high)

  def sample(self, key: jax.Array, batch: int) -> jax.Array:
    """[batch, d_in] activations."""
    k_fire, k_mag = jax.random.split(key)
    shape = (batch, self.directions.shape[0])
    fires = jax.random.bernoulli(k_fire, self.fire_prob, shape)
    mags = jax.random.uniform(k_mag, shape, minval=self.mag_low, maxval=self.mag_high)
    return (fires * mags) @ self.directions


def synthetic_batches(features: SyntheticFeatures, batch: int, seed: int, scale: float,
                      out_sharding) -> Callable[[int], jax.Array]:
  """step -> [batch, d_in] batch, generated on device directly with `out_sharding`."""
  key = jax.random.key(seed)

  @functools.partial(jax.jit, out_shardings=out_sharding)
  def batch_at(step):
    return scale * features.sample(jax.random.fold_in(key, step), batch)

  return batch_at
