"""Reading a trained SAE back out of a training workdir."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections

from gsae_jax import configs, sharding
from gsae_jax.checkpoint import CheckpointError, Checkpointer
from gsae_jax.sae.spec import SAESpec, describe
from gsae_jax.train import optim
from gsae_jax.train.state import abstract_train_state


@dataclasses.dataclass(frozen=True)
class TrainedSAE:
  """A checkpoint's SAE: step, host params (a sweep's with a leading member axis), the run's
  config (today's layout, also for workdirs of earlier versions), activation source and spec."""
  step: int
  params: dict
  config: ml_collections.ConfigDict
  source: dict
  spec: SAESpec


def load_trained(workdir: str, step: int | None = None) -> TrainedSAE:
  """The SAE of `workdir`'s checkpoint `step` (default: the latest), on one device of this
  process."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):  # checked first: Orbax would create it
    raise CheckpointError(f"{directory}: no such folder; expected a training workdir "
                          "(written by launch/train.py)")
  ckpt = Checkpointer(directory, save_every=1, keep=1_000_000)
  steps = ckpt.steps()
  if not steps:
    raise CheckpointError(f"{ckpt.directory}: no checkpoints to export")
  step = steps[-1] if step is None else step
  config = ml_collections.ConfigDict(configs.upgrade_legacy(ckpt.restore_config(step)))
  source_path = os.path.join(workdir, "source.json")
  try:
    with open(source_path) as f:
      source = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{source_path}: unreadable ({e}); it describes the "
                          "activations the SAE was trained on, export needs it") from None
  spec = describe(config, source["d_in"])
  tx = optim.make_optimizer(config.optim, config.train.steps, spec.architecture.UNIT_NORM_DECODER)
  rules = tuple(map(tuple, config.mesh.rules))
  # this process's first device: every process of a multi-process evaluation holds the SAE
  one_device = sharding.make_mesh(1, 1, jax.local_devices()[:1])
  abstract = abstract_train_state(spec, one_device, rules, tx)[0]
  _, state, _ = ckpt.restore(abstract, step)
  return TrainedSAE(step, jax.device_get(state.params), config, source, spec)
