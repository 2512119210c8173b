"""A sweep's members run vmapped, one after another in one program, or as separate states
(`sweep.execution`) with the same result, on the dense and on the sparse path."""

import jax
import numpy as np
import pytest

from gsae_jax import configs, sharding
from gsae_jax.sae import registry
from gsae_jax.sae.spec import describe
from gsae_jax.train import optim, paths
from gsae_jax.train.state import create_train_state
from gsae_jax.train.step import compile_steps

STEPS = 3
EXECUTIONS = ["vmap", "sequential", "separate"]


def _sweep(tiny_config, name, execution, choice, dtype="float32"):
  c = tiny_config.copy_and_resolve_references()
  c.sae.architecture, c.sae.param_dtype = name, dtype
  coef = registry.get(name).COEFFICIENTS[0]
  c.sweep.grid = (2, 3, 5) if coef.integer else (0.5, 1.0, 2.0)
  mesh = sharding.make_mesh(1, 1)
  spec, rules = describe(c, c.data.d_in), tuple(map(tuple, c.mesh.rules))
  tx = optim.make_optimizer(c.optim, 100, spec.architecture.UNIT_NORM_DECODER)
  state, shardings = create_train_state(spec, mesh, rules, tx)
  compiled = compile_steps(spec, mesh, shardings, rules, tx, c.train.feature_window_tokens,
                           choice, execution)
  xs = jax.random.normal(jax.random.key(3), (STEPS, c.train.batch_size, c.data.d_in), dtype)
  held = compiled.hold(state)
  for x in xs:
    held, metrics = compiled.train(held, x)
    held = compiled.resample(held, x)  # TopK's members have dead features from step 2 on
  state = compiled.release(held)
  assert np.asarray(state.step).tolist() == [STEPS] * 3
  assert np.asarray(metrics["loss"]).shape == (3,)
  # every leaf of the state (parameters, Adam moments, rng, firing statistics), by its path
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  return {jax.tree_util.keystr(k): v for k, v in leaves}, np.asarray(metrics["sparse_step"])


@pytest.mark.parametrize("name", ["gated", "topk"])
def test_sequential_and_separate_members_equal_vmapped(tiny_config, name):
  dense = paths.PathChoice(False)
  vmapped, _ = _sweep(tiny_config, name, "vmap", dense)
  for execution in ("sequential", "separate"):
    other, _ = _sweep(tiny_config, name, execution, dense)
    for k, v in vmapped.items():
      np.testing.assert_allclose(other[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{execution} {k}")


@pytest.mark.parametrize("execution", EXECUTIONS)
def test_sparse_sweep_takes_the_sparse_path_for_every_member(tiny_config, execution):
  """k = 2, 3, 5 of 64 features: every member's support fits 5 slots. float64, as in
  tests/train/test_sparse_step.py (float32 rounding at the selection's edge is chaotic)."""
  with jax.enable_x64(True):
    dense, _ = _sweep(tiny_config, "topk", execution, paths.PathChoice(False), "float64")
    sparse, flags = _sweep(tiny_config, "topk", execution,
                           paths.PathChoice(True, capacity=5, dead_capacity=64), "float64")
  assert flags.tolist() == [1.0, 1.0, 1.0]
  for k, v in dense.items():
    np.testing.assert_allclose(sparse[k], v, rtol=1e-5, atol=1e-8, err_msg=k)


@pytest.mark.parametrize("kernels", [False, True])
@pytest.mark.parametrize("execution", EXECUTIONS)
def test_members_whose_support_overflows_take_the_dense_step(tiny_config, execution, kernels):
  """k = 2, 3, 5 with 4 slots: members k = 2, 3 take the sparse step, k = 5 the dense one, in
  the same step, and the sweep still equals the dense one."""
  with jax.enable_x64(True):
    dense, _ = _sweep(tiny_config, "topk", execution, paths.PathChoice(False), "float64")
    mixed, flags = _sweep(tiny_config, "topk", execution,
                          paths.PathChoice(True, capacity=4, dead_capacity=64, kernels=kernels),
                          "float64")
  assert flags.tolist() == [1.0, 1.0, 0.0]
  for k, v in dense.items():
    np.testing.assert_allclose(mixed[k], v, rtol=1e-5, atol=1e-8, err_msg=k)


def test_unknown_execution_fails_validation(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  c.sweep.execution = "parallel"
  with pytest.raises(ValueError, match="sweep.execution"):
    configs.validate(c, {"data": 1, "model": 1})
