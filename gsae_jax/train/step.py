"""One SAE train step (pure), and its jit with mesh shardings and donated state."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.eval import metrics as metric_defs
from gsae_jax.sae.resample import resample_dead
from gsae_jax.train.state import TrainState


def train_step(state: TrainState, x: jax.Array, *, graphdef, tx: optax.GradientTransformation,
               l1_schedule: optax.Schedule, feature_window_tokens: int):
  """Returns (new_state, metrics) for one batch x [batch, d_in]."""
  l1_coefficient = l1_schedule(state.step)

  def loss_fn(params):
    terms, out = nnx.merge(graphdef, params).loss_terms(x, l1_coefficient)
    return sum(terms.values()), (terms, out)

  grads, (terms, out) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  batch = x.shape[0]
  sums = metric_defs.reconstruction_sums(x, out["x_hat"], out["f"])
  fire_count = sums["fire_count"]
  tokens_since_fired = jnp.where(fire_count > 0, 0,
                                 jnp.minimum(state.tokens_since_fired + batch, feature_window_tokens))
  window_fire_count = state.window_fire_count + fire_count
  window_tokens = state.window_tokens + batch

  metrics = {**metric_defs.reconstruction_metrics(sums), **terms}
  metrics["loss"] = sum(terms.values())
  metrics["l1_coefficient"] = l1_coefficient
  metrics["dead_fraction"] = jnp.mean((tokens_since_fired >= feature_window_tokens).astype(jnp.float32))
  metrics["dense_fraction"] = metric_defs.dense_fraction(window_fire_count, window_tokens)

  window_full = window_tokens >= feature_window_tokens
  new_state = TrainState(
      step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng,
      tokens_since_fired=tokens_since_fired,
      window_fire_count=jnp.where(window_full, 0.0, window_fire_count),
      window_tokens=jnp.where(window_full, 0.0, window_tokens))
  return new_state, metrics


def resample_step(state: TrainState, x: jax.Array, *, graphdef, tx, logical_axes,
                  feature_window_tokens: int) -> TrainState:
  """Resamples the features dead for a whole window; advances the state's rng."""
  rng, key = jax.random.split(state.rng)
  dead = state.tokens_since_fired >= feature_window_tokens
  params, opt_state = resample_dead(state.params, state.opt_state, x, dead, key, graphdef=graphdef,
                                    tx=tx, logical_axes=logical_axes)
  return state.replace(params=params, opt_state=opt_state, rng=rng,
                       tokens_since_fired=jnp.where(dead, 0, state.tokens_since_fired))


def jit_sharded(fn, mesh: Mesh, state_shardings, rules, with_metrics: bool):
  """jax.jit of fn(state, x) with the state sharded by the rules and donated."""
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(rules))
  replicated = NamedSharding(mesh, P())
  out = (state_shardings, replicated) if with_metrics else state_shardings
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding), out_shardings=out,
                 donate_argnums=0)


def compile_steps(config, mesh: Mesh, state_shardings, graphdef, tx, l1_schedule, logical_axes):
  """(train_step, resample_step), both jitted with shardings."""
  rules = tuple(map(tuple, config.mesh.rules))
  window = int(config.train.feature_window_tokens)
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, l1_schedule=l1_schedule,
                           feature_window_tokens=window)
  resample = functools.partial(resample_step, graphdef=graphdef, tx=tx, logical_axes=logical_axes,
                               feature_window_tokens=window)
  return (jit_sharded(step, mesh, state_shardings, rules, True),
          jit_sharded(resample, mesh, state_shardings, rules, False))
