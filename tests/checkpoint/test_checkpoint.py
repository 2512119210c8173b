"""Checkpoint round trips across meshes, and damaged checkpoints (in process)."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.checkpoint import CheckpointError, Checkpointer
from gsae_jax.data.sources import make_source
from gsae_jax.train import optim
from gsae_jax.sae.spec import describe
from gsae_jax.train.loop import train
from gsae_jax.train.state import abstract_train_state


def _train_8_devices(config, directory):
  config.mesh.data, config.mesh.model = 2, 4
  config.checkpoint.save_every = 2
  mesh = sharding.make_mesh(2, 4)
  source = make_source(config, mesh)
  ckpt = Checkpointer(directory, save_every=2, keep=5)
  state = train(config, mesh, source.batches, describe(config, source.d_in), checkpointer=ckpt)
  ckpt.close()
  return jax.device_get(state)


def _abstract(config, mesh):
  tx = optim.make_optimizer(config.optim, config.train.steps)
  return abstract_train_state(describe(config, config.data.d_in), mesh,
                              tuple(map(tuple, config.mesh.rules)), tx)[0]


@pytest.mark.parametrize("data, model", [(1, 1), (1, 4), (4, 1)])
def test_restore_onto_other_device_counts(tiny_config, tmp_path, data, model):
  saved = _train_8_devices(tiny_config, tmp_path / "ckpt")
  mesh = sharding.make_mesh(data, model)
  step, state, data_state = Checkpointer(tmp_path / "ckpt", save_every=2, keep=5).restore(
      _abstract(tiny_config, mesh))
  assert step == 5 and int(state.step) == 5 and data_state == {"step": 5}
  assert state.params["W_dec"].sharding.mesh.devices.size == data * model
  assert state.params["W_dec"].sharding.spec == P("model", None)
  assert state.params["W_dec"].addressable_shards[0].data.shape == (64 // model, 16)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(saved), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(path))


def _truncate_array_data(step_dir):
  """Halves the OCDBT data files that a restore reads (state/d/*)."""
  data_dir = step_dir / "state" / "d"
  for name in os.listdir(data_dir):
    target = data_dir / name
    with open(target, "r+b") as f:
      f.truncate(os.path.getsize(target) // 2)


def test_damaged_latest_names_step_and_previous_can_be_restored(tiny_config, tmp_path):
  _train_8_devices(tiny_config, tmp_path / "ckpt")
  ckpt = Checkpointer(tmp_path / "ckpt", save_every=2, keep=5)
  assert ckpt.steps() == [2, 4, 5]
  _truncate_array_data(tmp_path / "ckpt" / "5")
  abstract = _abstract(tiny_config, sharding.make_mesh(2, 4))
  with pytest.raises(CheckpointError, match=r"step 5 .*--restore_step=4"):
    ckpt.restore(abstract)
  assert ckpt.steps() == [2, 4, 5]  # nothing deleted or overwritten by the failed restore

  step, state, data_state = ckpt.restore(abstract, step=4)
  assert step == 4 and int(state.step) == 4 and data_state == {"step": 4}
  assert ckpt.steps() == [2, 4, 5]  # restoring only reads
  ckpt.set_aside_after(4)
  assert ckpt.steps() == [2, 4]
  aside = [d for d, _, fs in os.walk(f"{tmp_path / 'ckpt'}_superseded") if os.path.basename(d) == "5"]
  assert len(aside) == 1  # the damaged step was kept aside, not deleted


def test_missing_requested_step_is_a_clear_error(tiny_config, tmp_path):
  _train_8_devices(tiny_config, tmp_path / "ckpt")
  with pytest.raises(CheckpointError, match=r"no checkpoint at step 3; available: \[2, 4, 5\]"):
    Checkpointer(tmp_path / "ckpt", save_every=2, keep=5).restore(
        _abstract(tiny_config, sharding.make_mesh(1, 1)), step=3)


def _three_steps(directory) -> Checkpointer:
  ckpt = Checkpointer(directory, save_every=1, keep=5, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": np.full(2, step, np.float32)}, {"step": step}, {})
  return ckpt


@pytest.mark.parametrize("index, count", [(0, 1), (0, 2), (1, 2)])
def test_set_aside_after_moves_on_process_0_only_between_barriers(tmp_path, monkeypatch,
                                                                 index, count):
  from jax.experimental import multihost_utils
  ckpt = _three_steps(tmp_path / "ckpt")
  barriers = []
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)
  monkeypatch.setattr(multihost_utils, "sync_global_devices", barriers.append)
  ckpt.set_aside_after(1)
  moves = index == 0
  assert sorted(os.listdir(tmp_path / "ckpt")) == (["1"] if moves else ["1", "2", "3"])
  aside = tmp_path / "ckpt_superseded"
  assert (sorted(os.listdir(aside / os.listdir(aside)[0])) == ["2", "3"]) if moves else (
      not aside.exists())
  assert barriers == ([] if count == 1 else ["gsae_jax set_aside_after: before",
                                             "gsae_jax set_aside_after: after"])
  if moves:  # the manager sees the moved steps gone
    assert ckpt.steps() == [1]
