"""One SAE train step (pure), and its jit with mesh shardings and donated state."""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.eval import metrics as metric_defs
from gsae_jax.sae.resample import resample_dead
from gsae_jax.sae.spec import SAESpec
from gsae_jax.train.state import TrainState


def train_step(state: TrainState, x: jax.Array, coefficients: Mapping[str, jax.Array], *,
               graphdef, tx: optax.GradientTransformation, feature_window_tokens: int):
  """Returns (new_state, metrics) for one batch x [batch, d_in] at the named loss coefficients."""
  dead = state.tokens_since_fired >= feature_window_tokens  # before this batch

  def loss_fn(params):
    terms, out = nnx.merge(graphdef, params).loss_terms(x, coefficients, dead)
    return sum(terms.values()), (terms, out)

  grads, (terms, out) = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  sae = nnx.merge(graphdef, params)
  sae.update_statistics(out)  # e.g. BatchTopK's threshold estimate; a no-op for most
  params = nnx.to_pure_dict(nnx.split(sae)[1])

  batch = x.shape[0]
  sums = metric_defs.reconstruction_sums(x, out["x_hat"], out["f"])
  fire_count = sums["fire_count"]
  tokens_since_fired = jnp.where(fire_count > 0, 0,
                                 jnp.minimum(state.tokens_since_fired + batch, feature_window_tokens))
  window_fire_count = state.window_fire_count + fire_count
  window_tokens = state.window_tokens + batch

  metrics = {**metric_defs.reconstruction_metrics(sums), **terms}
  metrics["loss"] = sum(terms.values())
  metrics.update({f"coef_{name}": jnp.asarray(v) for name, v in coefficients.items()})
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


def compile_steps(spec: SAESpec, mesh: Mesh, state_shardings, rules, tx,
                  feature_window_tokens: int):
  """(train_step, resample_step), both jitted with shardings.

  With a sweep (`spec.sweep`), the state has a leading member axis and both steps are
  `jax.vmap`ped over it, each member at its own value of the swept coefficient: every member
  sees the same batch (one data pass).
  """
  step = functools.partial(train_step, graphdef=spec.graphdef, tx=tx,
                           feature_window_tokens=feature_window_tokens)
  resample = functools.partial(resample_step, graphdef=spec.graphdef, tx=tx,
                               logical_axes=spec.logical_axes,
                               feature_window_tokens=feature_window_tokens)
  values = spec.sweep_values()
  if values is None:
    train_fn = lambda state, x: step(state, x, spec.coefficients_at(state.step))
    resample_fn = resample
  else:
    train_fn = lambda states, x: jax.vmap(
        lambda s, v: step(s, x, spec.coefficients_at(s.step, v)))(states, values)
    resample_fn = lambda states, x: jax.vmap(lambda s: resample(s, x))(states)
  return (jit_sharded(train_fn, mesh, state_shardings, rules, True),
          jit_sharded(resample_fn, mesh, state_shardings, rules, False))
