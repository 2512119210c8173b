"""The training loop: state creation or restore, jitted steps, resampling, metrics, checkpoints."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from gsae_jax.checkpoint import Checkpointer
from gsae_jax.data.sources import BatchIterator
from gsae_jax.errors import Diverged
from gsae_jax.train import optim, paths
from gsae_jax.sae.spec import SAESpec
from gsae_jax.train.state import TrainState, abstract_train_state
from gsae_jax.train.step import compile_steps

MetricsCallback = Callable[[int, dict[str, float]], None]


def _b_dec_at_data_mean(state: TrainState, batches: BatchIterator, num_batches: int,
                        b_dec_sharding) -> TrainState:
  """b_dec = mean of the first `num_batches` batches; the data stream is rewound afterwards, so
  training still sees every batch (GATED_SAE.md: b_dec = 0 or the data mean)."""
  start = batches.get_state()
  xs = [next(batches) for _ in range(num_batches)]
  batches.set_state(start)
  b_dec = state.params["b_dec"]  # [d_in], or [members, d_in] in a sweep
  mean = jax.numpy.mean(jax.numpy.concatenate(xs), axis=0).astype(b_dec.dtype)
  mean = jax.numpy.broadcast_to(mean, b_dec.shape)
  return state.replace(params={**state.params, "b_dec": jax.device_put(mean, b_dec_sharding)})


@jax.jit
def _all_finite(params) -> jax.Array:
  return jax.numpy.all(jax.numpy.stack([jax.numpy.isfinite(p).all()
                                        for p in jax.tree.leaves(params)]))


def _diverged(step: int, what: str, checkpointer: Checkpointer | None) -> Diverged:
  steps = checkpointer.steps() if checkpointer else []
  kept = (f"the last good checkpoint, step {steps[-1]} in {checkpointer.directory}, is kept"
          if steps else "no checkpoint was saved before it")
  return Diverged(f"training diverged by step {step}: {what}; {kept}. Lower optim.lr (or check "
                  "the data and coefficients) and re-run with --allow_changes=<the fields changed>")


def _non_finite_loss(metrics: dict) -> str | None:
  loss = np.asarray(metrics["loss"], np.float64)
  if np.isfinite(loss).all():
    return None
  members = np.flatnonzero(~np.isfinite(loss.reshape(-1)))
  where = f" (sweep members {members.tolist()})" if loss.ndim else ""
  return f"non-finite loss {loss.reshape(-1)[members[0]]}{where}"


def train(config, mesh: Mesh, batches: BatchIterator, spec: SAESpec,
          on_metrics: MetricsCallback | None = None, checkpointer: Checkpointer | None = None,
          restore_step: int | None = None,
          stop_requested: Callable[[], bool] = lambda: False) -> TrainState:
  """Trains the SAE `spec` (`gsae_jax.sae.spec.describe(config, d_in)`) up to
  `config.train.steps`, drawing one [batch, d_in] array per step from `batches`.

  With a checkpointer, the latest checkpoint (or `restore_step`) is restored first, together with
  the data iterator's position, and saves happen on its interval, at the end, and as soon as
  `stop_requested()` turns true (preemption), after which the loop returns early. It also returns
  early, after a final save, when the data runs out (`data.num_epochs`); the state's step says
  where. A non-finite loss (seen at log steps) or non-finite parameters (checked before every
  save, so no checkpoint ever holds them) raise `Diverged`.
  """
  steps = config.train.steps
  rules = tuple(map(tuple, config.mesh.rules))
  tx = optim.make_optimizer(config.optim, steps, spec.architecture.UNIT_NORM_DECODER)
  abstract, shardings, init_fn = abstract_train_state(spec, mesh, rules, tx)
  restored = checkpointer.restore(abstract, restore_step) if checkpointer else None
  if restored:
    restored_step, state, data_state = restored
    checkpointer.set_aside_after(restored_step)
    batches.set_state(data_state)
  else:
    state = init_fn()
    if config.sae.init_b_dec == "mean":
      state = _b_dec_at_data_mean(state, batches, config.sae.init_b_dec_batches,
                                  shardings.params["b_dec"])
  path = paths.choose(config.train, spec, mesh.shape["data"], mesh.size)
  compiled = compile_steps(
      spec, mesh, shardings, rules, tx, int(config.train.feature_window_tokens), path,
      paths.member_execution(config.sweep, path))
  config_dict = config.to_dict()
  start = int(np.asarray(state.step).flat[0])  # a sweep's members share the step
  held = compiled.hold(state)
  del state  # the steps donate the held state's buffers

  def save(step: int, force: bool) -> None:
    if checkpointer and checkpointer.due(step, force):
      state = compiled.release(held)
      if not bool(_all_finite(state.params)):
        raise _diverged(step, "non-finite parameters", checkpointer)
      checkpointer.save(step, state, batches.get_state(), config_dict, force=force)

  every, until = config.train.resample_every, config.train.resample_until
  t0, t_step = time.perf_counter(), start
  for step in range(start, steps):
    try:
      x = next(batches)
    except StopIteration:  # data.num_epochs ran out: keep what was trained
      save(step, force=True)
      break
    held, metrics = compiled.train(held, x)
    done = step + 1
    if every and done % every == 0 and (until == 0 or done < until):
      held = compiled.resample(held, x)
    if on_metrics and (done % config.train.log_every == 0 or done == steps):
      # floats, or lists over the members of a sweep
      metrics = {k: np.asarray(v).tolist() for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - t0
      metrics["tokens_per_s"] = (done - t_step) * config.train.batch_size / elapsed
      on_metrics(done, metrics)
      t0, t_step = time.perf_counter(), done
      bad = _non_finite_loss(metrics)
      if bad:
        raise _diverged(done, bad, checkpointer)
    stop = stop_requested()
    save(done, force=stop or done == steps)
    if stop:
      break
  if checkpointer:
    checkpointer.wait()
  return compiled.release(held)
