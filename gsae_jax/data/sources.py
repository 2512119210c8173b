"""From `config.data` to a batch function `step -> [batch, d_in]` sharded on the mesh."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.sharding import Mesh, NamedSharding

from gsae_jax import sharding
from gsae_jax.data.normalise import normalisation_scale, resolve_target
from gsae_jax.data.synthetic import SyntheticFeatures, synthetic_batches


@dataclasses.dataclass(frozen=True)
class BatchSource:
  d_in: int
  batch_at: Callable[[int], jax.Array]
  scale: float  # activation normalisation constant (already applied to batches)
  ground_truth: jax.Array | None = None  # [m_true, d_in] true directions, synthetic only


def make_source(config, mesh: Mesh) -> BatchSource:
  """Builds the configured data source."""
  data = config.data
  if data.source != "synthetic":
    raise ValueError(f"config.data.source={data.source!r}: expected 'synthetic'")
  features = SyntheticFeatures.create(data.seed, data.d_in, data.m_true, data.fire_prob,
                                      data.mag_low, data.mag_high)
  sample = features.sample(jax.random.key(data.seed + 1), data.normalise_sample_tokens)
  scale = normalisation_scale(sample, resolve_target(data.normalise_target, data.d_in))
  out = NamedSharding(mesh, sharding.batch_spec(tuple(map(tuple, config.mesh.rules))))
  batch_at = synthetic_batches(features, config.train.batch_size, data.seed + 2, scale, out)
  return BatchSource(data.d_in, batch_at, scale, features.directions)
