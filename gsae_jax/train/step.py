"""One SAE train step (pure), and its jit with mesh shardings and donated state."""

from __future__ import annotations

import functools
from typing import Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.eval import metrics as metric_defs
from gsae_jax.sae.resample import resample_dead
from gsae_jax.sae.spec import SAESpec
from gsae_jax.train import paths
from gsae_jax.train.state import TrainState


def dead_features(state: TrainState, feature_window_tokens: int) -> jax.Array:
  """[d_sae] bool: the features that fired on no token of the last window (before this batch)."""
  return state.tokens_since_fired >= feature_window_tokens


def train_step(state: TrainState, x: jax.Array, coefficients: Mapping[str, jax.Array],
               products=None, idx=None, heavy=None, *, graphdef, tx: optax.GradientTransformation,
               feature_window_tokens: int, choice: paths.PathChoice = paths.PathChoice(False)):
  """Returns (new_state, metrics) for one batch x [batch, d_in] at the named loss coefficients.

  Dense by default; with `products` and `idx` from `paths.find_support`, the sparse path on
  each token's slots (metric `sparse_step` = 1), and with `heavy` too the split step (those
  tokens dense; `sparse_step` = the share of tokens on the slots); with `products` alone the
  dense path reusing them (`gsae_jax.train.paths`); `choice` holds the capacities and the
  compute dtype.
  """
  dead = dead_features(state, feature_window_tokens)
  grads, terms, out = paths.loss_grads_in_chunks(state.params, x, coefficients, dead,
                                                 graphdef=graphdef, choice=choice,
                                                 products=products, idx=idx, heavy=heavy)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  sae = nnx.merge(graphdef, params)
  sae.update_statistics(out)  # e.g. BatchTopK's threshold estimate; a no-op for most
  params = nnx.to_pure_dict(nnx.split(sae)[1])

  batch = x.shape[0]
  sums = metric_defs.reconstruction_sums(x, out["x_hat"], fire_count=out["fire_count"])
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
  on_slots = 0 if idx is None else batch - (0 if heavy is None else heavy.shape[0])
  metrics["sparse_step"] = jnp.asarray(on_slots / batch, jnp.float32)

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


def over_members_by(execution: str):
  """fn of one member -> fn of the stacked members (leading axis of every argument):
  'vmap' batches the members' products; 'sequential' runs them one after another (`lax.map`)."""
  if execution == "vmap":
    return jax.vmap
  if execution == "sequential":
    return lambda fn: lambda *a: jax.lax.map(lambda args: fn(*args), a)
  raise ValueError(f"sweep.execution={execution!r}: expected vmap, sequential or separate")


def _same(state):
  return state


class CompiledSteps(NamedTuple):
  """A run's jitted steps and the form of the state they take: `train(held, x)` -> (held,
  metrics) and `resample(held, x)` -> held, where `held = hold(state)`; `release(held)` is the
  TrainState again (stacked over a sweep's members), for checkpoints and the caller. `dense` is
  the jitted dense step (held unit, x, swept value(s) or None) -> (held unit, metrics), to lower."""

  train: Callable
  resample: Callable
  dense: Callable
  hold: Callable = _same
  release: Callable = _same


def jit_sharded(fn, mesh: Mesh, state_shardings, rules, with_metrics: bool, extra=()):
  """jax.jit of fn(state, x, *extra_args) with the state sharded by the rules and donated;
  `extra` holds the shardings of the extra arguments."""
  batch_sharding = NamedSharding(mesh, sharding.batch_spec(rules))
  replicated = NamedSharding(mesh, P())
  out = (state_shardings, replicated) if with_metrics else state_shardings
  return jax.jit(fn, in_shardings=(state_shardings, batch_sharding, *extra), out_shardings=out,
                 donate_argnums=0)


def compile_steps(spec: SAESpec, mesh: Mesh, state_shardings, rules, tx,
                  feature_window_tokens: int, path: paths.PathChoice = paths.PathChoice(False),
                  execution: str = "vmap") -> CompiledSteps:
  """The train and resample steps, jitted with shardings (`CompiledSteps`).

  With a sweep (`spec.sweep`), the state has a leading member axis and each member trains at
  its own value of the swept coefficient on the same batch (one data pass), as `execution`
  says: 'vmap' or 'sequential' (`lax.map`) in one program over the stacked state
  (`over_members_by`), or 'separate': each member's state held as its own arrays and stepped by
  the one jitted single-SAE step (its coefficient a traced argument), so that no member's new
  state is copied into a stacked buffer (BUILD_NOTES "Sweeps").

  On the sparse `path` a train step is `paths.find_support`, then, chosen on the host for each
  member, the sparse step on the smallest of `paths.slot_buckets` that holds its support; the
  split step (the few tokens with the largest supports dense, the others on the slots) where
  only those tokens overflow; or the dense step on the same products.
  """
  step = functools.partial(train_step, graphdef=spec.graphdef, tx=tx,
                           feature_window_tokens=feature_window_tokens, choice=path)
  resample = functools.partial(resample_step, graphdef=spec.graphdef, tx=tx,
                               logical_axes=spec.logical_axes,
                               feature_window_tokens=feature_window_tokens)
  values = spec.sweep_values()
  apart = values is not None and execution == "separate"
  stacked = values is not None and not apart
  # lift(fn of (one state, its value, ...)) -> fn of the held state, values and the rest
  lift = over_members_by(execution) if stacked else (lambda fn: fn)
  coefficients = lambda s, v: spec.coefficients_at(s.step, v)
  held_shardings = state_shardings
  if apart:
    held_shardings = jax.tree.map(lambda s: NamedSharding(mesh, P(*s.spec[1:])), state_shardings)
  replicated = NamedSharding(mesh, P())
  resample_fn = jit_sharded(
      lambda s, x, v: lift(lambda s, v: resample(s, x))(s, v),
      mesh, held_shardings, rules, False, (replicated,))
  dense_fn = jit_sharded(
      lambda s, x, v: lift(lambda s, v: step(s, x, coefficients(s, v)))(s, v),
      mesh, held_shardings, rules, True, (replicated,))

  if path.sparse:
    unit_search, unit_finish = _sparse_steps(step, coefficients, lift, spec, mesh, held_shardings,
                                             rules, path, stacked, feature_window_tokens)
  else:
    unit_search, unit_finish = (lambda s, x, v: None), (lambda s, x, v, _: dense_fn(s, x, v))

  if not apart:
    return CompiledSteps(lambda s, x: unit_finish(s, x, values, unit_search(s, x, values)),
                         lambda s, x: resample_fn(s, x, values), dense_fn)

  member_values = list(values)
  stack = lambda members: jax.tree.map(lambda *a: jnp.stack(a), *members)
  stack_metrics = jax.jit(stack, out_shardings=replicated)

  def train_apart(members, x):
    found = [unit_search(s, x, v) for s, v in zip(members, member_values)]  # dispatched first
    out = [unit_finish(s, x, v, f) for s, v, f in zip(members, member_values, found)]
    return tuple(s for s, _ in out), stack_metrics([m for _, m in out])

  def resample_apart(members, x):
    return tuple(resample_fn(s, x, v) for s, v in zip(members, member_values))

  split = lambda state: tuple(jax.tree.map(lambda a: a[i], state) for i in range(spec.members))
  hold = jax.jit(split, out_shardings=(held_shardings,) * spec.members)
  release = jax.jit(stack, out_shardings=state_shardings)
  return CompiledSteps(train_apart, resample_apart, dense_fn, hold, release)


def _sparse_steps(step, coefficients, lift, spec: SAESpec, mesh: Mesh, held_shardings, rules,
                  path: paths.PathChoice, stacked: bool, feature_window_tokens: int):
  """(search, finish) of the sparse path for the held state s (stacked members or one SAE)
  and its value(s) v: `search(s, x, v)` dispatches `paths.find_support`; `finish(s, x, v,
  found)` reads the support sizes (the host sync) and runs each member's step."""
  lead = (None,) if stacked else ()
  products_sharding = {name: NamedSharding(mesh, P(*lead, *sharding.logical_spec(
      ("batch", "features"), rules))) for name in spec.support_products()}
  idx_sharding = NamedSharding(mesh, P(*lead, *sharding.logical_spec(("batch", None), rules)))
  replicated = NamedSharding(mesh, P())
  search = jax.jit(
      lambda s, x, v: lift(lambda s, v: paths.find_support(
          s.params, x, coefficients(s, v), dead_features(s, feature_window_tokens),
          graphdef=spec.graphdef, choice=path))(s, v),
      out_shardings=(products_sharding, idx_sharding, replicated, replicated))
  steps = {}
  buckets = paths.slot_buckets(path.capacity)

  def step_fn(modes: tuple[tuple[str, int], ...]):
    """The train step where each member (one, without a sweep) takes its (path, slots):
    'dense' (on the support search's products), 'sparse' or 'split' on its first `slots`
    slots; members of the same path run together. Compiled once per `modes`."""
    if modes not in steps:
      def member(mode, slots):
        return lambda s, v, p, i, h, x: step(s, x, coefficients(s, v), p,
                                             None if mode == "dense" else i[..., :slots],
                                             h if mode == "split" else None)

      def fn(states, x, values, products, idx, heavy):
        if len(set(modes)) == 1:
          return lift(lambda *a: member(*modes[0])(*a, x))(states, values, products, idx, heavy)
        groups = {}
        for i, mode in enumerate(modes):
          groups.setdefault(mode, []).append(i)
        outs = []
        for mode, ids in groups.items():
          part = jax.tree.map(lambda a: a[np.asarray(ids)], (states, values, products, idx, heavy))
          outs.append(lift(lambda *a: member(*mode)(*a, x))(*part))
        order = np.argsort([i for ids in groups.values() for i in ids])
        return jax.tree.map(lambda *a: jnp.concatenate(a)[order], *outs)

      steps[modes] = jit_sharded(fn, mesh, held_shardings, rules, True,
                                 (replicated, products_sharding, idx_sharding, replicated))
    return steps[modes]

  def finish(states, x, values, found):
    products, idx, heavy, needed = found
    needed = np.asarray(needed).reshape(-1, 2)  # the host sync of a sparse step; [members, 2]
    fits = needed <= path.capacity
    modes = ["sparse" if all_fit else "split" if light_fit else "dense"
             for all_fit, light_fit in fits]
    if len(set(modes)) == 1:  # every member on one path: the smallest slot bucket that holds it
      most = needed[:, int(modes[0] == "split")].max()
      slots = next((b for b in buckets if b >= most), path.capacity)
    else:
      slots = path.capacity  # a mixed sweep: all slots (fewer compilations)
    return step_fn(tuple((m, slots) for m in modes))(states, x, values, products, idx, heavy)

  return search, finish
