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
from gsae_jax.train import optim
from gsae_jax.train.state import TrainState, sweep_grid


def train_step(state: TrainState, x: jax.Array, l1_coefficient: jax.Array, *, graphdef,
               tx: optax.GradientTransformation, feature_window_tokens: int):
  """Returns (new_state, metrics) for one batch x [batch, d_in] at sparsity `l1_coefficient`."""
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


def compile_steps(config, mesh: Mesh, state_shardings, graphdef, tx, logical_axes):
  """(train_step, resample_step), both jitted with shardings.

  With a lambda grid (`config.sweep.l1_coefficients`), the state has a leading member axis and
  both steps are `jax.vmap`ped over it: every member sees the same batch (one data pass).
  """
  rules = tuple(map(tuple, config.mesh.rules))
  window = int(config.train.feature_window_tokens)
  warmup = optim.l1_warmup(config.sae, config.train.steps)
  step = functools.partial(train_step, graphdef=graphdef, tx=tx, feature_window_tokens=window)
  resample = functools.partial(resample_step, graphdef=graphdef, tx=tx, logical_axes=logical_axes,
                               feature_window_tokens=window)
  grid = sweep_grid(config)
  if grid is None:
    lam = config.sae.l1_coefficient
    train_fn = lambda state, x: step(state, x, lam * warmup(state.step))
    resample_fn = resample
  else:
    grid = jnp.asarray(grid, jnp.float32)
    train_fn = lambda states, x: jax.vmap(
        lambda s, g: step(s, x, g * warmup(s.step)))(states, grid)
    resample_fn = lambda states, x: jax.vmap(lambda s: resample(s, x))(states)
  return (jit_sharded(train_fn, mesh, state_shardings, rules, True),
          jit_sharded(resample_fn, mesh, state_shardings, rules, False))
