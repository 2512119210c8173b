"""Two CPU processes (2 fake devices each, gloo collectives) train on shards through the real
`launch/train.py` with `--coordinator_address/--num_processes/--process_id`, and end where one
process with 4 fake devices ends on the same global batches; their checkpoint, written by both
processes together, restores in a single process."""

import json
import sys

import jax
import numpy as np
import pytest

from experiments import shards as shards_experiment
from gsae_jax import sharding
from gsae_jax.checkpoint import Checkpointer
from gsae_jax.data import harvest
from gsae_jax.train import optim
from gsae_jax.sae.spec import describe
from gsae_jax.train.state import abstract_train_state
from tests import multiprocess
from tests.data.conftest import fake_activations, spec, unique_windows

D_IN, D_SAE, BATCH, STEPS = 8, 32, 16, 4
OVERRIDES = {"data.d_in": D_IN, "sae.d_sae": D_SAE, "train.batch_size": BATCH,
             "train.steps": STEPS, "train.log_every": 2, "optim.warmup_steps": 1,
             "mesh.data": 2, "mesh.model": 2, "checkpoint.save_every": 2,
             "data.num_threads": 1, "data.prefetch": 1}
TIMEOUT_S = 90


def _cmd(workdir, data_path, *extra):
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return [sys.executable, "-m", "launch.train", "--config=experiments/shards.py",
          f"--workdir={workdir}", f"--config.data.path={data_path}", *flags, *extra]


@pytest.fixture
def shard_folder(tmp_path):
  s = spec(d_model=D_IN, context_length=17, windows_per_shard=4)
  folder = str(tmp_path / "shards")
  harvest.harvest(folder, unique_windows(12, s.context_length), fake_activations(s.d_model), s,
                  {"test": True}, progress=False)
  return folder


def _one_and_two_processes(tmp_path, shard_folder, *extra) -> tuple:
  """Trains once in one process with 4 devices and once in 2 processes x 2 devices; checks that
  both end with the same parameters and returns (their workdirs, the 2-process parameters)."""
  one, two = tmp_path / "one", tmp_path / "two"
  (out, _), = multiprocess.finish(multiprocess.start(_cmd(one, shard_folder, *extra), 1, 4),
                                  TIMEOUT_S)
  assert "on 4 cpu device(s)" in out

  for out, _ in multiprocess.finish(multiprocess.start(_cmd(two, shard_folder, *extra), 2, 2),
                                    TIMEOUT_S):
    assert "on 4 cpu device(s)" in out, out  # both see the global 4-device mesh
    assert f"step {STEPS}/{STEPS}" in out

  want, got = np.load(one / "params.npz"), np.load(two / "params.npz")
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=k)
  return one, two, got


def test_two_processes_match_one_process_and_checkpoint_restores(tmp_path, shard_folder):
  _, two, got = _one_and_two_processes(tmp_path, shard_folder)
  # Only process 0 writes the metrics log: one line per log step, not two.
  assert len((two / "metrics.jsonl").read_text().splitlines()) == STEPS // 2

  # The checkpoint both processes wrote restores in this single process, on another mesh.
  config = shards_experiment.get_config()
  for k, v in OVERRIDES.items():
    section, field = k.split(".")
    config[section][field] = v
  config.data.path = shard_folder
  config.mesh.data, config.mesh.model = 2, 4
  mesh = sharding.make_mesh(2, 4)
  tx = optim.make_optimizer(config.optim, STEPS)
  abstract = abstract_train_state(describe(config, D_IN), mesh, tuple(map(tuple, config.mesh.rules)),
                                  tx)[0]
  checkpointer = Checkpointer(str(two / "checkpoints"), save_every=2, keep=3)
  assert checkpointer.steps() == [2, 4]
  step, state, data_state = checkpointer.restore(abstract)
  assert step == STEPS and int(state.step) == STEPS
  assert state.params["W_dec"].sharding.spec == jax.sharding.PartitionSpec("model", None)
  for k in got:
    np.testing.assert_allclose(np.asarray(state.params[k]), got[k], rtol=0, atol=0, err_msg=k)
  assert data_state["global_batch"] == BATCH
  checkpointer.close()


def test_two_processes_match_one_process_with_the_block_shuffle(tmp_path, shard_folder):
  """Each process reads its own lanes' blocks (192 rows in blocks of 8, 2 lanes per process);
  the global batches, and so the trained parameters, are those of one process."""
  _, two, _ = _one_and_two_processes(
      tmp_path, shard_folder, "--config.data.shuffle=block", "--config.data.block_rows=8",
      "--config.data.buffer_blocks=2", "--config.data.lanes=4")
  data_state = json.loads((two / "checkpoints" / str(STEPS) / "data" / "metadata").read_text())
  assert (data_state["shuffle"], data_state["block_rows"], data_state["lanes"]) == ("block", 8, 4)


def test_processes_along_the_model_axis_are_refused(tmp_path, shard_folder):
  """mesh data=1 x model=4 over 2 processes: each process would need the whole batch, not its
  half; both stop at start with a message naming the mesh."""
  procs = multiprocess.start(_cmd(tmp_path / "w", shard_folder, "--config.mesh.data=1",
                                  "--config.mesh.model=4"), 2, 2)
  for p, (_, err) in zip(procs, multiprocess.finish(procs, TIMEOUT_S, check=False)):
    assert p.returncode != 0
    assert "mesh {'data': 1, 'model': 4} over 2 processes" in err, err[-2000:]
