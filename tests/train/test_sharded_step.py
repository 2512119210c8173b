"""The same train step on 1 device and on a (data=2, model=4) mesh of 8 fake CPU devices."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gsae_jax import sharding
from gsae_jax.data.sources import make_source
from gsae_jax.sae.spec import describe
from gsae_jax.train.loop import train


def _run(config, mesh):
  source = make_source(config, mesh)
  history = []
  state = train(config, mesh, source.batches, describe(config, source.d_in),
                lambda s, m: history.append(m))
  return state, history


@pytest.mark.parametrize("architecture", ["gated", "baseline"])
def test_mesh_2x4_equals_single_device(tiny_config, architecture):
  assert jax.device_count() == 8
  tiny_config.sae.architecture = architecture
  tiny_config.sae[architecture].l1_coefficient = 0.5
  single, hist1 = _run(tiny_config, sharding.make_mesh(1, 1))
  tiny_config.mesh.data, tiny_config.mesh.model = 2, 4
  sharded, hist8 = _run(tiny_config, sharding.make_mesh(2, 4))

  assert int(sharded.step) == 5
  assert sharded.params["W_dec"].sharding.spec == P("model", None)
  assert sharded.params["W_dec"].addressable_shards[0].data.shape == (16, 16)
  for name, value in single.params.items():
    np.testing.assert_allclose(sharded.params[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_allclose(sharded.tokens_since_fired, single.tokens_since_fired)
  for m1, m8 in zip(hist1, hist8):
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  # The step moved the parameters (the equality above is not trivially of the initial state).
  assert hist1[-1]["loss"] != hist1[0]["loss"]


def test_decoder_rows_unit_norm_after_training(tiny_config):
  state, _ = _run(tiny_config, sharding.make_mesh(2, 4))
  np.testing.assert_allclose(np.linalg.norm(state.params["W_dec"], axis=-1), 1.0, rtol=1e-5)


def test_b_dec_initialised_at_data_mean_without_skipping_data(tiny_config):
  tiny_config.sae.init_b_dec = "mean"
  tiny_config.sae.init_b_dec_batches = 2
  tiny_config.optim.lr = 1e-12  # so that b_dec stays where it was initialised
  mesh = sharding.make_mesh(2, 4)
  source = make_source(tiny_config, mesh)
  first = [next(source.batches) for _ in range(2)]
  source.batches.set_state({"step": 0})
  state = train(tiny_config, mesh, source.batches, describe(tiny_config, source.d_in))
  np.testing.assert_allclose(state.params["b_dec"], np.concatenate(first).mean(0), rtol=1e-4, atol=1e-6)
  assert source.batches.get_state() == {"step": 5}  # 5 training steps, the mean did not consume


@pytest.mark.parametrize("execution", ["vmap", "separate"])
def test_lambda_sweep_equals_separate_runs(tiny_config, execution):
  """One data pass over a lambda grid gives each member what a separate run would, its
  members batched or held apart (on the 8-device mesh either way)."""
  tiny_config.sweep.grid, tiny_config.sweep.execution = (0.2, 2.0), execution
  tiny_config.mesh.data, tiny_config.mesh.model = 2, 4
  sweep, hist = _run(tiny_config, sharding.make_mesh(2, 4))
  assert sweep.params["W_dec"].shape == (2, 64, 16)
  assert sweep.params["W_dec"].sharding.spec == P(None, "model", None)
  assert len(hist[-1]["l0"]) == 2 and hist[-1]["l0"][0] > hist[-1]["l0"][1]
  for i, lam in enumerate((0.2, 2.0)):
    single_config = tiny_config.copy_and_resolve_references()
    single_config.sweep.grid = ()
    single_config.sae.gated.l1_coefficient = lam
    single, _ = _run(single_config, sharding.make_mesh(2, 4))
    for name, value in single.params.items():
      np.testing.assert_allclose(sweep.params[name][i], value, rtol=1e-5, atol=1e-6, err_msg=name)
