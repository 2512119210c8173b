"""Every registered SAE architecture through the whole framework: sharded training, checkpoint
resume, a sweep over its first coefficient, .npz and SAELens export/import, and the memory plan.

Parametrised over `registry.names()` and naming no architecture, so that a new registry entry
is tested here without editing this file. Uses the tiny synthetic config of tests/conftest.py.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from experiments import synthetic
from gsae_jax import configs, export, plan, sharding
from gsae_jax.checkpoint import Checkpointer
from gsae_jax.data.sources import make_source
from gsae_jax.sae import registry
from gsae_jax.sae.spec import describe
from gsae_jax.train.loop import train
from tests.distributed.test_plan import assert_plan_agrees_with_xla
from tests.saelens_check import assert_saelens_matches_ours

NAMES = registry.names()
# Architectures SAELens has (the import test needs a folder SAELens itself wrote).
SAELENS_NAMES = tuple(n for n in NAMES if registry.get(n).SAELENS_ARCHITECTURE is not None)
SCALE = 2.5  # normalisation constant folded into SAELens exports
_SINGLE_DEVICE_RUNS = {}  # name -> (state, history): one 5-step 1-device run per architecture


def _config(tiny_config, name):
  """A copy of the tiny synthetic config training architecture `name` (its block's defaults)."""
  c = tiny_config.copy_and_resolve_references()
  c.sae.architecture = name
  return c


def _run(config, mesh_shape=(1, 1), **train_kwargs):
  """(final state, [{step, metrics}]) of `train` on a `mesh_shape` mesh and a fresh source."""
  config.mesh.data, config.mesh.model = mesh_shape
  mesh = sharding.make_mesh(*mesh_shape)
  source = make_source(config, mesh)
  history = []
  state = train(config, mesh, source.batches, describe(config, source.d_in),
                lambda step, m: history.append({"step": step, **m}), **train_kwargs)
  return state, history


def _single_device_run(tiny_config, name):
  """The 5-step 1-device run of `name`, trained once per module (also the resume test's
  uninterrupted reference)."""
  if name not in _SINGLE_DEVICE_RUNS:
    _SINGLE_DEVICE_RUNS[name] = _run(_config(tiny_config, name))
  return _SINGLE_DEVICE_RUNS[name]


def _spec(tiny_config, name):
  config = _config(tiny_config, name)
  return describe(config, config.data.d_in)


def _encoder_weights(spec):
  """The names of the spec's [d_in, d_sae] parameters (declared optional ones may be absent)."""
  return [k for k in spec.abstract_params if tuple(spec.logical_axes[k]) == ("d_in", "features")]


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("name", NAMES)
def test_mesh_2x4_equals_single_device(tiny_config, name):
  assert jax.device_count() == 8
  single, hist1 = _single_device_run(tiny_config, name)
  sharded, hist8 = _run(_config(tiny_config, name), (2, 4))

  assert int(sharded.step) == int(single.step) == 5
  assert sharded.params["W_dec"].sharding.spec == P("model", None)
  assert sharded.params["W_dec"].addressable_shards[0].data.shape == (16, 16)
  assert sharded.params.keys() == single.params.keys()
  for k, value in single.params.items():
    np.testing.assert_allclose(sharded.params[k], value, rtol=1e-5, atol=1e-6, err_msg=k)
  np.testing.assert_array_equal(sharded.tokens_since_fired, single.tokens_since_fired)
  assert [m["step"] for m in hist8] == [m["step"] for m in hist1] == [1, 2, 3, 4, 5]
  for m1, m8 in zip(hist1, hist8):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  # Training moved the weights, so the equality above is not that of two initial states.
  spec = _spec(tiny_config, name)
  init = spec.init_params()
  for k in ["W_dec", *_encoder_weights(spec)]:
    assert np.max(np.abs(np.asarray(single.params[k]) - init[k])) > 1e-4, k
  assert hist1[-1]["loss"] != hist1[0]["loss"]


def _checkpointed_run(config, directory, stop_after=None):
  """`_run` saving every 3 steps into `directory` (resuming from it); a preemption is
  requested after `stop_after` steps of this call."""
  ckpt = Checkpointer(str(directory), save_every=3, keep=5)
  calls = []

  def stop_requested():
    calls.append(1)
    return len(calls) == stop_after

  try:
    state, history = _run(config, checkpointer=ckpt, stop_requested=stop_requested)
  finally:
    ckpt.close()
  return state, history, ckpt.steps()


@pytest.mark.parametrize("name", NAMES)
def test_resume_is_bit_identical(tiny_config, tmp_path, name):
  """Stopped after step 3 of 5 (train.steps stays 5: same schedules), then resumed by a new
  `train` call with a fresh source and Checkpointer: the whole state equals an uninterrupted
  run's (the cached 1-device run) bit for bit."""
  whole, _ = _single_device_run(tiny_config, name)
  config = _config(tiny_config, name)
  stopped, _, steps = _checkpointed_run(config, tmp_path, stop_after=3)
  assert int(stopped.step) == 3 and steps == [3]
  resumed, history, steps = _checkpointed_run(config, tmp_path)
  assert [m["step"] for m in history] == [4, 5] and steps == [3, 5]

  assert int(resumed.step) == 5
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(whole), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))


def _two_values(cls, block):
  """(the first coefficient, two valid values of it for a sweep)."""
  coef = cls.COEFFICIENTS[0]
  if coef.integer:
    return coef, (2, 8)  # both well within the tiny d_sae = 64
  value = block[coef.field]
  return coef, ((0.1, 1.0) if value == 0 else (0.2 * value, 2.0 * value))


@pytest.mark.parametrize("name", NAMES)
def test_sweep_members_equal_separate_runs(tiny_config, name):
  """One data pass over two values of the first coefficient gives each member what a separate
  run at that value gives."""
  config = _config(tiny_config, name)
  coef, grid = _two_values(registry.get(name), config.sae[name])
  config.sweep.grid = grid
  sweep, hist = _run(config, (2, 4))
  assert sweep.params["W_dec"].shape == (2, 64, 16)
  assert sweep.params["W_dec"].sharding.spec == P(None, "model", None)
  assert len(hist[-1]["loss"]) == 2 and hist[-1]["loss"][0] != hist[-1]["loss"][1]

  for i, value in enumerate(grid):
    single_config = config.copy_and_resolve_references()
    single_config.sweep.grid = ()
    single_config.sae[name][coef.field] = value
    single, _ = _run(single_config, (2, 4))
    for k, v in single.params.items():
      np.testing.assert_allclose(sweep.params[k][i], v, rtol=1e-5, atol=1e-6,
                                 err_msg=f"{coef.name}={value}: {k}")


# ----------------------------------------------------------------------------- export

def _perturbed(spec, seed=0):
  """Initial params moved as training would, keeping every parameter valid: strictly positive
  arrays (scales, thresholds) get a positive factor, other nnx.Param arrays Gaussian noise, and
  other `Statistic` arrays (e.g. a threshold estimated from 0) only grow."""
  trained = set(nnx.to_pure_dict(nnx.state(spec.build(), nnx.Param)))
  params = spec.init_params()
  keys = jax.random.split(jax.random.key(seed + 1), len(params))
  out = {}
  for (k, v), key in zip(sorted(params.items()), keys):
    v = np.asarray(v)
    z = 0.2 * np.asarray(jax.random.normal(key, v.shape))
    if np.all(v > 0):
      new = v * np.exp(z)
    elif k in trained:
      new = v + z
    else:
      new = v + np.abs(z)
    out[k] = new.astype(v.dtype)
  return out


def _raw_activations(d_in, seed=0):
  """[64, d_in] raw activations (normalised ones are SCALE times these)."""
  return (np.random.default_rng(seed).normal(size=(64, d_in)) / SCALE + 0.1).astype(np.float32)


def _saelens_metadata():
  return {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post", "context_size": 16}


@pytest.mark.parametrize("name", NAMES)
def test_export_round_trips(tiny_config, tmp_path, name):
  cls, spec = registry.get(name), _spec(tiny_config, name)
  params = _perturbed(spec)
  export.save_npz(str(tmp_path / "sae.npz"), params, spec, {"normalisation_scale": SCALE})
  assert json.load(open(tmp_path / "sae.json"))["architecture"] == name
  loaded, meta, npz_spec = export.load_npz(str(tmp_path / "sae.npz"))
  # (as JSON holds it: a tuple field of the block comes back a list)
  assert meta == json.loads(json.dumps({"normalisation_scale": SCALE, **spec.metadata()}))
  assert npz_spec.name == name and npz_spec.block == spec.block
  assert loaded.keys() == params.keys()
  for k in params:
    np.testing.assert_array_equal(loaded[k], params[k], err_msg=k)
    assert loaded[k].dtype == params[k].dtype, k

  folder = str(tmp_path / "saelens")
  if cls.SAELENS_ARCHITECTURE is None:
    with pytest.raises(ValueError, match=f"SAELens has no {name} SAE"):
      export.save_saelens(folder, params, spec, scale=SCALE, metadata=_saelens_metadata())
    return
  export.save_saelens(folder, params, spec, scale=SCALE, metadata=_saelens_metadata())
  cfg = json.load(open(os.path.join(folder, "cfg.json")))
  assert cfg["architecture"] == cls.SAELENS_ARCHITECTURE
  assert cfg["metadata"]["gsae_jax_architecture"] == name

  assert_saelens_matches_ours(folder, spec, params, SCALE, _raw_activations(spec.d_in))

  back, back_cfg, back_spec = export.load_saelens(folder, scale=SCALE)
  assert back_spec.name == name and back_spec.block == spec.block
  assert back_cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
  assert back.keys() == params.keys()
  for k in params:
    np.testing.assert_allclose(back[k], params[k], rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", SAELENS_NAMES)
def test_import_of_folder_saved_by_saelens(tiny_config, tmp_path, name):
  """A folder written by SAELens' own `save_model` (our metadata stripped) imports as an SAE
  whose encode and decode equal SAELens' on raw activations."""
  from sae_lens import SAE

  cls, spec = registry.get(name), _spec(tiny_config, name)
  export.save_saelens(str(tmp_path / "ours"), _perturbed(spec), spec, scale=SCALE,
                      metadata=_saelens_metadata())
  sae = SAE.load_from_disk(str(tmp_path / "ours"))
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():  # weights of their own, not ours
    for p in (sae.W_enc, sae.b_dec):
      p.add_(0.1 * torch.randn(p.shape, generator=generator))
  folder = tmp_path / "theirs"
  sae.save_model(folder)
  cfg = json.load(open(folder / "cfg.json"))
  cfg["metadata"] = {k: v for k, v in cfg["metadata"].items() if not k.startswith("gsae_jax")}
  json.dump(cfg, open(folder / "cfg.json", "w"))

  params, _, imported = export.load_saelens(str(folder), scale=SCALE)
  assert imported.architecture.SAELENS_ARCHITECTURE == cls.SAELENS_ARCHITECTURE
  assert_saelens_matches_ours(str(folder), imported, params, SCALE,
                              _raw_activations(spec.d_in, seed=1))


def test_saelens_architecture_we_do_not_have_is_refused(tmp_path):
  d_in, d_sae = 4, 8
  save_file({"W_enc": np.zeros((d_in, d_sae), np.float32),
             "W_dec": np.zeros((d_sae, d_in), np.float32),
             "b_dec": np.zeros((d_in,), np.float32)}, str(tmp_path / "sae_weights.safetensors"))
  json.dump({"architecture": "matching_pursuit", "d_in": d_in, "d_sae": d_sae,
             "metadata": {}}, open(tmp_path / "cfg.json", "w"))
  with pytest.raises(ValueError, match="'matching_pursuit'") as e:
    export.load_saelens(str(tmp_path))
  for known in {registry.get(n).SAELENS_ARCHITECTURE for n in NAMES} - {None}:
    assert known in str(e.value)


def test_unknown_architecture_fails_validation(tiny_config):
  tiny_config.sae.architecture = "no_such_sae"
  with pytest.raises(ValueError, match="config.sae.architecture") as e:
    configs.validate(tiny_config, {"data": 1, "model": 1})
  assert "'no_such_sae'" in str(e.value) and str(NAMES) in str(e.value)


# ----------------------------------------------------------------------------- plan

@pytest.mark.parametrize("name", NAMES)
def test_plan_agrees_with_xla_memory_analysis(name):
  c = synthetic.get_config()
  c.sae.architecture, c.sae.d_sae, c.train.batch_size = name, 4096, 512
  assert_plan_agrees_with_xla(c, 64, (2, 4))


@pytest.mark.parametrize("name", NAMES)
def test_dry_run_fits_and_names_the_architecture(tiny_config, capsys, name):
  config = _config(tiny_config, name)
  config.mesh.data, config.mesh.model = 2, 4
  assert plan.dry_run_sae(config, 8, None) is None
  out = capsys.readouterr().out
  assert f"{name} SAE d_in=16 d_sae=64" in out and "mesh {'data': 2, 'model': 4}" in out


@pytest.mark.parametrize("name", NAMES)
def test_saelens_training_class_exists(name):
  """The benchmarks time SAELens' training SAE named by SAELENS_TRAINING_ARCHITECTURE."""
  from sae_lens import registry as saelens_registry
  training = registry.get(name).SAELENS_TRAINING_ARCHITECTURE
  assert training is None or training in saelens_registry.SAE_TRAINING_CLASS_REGISTRY, training
