"""The train state pytree and its creation directly with mesh shardings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.sae.spec import SAESpec


@struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-identically."""

  step: jax.Array  # int32 []
  params: dict[str, jax.Array]
  opt_state: Any
  rng: jax.Array  # uint32 [2], raw key (serialisable)
  tokens_since_fired: jax.Array  # int32 [d_sae], saturates at the feature window
  window_fire_count: jax.Array  # float32 [d_sae], firings in the current window
  window_tokens: jax.Array  # float32 [], tokens in the current window


def state_specs(spec: SAESpec, rules, tx: optax.GradientTransformation):
  """PartitionSpec pytree of the TrainState (from the rules table)."""
  p_specs = sharding.param_specs(spec.abstract_params, spec.logical_axes, rules)
  abstract_opt = jax.eval_shape(tx.init, spec.abstract_params)
  opt_specs = optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_opt, p_specs,
      transform_non_params=lambda _: P(), is_leaf=lambda s: isinstance(s, P))
  feature = sharding.logical_spec(("features",), rules)
  specs = TrainState(step=P(), params=p_specs, opt_state=opt_specs, rng=P(),
                     tokens_since_fired=feature, window_fire_count=feature, window_tokens=P())
  if spec.sweep:  # leading member axis, not sharded
    specs = jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda s: isinstance(s, P))
  return specs


def abstract_train_state(spec: SAESpec, mesh: Mesh, rules, tx: optax.GradientTransformation):
  """(abstract state of ShapeDtypeStructs carrying shardings, shardings, init_fn).

  Nothing is allocated: `init_fn()` creates the weights already sharded; a checkpoint restore
  uses the abstract state as its target so arrays land directly in their shardings.
  """
  shardings = sharding.named(mesh, state_specs(spec, rules, tx))

  def init():
    params = spec.init_params()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(spec.seed + 1),
                      tokens_since_fired=jnp.zeros((spec.d_sae,), jnp.int32),
                      window_fire_count=jnp.zeros((spec.d_sae,), jnp.float32),
                      window_tokens=jnp.zeros((), jnp.float32))

  if spec.sweep:  # every member starts from the same weights; only the coefficient differs
    single = init
    init = lambda: jax.tree.map(lambda a: jnp.stack([a] * spec.members), single())
  init_fn = jax.jit(init, out_shardings=shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init), shardings)
  return abstract, shardings, init_fn


def create_train_state(spec: SAESpec, mesh: Mesh, rules, tx: optax.GradientTransformation):
  """Builds (state, state_shardings); weights are created already sharded."""
  _, shardings, init_fn = abstract_train_state(spec, mesh, rules, tx)
  return init_fn(), shardings
