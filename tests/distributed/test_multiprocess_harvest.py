"""Multi-host harvest through the real `launch/harvest.py`: 2 CPU processes x 2 fake devices (gloo
collectives), the tiny GPT-2 on a data=2 x model=2 mesh under fsdp_tp, write the same rows,
shards and manifest as 1 process x 4 fake devices on the same mesh; after a kill -9 of one
process mid-harvest, re-running both gives that folder again. Plus, in this process: the LM's
parameters are placed slice by slice, and activations come back cast on the device."""

import json
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from gsae_jax.data import harvest, shards
from tests import multiprocess

TIMEOUT_S = 120
# 16-token windows, 2 per shard, 4 per LM call (2 per process): ~80 shards, ~40 per process.
FLAGS = ["--config=experiments/harvest_gemma3_270m.py", "--config.layer=1",
         "--config.site=resid_post", "--config.context_length=16", "--config.num_tokens=2400",
         "--config.windows_per_shard=2", "--config.batch_size=4", "--config.mesh.data=2",
         "--config.mesh.model=2", "--config.mesh.strategy=fsdp_tp",
         "--config.normalise_sample_tokens=512"]


def _start(model: str, out, processes: int, devices: int) -> list[subprocess.Popen]:
  cmd = [sys.executable, "-m", "launch.harvest", *FLAGS, f"--config.model={model}",
         f"--config.output_dir={out}"]
  return multiprocess.start(cmd, processes, devices)


def _finish(procs: list[subprocess.Popen]) -> list[str]:
  """stdout of each process, after checking that all succeeded."""
  return [out for out, _ in multiprocess.finish(procs, TIMEOUT_S)]


def _files(folder) -> dict[str, bytes]:
  """Every file's bytes, the folder's own path in the manifest (config.output_dir) masked."""
  return {str(p.relative_to(folder)): p.read_bytes().replace(str(folder).encode(), b"<out>")
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _rows_by_position(folder) -> dict[tuple[int, int], bytes]:
  """(window, position) -> the row's bytes, over every shard (through the ctx files)."""
  m = shards.read_manifest(str(folder))
  d, itemsize = m["d_model"], shards.DTYPES[m["dtype"]].itemsize
  out = {}
  for entry in m["shards"]:
    ctx = shards.read_ctx(str(folder), entry)
    acts = (folder / entry["file"]).read_bytes()
    for r, (window, position, _) in enumerate(ctx):
      out[int(window), int(position)] = acts[r * d * itemsize:(r + 1) * d * itemsize]
  return out


@pytest.fixture(scope="module")
def one_process(tiny_lm, tmp_path_factory):
  """The folder one process with 4 fake devices writes."""
  out = tmp_path_factory.mktemp("one") / "shards"
  stdout, = _finish(_start(tiny_lm, out, processes=1, devices=4))
  assert "harvested 2,400 tokens of blocks.1.resid_post" in stdout
  return out


def test_two_processes_write_the_rows_of_one(tiny_lm, tmp_path, one_process):
  out = tmp_path / "shards"
  stdouts = _finish(_start(tiny_lm, out, processes=2, devices=2))
  assert "harvested 2,400 tokens" in stdouts[0] and "harvested" not in stdouts[1]  # 0 reports
  want, got = _rows_by_position(one_process), _rows_by_position(out)
  assert len(want) == 2400 and sorted(got) == sorted(want)
  different = [k for k in want if got[k] != want[k]]
  assert not different, f"{len(different)} rows differ, e.g. (window, position) {different[:3]}"
  assert _files(out) == _files(one_process)  # shards, manifest; no progress or temp files left
  m = json.loads((out / "manifest.json").read_text())
  assert m["complete"] and len(m["shards"]) > 8  # several shards per process


def test_kill_one_process_then_rerun_gives_the_same_folder(tiny_lm, tmp_path, one_process):
  out = tmp_path / "shards"
  procs = _start(tiny_lm, out, processes=2, devices=2)
  part = out / harvest.PROGRESS_DIR / "process_1.json"
  deadline = time.time() + TIMEOUT_S
  try:
    while not part.exists():  # process 1 has finished a shard: kill it mid-harvest
      assert time.time() < deadline and procs[1].poll() is None, procs[1].stderr.read()[-3000:]
      time.sleep(0.005)
    procs[1].kill()
    procs[1].wait()
    try:  # process 0 stops by itself (the collective fails) or waits: kill it too
      procs[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
      procs[0].kill()
      procs[0].wait()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert not json.loads((out / "manifest.json").read_text())["complete"]
  stopped = json.loads(part.read_text())["shards"]
  assert stopped and all(int(k) % 2 == 1 for k in stopped)  # process 1 owns the odd shards

  _finish(_start(tiny_lm, out, processes=2, devices=2))
  assert _files(out) == _files(one_process)


def test_lm_parameters_are_placed_slice_by_slice(tiny_lm):
  """On a data=2 x model=4 mesh under fsdp_tp each device holds its slice of every matrix, not
  the whole; activations cast on the device come back in the storage dtype."""
  from gsae_jax import lm, sharding
  from gsae_jax.lm import partition

  mesh = sharding.make_mesh(2, 4)
  model, _ = lm.load(tiny_lm, mesh=mesh, strategy="fsdp_tp")
  sliced = 0
  for path, var in nnx.to_flat_state(model.params):
    name, value = ".".join(str(k) for k in path), var.get_value()
    spec = partition.spec_for(name, value.shape, mesh, "fsdp_tp")
    expected = jax.sharding.NamedSharding(mesh, spec).shard_shape(value.shape)
    assert all(s.data.shape == expected for s in value.addressable_shards), name
    sliced += expected != value.shape
  assert sliced >= 10  # embeddings, q/k/v/o and MLP kernels of both layers are split

  tokens = np.arange(4 * 16, dtype=np.int32).reshape(4, 16) % 50
  site = "blocks.1.resid_post"
  full = np.asarray(model.activations(tokens, [site])[site])
  cast = model.activations(tokens, [site], dtype=jnp.bfloat16)[site]
  assert full.dtype == np.float32 and cast.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(cast), full.astype(ml_dtypes.bfloat16))
