"""The training loop: state creation, jitted steps, resampling and periodic metrics."""

from __future__ import annotations

import time
from typing import Callable, Iterator

import jax
from jax.sharding import Mesh

from gsae_jax.train import optim
from gsae_jax.train.state import TrainState, create_train_state, sae_graph
from gsae_jax.train.step import compile_steps

MetricsCallback = Callable[[int, dict[str, float]], None]


def train(config, mesh: Mesh, batches: Iterator[jax.Array], d_in: int,
          on_metrics: MetricsCallback | None = None, state: TrainState | None = None) -> TrainState:
  """Trains up to `config.train.steps` (from `state.step` when a state is given), drawing one
  [batch, d_in] array per step from `batches`."""
  steps = config.train.steps
  tx = optim.make_optimizer(config.optim, steps)
  fresh, shardings, graphdef = create_train_state(config, d_in, mesh, tx)
  state = fresh if state is None else state
  _, _, logical_axes = sae_graph(config, d_in)
  train_step, resample_step = compile_steps(config, mesh, shardings, graphdef, tx,
                                            optim.l1_schedule(config.sae, steps), logical_axes)
  every, until = config.train.resample_every, config.train.resample_until
  start = int(state.step)
  t0, t_step = time.perf_counter(), start
  for step in range(start, steps):
    x = next(batches)
    state, metrics = train_step(state, x)
    done = step + 1
    if every and done % every == 0 and (until == 0 or done < until):
      state = resample_step(state, x)
    if on_metrics and (done % config.train.log_every == 0 or done == steps):
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - t0
      metrics["tokens_per_s"] = (done - t_step) * config.train.batch_size / elapsed
      on_metrics(done, metrics)
      t0, t_step = time.perf_counter(), done
  return state
