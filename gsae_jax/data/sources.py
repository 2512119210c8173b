"""From `config.data` to a `BatchIterator` of [batch, d_in] arrays sharded on the mesh.

Every source is an iterator with `get_state()` / `set_state()` (JSON-serialisable dicts) so that a
checkpoint can store where the data stream stood and resume it exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
from jax.sharding import Mesh, NamedSharding

from gsae_jax import sharding
from gsae_jax.data import shards
from gsae_jax.data.normalise import (
  normalisation_scale,
  resolve_target,
  scale_for_mean_sq,
)
from gsae_jax.data.block_shuffle import BlockSpec
from gsae_jax.data.pipeline import ShardIterator
from gsae_jax.data.synthetic import SyntheticFeatures, synthetic_batches


class BatchIterator(Protocol):
  """What the training loop consumes."""

  def __next__(self) -> jax.Array: ...  # [batch, d_in], sharded P('data', None)
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class SyntheticIterator:
  """Batch i of the synthetic stream is a pure function of (seed, i); the state is i."""

  def __init__(self, batch_at, step: int = 0):
    self._batch_at, self._step = batch_at, step

  def __iter__(self):
    return self

  def __next__(self) -> jax.Array:
    x = self._batch_at(self._step)
    self._step += 1
    return x

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    self._step = int(state["step"])


@dataclasses.dataclass(frozen=True)
class BatchSource:
  d_in: int
  batches: BatchIterator
  scale: float  # activation normalisation constant (already applied to batches)
  ground_truth: jax.Array | None = None  # [m_true, d_in] true directions, synthetic only


def make_source(config, mesh: Mesh) -> BatchSource:
  """Builds the configured data source."""
  source = config.data.source
  out = NamedSharding(mesh, sharding.batch_spec(tuple(map(tuple, config.mesh.rules))))
  if source == "synthetic":
    return _synthetic(config, out)
  if source == "shards":
    return _shards(config, out)
  if source == "lm":
    from gsae_jax.data import stream  # loads the LM stack only when streaming from it
    return stream.make_lm_source(config, out)
  raise ValueError(f"config.data.source={source!r}: expected 'synthetic', 'shards' or 'lm'")


def _synthetic(config, out: NamedSharding) -> BatchSource:
  data = config.data
  features = SyntheticFeatures.create(data.seed, data.d_in, data.m_true, data.fire_prob,
                                      data.mag_low, data.mag_high)
  sample = features.sample(jax.random.key(data.seed + 1), data.normalise_sample_tokens)
  scale = normalisation_scale(sample, resolve_target(data.normalise_target, data.d_in))
  batch_at = synthetic_batches(features, config.train.batch_size, data.seed + 2, scale, out)
  return BatchSource(data.d_in, SyntheticIterator(batch_at), scale, features.directions)


def _shards(config, out: NamedSharding) -> BatchSource:
  """Harvested activations. Shards hold raw activations; the scale comes from the manifest's
  E||x||^2 (estimated at harvest time, GATED_SAE.md section 4) and is applied as rows are read."""
  data = config.data
  shard_set = shards.open_shards(data.path, verify=data.verify_checksums)
  if data.d_in != shard_set.d_model:
    raise ValueError(f"shard folder {data.path}: d_model {shard_set.d_model} in "
                     f"{shards.MANIFEST}, but config.data.d_in={data.d_in}")
  target = resolve_target(data.normalise_target, shard_set.d_model)
  scale = scale_for_mean_sq(shard_set.mean_sq_norm(), target)
  # bf16 shards feed a bf16-compute step as bf16: no float32 copy on the host.
  keep_bf16 = config.train.get("compute_dtype", "float32") == "bfloat16"
  block = (BlockSpec(data.block_rows, data.buffer_blocks, data.lanes)
           if data.shuffle == "block" else None)
  batches = ShardIterator(shard_set, config.train.batch_size, out, scale, seed=data.seed,
                          num_epochs=data.num_epochs, num_threads=data.num_threads,
                          prefetch=data.prefetch, keep_bf16=keep_bf16, block=block)
  return BatchSource(shard_set.d_model, batches, scale, None)
