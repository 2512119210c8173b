"""The train state pytree and its creation directly with mesh shardings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.sae.models import build_sae


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


def sweep_grid(config) -> tuple[float, ...] | None:
  """The lambda grid of a sweep run (`config.sweep.l1_coefficients`), or None for a single SAE."""
  grid = tuple(config.get("sweep", {}).get("l1_coefficients", ()) or ())
  return grid or None


def sae_graph(config, d_in: int):
  """(graphdef, abstract params) of the configured SAE, without allocating weights."""
  sae = nnx.eval_shape(lambda: build_sae(config.sae, d_in, config.seed))
  graphdef, params = nnx.split(sae)
  return graphdef, nnx.to_pure_dict(params), type(sae).LOGICAL_AXES


def state_specs(config, d_in: int, tx: optax.GradientTransformation):
  """PartitionSpec pytree of the TrainState (from the rules table)."""
  rules = tuple(map(tuple, config.mesh.rules))
  _, abstract_params, logical_axes = sae_graph(config, d_in)
  p_specs = sharding.param_specs(abstract_params, logical_axes, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_specs = optax.tree_utils.tree_map_params(
      tx, lambda _, spec: spec, abstract_opt, p_specs,
      transform_non_params=lambda _: P(), is_leaf=lambda s: isinstance(s, P))
  feature = sharding.logical_spec(("features",), rules)
  specs = TrainState(step=P(), params=p_specs, opt_state=opt_specs, rng=P(),
                     tokens_since_fired=feature, window_fire_count=feature, window_tokens=P())
  if sweep_grid(config) is not None:  # leading member axis, not sharded
    specs = jax.tree.map(lambda s: P(None, *s), specs, is_leaf=lambda s: isinstance(s, P))
  return specs


def abstract_train_state(config, d_in: int, mesh: Mesh, tx: optax.GradientTransformation):
  """(abstract state of ShapeDtypeStructs carrying shardings, shardings, graphdef, init_fn).

  Nothing is allocated: `init_fn()` creates the weights already sharded; a checkpoint restore
  uses the abstract state as its target so arrays land directly in their shardings.
  """
  graphdef, _, _ = sae_graph(config, d_in)
  shardings = sharding.named(mesh, state_specs(config, d_in, tx))

  def init():
    params = nnx.to_pure_dict(nnx.split(build_sae(config.sae, d_in, config.seed))[1])
    d_sae = config.sae.d_sae
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(config.seed + 1),
                      tokens_since_fired=jnp.zeros((d_sae,), jnp.int32),
                      window_fire_count=jnp.zeros((d_sae,), jnp.float32),
                      window_tokens=jnp.zeros((), jnp.float32))

  grid = sweep_grid(config)
  if grid is not None:  # every member starts from the same weights; only lambda differs
    single = init
    init = lambda: jax.tree.map(lambda a: jnp.stack([a] * len(grid)), single())
  init_fn = jax.jit(init, out_shardings=shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init), shardings)
  return abstract, shardings, graphdef, init_fn


def create_train_state(config, d_in: int, mesh: Mesh, tx: optax.GradientTransformation):
  """Builds (state, state_shardings, graphdef); weights are created already sharded."""
  _, shardings, graphdef, init_fn = abstract_train_state(config, d_in, mesh, tx)
  return init_fn(), shardings, graphdef
