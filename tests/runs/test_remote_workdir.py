"""A workdir on an object store (gs://, s3://) goes through `etils.epath`: here the local file
system through that same code path, by making `storage.is_local` answer False for the workdir."""

import json
import os

import numpy as np
import pytest

from gsae_jax.data import storage
from gsae_jax.runs import training


@pytest.fixture
def remote(tmp_path, monkeypatch):
  """A folder that every storage call treats as remote (epath, no flock, no appends)."""
  folder = str(tmp_path / "bucket")
  local = storage.is_local
  seen = []

  def is_local(path):
    if os.fspath(path).startswith(folder):
      seen.append(os.fspath(path))
      return False
    return local(path)
  monkeypatch.setattr(storage, "is_local", is_local)
  return folder, seen


def test_training_in_a_remote_workdir_resumes_like_a_local_one(tiny_config, tmp_path, remote):
  folder, seen = remote
  c = tiny_config.copy_and_resolve_references()
  c.train.steps, c.checkpoint.save_every, c.train.log_every = 4, 2, 1
  c.checkpoint.async_save = False
  training.run(c, str(tmp_path / "local"))

  workdir = os.path.join(folder, "run")
  first = c.copy_and_resolve_references()
  first.train.steps = 2
  training.run(first, workdir)
  training.run(c, workdir, allow_changes=("train.steps",))  # resumes from step 2

  assert seen, "the remote code path was not taken"
  assert not os.path.exists(os.path.join(workdir, ".lock"))  # object stores have no locks
  assert not [n for n in os.listdir(workdir) if n.endswith(".tmp")]
  remote_params = np.load(os.path.join(workdir, "params.npz"))
  local_params = np.load(tmp_path / "local" / "params.npz")
  for name in local_params.files:
    np.testing.assert_array_equal(remote_params[name], local_params[name], err_msg=name)
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == [1, 2, 3, 4]  # the second run's lines appended to the first run's
  events = [json.loads(line)["event"] for line in open(os.path.join(workdir, "history.jsonl"))]
  assert events == ["started", "changed"]
  assert json.load(open(os.path.join(workdir, "run.json")))["identity"]["train.steps"] == 4
