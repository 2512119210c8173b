"""Reading a trained SAE back out of a training workdir."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from gsae_jax import sharding
from gsae_jax.checkpoint import CheckpointError, Checkpointer
from gsae_jax.train import optim
from gsae_jax.train.state import abstract_train_state


def load_params(workdir: str, step: int | None) -> tuple[int, dict, dict, dict]:
  """(step, host params, config dict, source description) from a workdir's checkpoint."""
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1_000_000)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"{ckpt.directory}: no checkpoints to export")
  step = steps[-1] if step is None else step
  config = ml_collections.ConfigDict(ckpt.restore_config(step))
  with open(os.path.join(workdir, "source.json")) as f:
    source = json.load(f)
  mesh = sharding.make_mesh(1, 1)
  tx = optim.make_optimizer(config.optim, config.train.steps)
  abstract = abstract_train_state(config, source["d_in"], mesh, tx)[0]
  _, state, _ = ckpt.restore(abstract, step)
  return step, jax.device_get(state.params), config.to_dict(), source
