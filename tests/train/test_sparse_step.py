"""The exact sparse train step (gsae_jax/train/paths.py) equals the dense one, for every
registered architecture, on 1 and 8 devices, including batches whose support overflows the
slots (the dense fallback). Parametrised over the registry, naming no architecture.

Five-step comparisons run in float64: in float32 the two paths' gradients agree to ~1e-7
(`test_one_float32_step_equals_dense`), but over several steps a feature whose gate
pre-activation is within rounding of 0 can fire in one run and not the other, and Adam's first
update of a feature is about lr * sign(g) whatever |g|, so that one flip moves a parameter by
~lr (seen: 4 of 256 b_mag entries at 1e-2 relative). float64 makes such a flip improbable, so
the comparison tests the math, not the rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsae_jax import sharding
from gsae_jax.kernels import rows
from gsae_jax.sae import features, registry
from gsae_jax.sae.spec import describe
from gsae_jax.train import optim, paths
from gsae_jax.train.state import create_train_state
from gsae_jax.train.step import compile_steps

NAMES = registry.names()
D_SAE, L0, STEPS = 256, 6, 5


def _setup(tiny_config, name, mesh_shape, dtype="float64"):
  c = tiny_config.copy_and_resolve_references()
  c.sae.architecture, c.sae.d_sae, c.sae.param_dtype = name, D_SAE, dtype
  c.mesh.data, c.mesh.model = mesh_shape
  cls = registry.get(name)
  for coef in cls.COEFFICIENTS:
    if coef.integer:  # TopK-like: L0 is k
      c.sae[name][coef.field] = L0
  c.train.feature_window_tokens = 64  # two batches: features go dead, AuxK has work to do
  mesh = sharding.make_mesh(*mesh_shape)
  spec, rules = describe(c, c.data.d_in), tuple(map(tuple, c.mesh.rules))
  tx = optim.make_optimizer(c.optim, 100, cls.UNIT_NORM_DECODER)
  xs = 2.0 * jax.random.normal(jax.random.key(7), (STEPS, c.train.batch_size, c.data.d_in),
                               jnp.dtype(dtype))
  return c, mesh, spec, rules, tx, xs


def _train(setup, choice):
  """(params, [sparse_step per step]) after STEPS steps from the same sparse-ish state."""
  c, mesh, spec, rules, tx, xs = setup
  state, shardings = create_train_state(spec, mesh, rules, tx)
  if spec.architecture.SUPPORT_BIAS:  # a trained SAE's sparsity, without training one
    params = paths.with_support_l0(spec, state.params, xs[0], L0)
    state = state.replace(params=jax.device_put(params, shardings.params))
  step = compile_steps(spec, mesh, shardings, rules, tx, c.train.feature_window_tokens,
                       choice).train
  took_sparse, dead = [], []
  for x in xs:
    state, metrics = step(state, x)
    took_sparse.append(float(metrics["sparse_step"]))
    dead.append(float(metrics["dead_fraction"]))
  return jax.device_get(state.params), took_sparse, dead


def _assert_params_close(got, want):
  for k, w in want.items():
    w, g = np.asarray(w), np.asarray(got[k])
    scale = max(float(np.max(np.abs(w))), 1e-30)
    assert float(np.max(np.abs(g - w))) / scale <= 1e-5, k


KERNELS = [False, True] if rows.available() else [False]  # CPU row kernels (gsae_jax/kernels)


def test_the_cpu_row_kernels_build_here():
  """CI and the dev machine have a C++ compiler: the kernel tests below must not go missing."""
  assert rows.available()


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", NAMES)
def test_one_float32_step_equals_dense(tiny_config, name, kernels):
  """In float32, one step's gradients on the slots equal the dense ones (the products are
  shared, so the gates see identical pre-activations)."""
  c, mesh, spec, rules, tx, xs = _setup(tiny_config, name, (1, 1), "float32")
  params = spec.init_params()
  if spec.architecture.SUPPORT_BIAS:
    params = paths.with_support_l0(spec, params, xs[0], L0)
  coefficients = spec.coefficients_at(jnp.asarray(10**6))
  dead = jnp.arange(D_SAE) % 3 == 0  # AuxK's dead latents too
  sparse = paths.PathChoice(True, capacity=32, dead_capacity=D_SAE, kernels=kernels)
  products, idx, _, needed = paths.find_support(params, xs[0], coefficients, dead,
                                                graphdef=spec.graphdef, choice=sparse)
  assert int(needed[0]) <= 32
  want, want_terms, _ = paths.loss_grads(params, xs[0], coefficients, dead,
                                         graphdef=spec.graphdef, choice=paths.PathChoice(False))
  got, got_terms, _ = paths.loss_grads(params, xs[0], coefficients, dead, graphdef=spec.graphdef,
                                       choice=sparse, products=products, idx=idx)
  _assert_params_close(got, want)
  for k, v in want_terms.items():
    np.testing.assert_allclose(got_terms[k], v, rtol=1e-5, err_msg=k)


def test_every_architecture_has_a_sparse_step(tiny_config):
  for name in NAMES:
    c = tiny_config.copy_and_resolve_references()
    c.sae.architecture = name
    assert describe(c, c.data.d_in).support_products(), name


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("mesh_shape,kernels", [((1, 1), k) for k in KERNELS] + [((2, 4), False)])
@pytest.mark.parametrize("name", NAMES)
def test_sparse_step_equals_dense(tiny_config, name, mesh_shape, kernels):
  setup = _setup(tiny_config, name, mesh_shape)
  dense, dense_flags, _ = _train(setup, paths.PathChoice(sparse=False))
  sparse, sparse_flags, dead = _train(setup, paths.PathChoice(True, capacity=32,
                                                              dead_capacity=D_SAE,
                                                              kernels=kernels))
  assert dense_flags == [0.0] * STEPS
  assert sparse_flags == [1.0] * STEPS  # every step on the slots, none fell back
  _assert_params_close(sparse, dense)
  assert max(dead) > 0  # the dead-latent view (AuxK) was exercised too
  init = setup[2].init_params()  # training moved the weights: not two initial states compared
  assert np.max(np.abs(np.asarray(dense["W_dec"]) - np.asarray(init["W_dec"]))) > 1e-4


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", NAMES)
def test_overflowing_slots_fall_back_to_dense(tiny_config, name, kernels):
  """With 2 slots per token every support overflows: each step takes the dense path on the
  support search's products, and the result is still the dense step's."""
  setup = _setup(tiny_config, name, (1, 1))
  dense, _, _ = _train(setup, paths.PathChoice(sparse=False))
  fallback, flags, _ = _train(setup, paths.PathChoice(True, capacity=2, dead_capacity=D_SAE,
                                                      kernels=kernels))
  assert flags == [0.0] * STEPS
  _assert_params_close(fallback, dense)


SPLIT = [n for n in NAMES if registry.get(n).POSITIVE_SUPPORT and registry.get(n).TOKENWISE_LOSS]


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", SPLIT)
def test_split_step_equals_dense(tiny_config, name, kernels):
  """Two outlier tokens per batch (10x the norm) light up far more features than the 32 slots
  hold, the other tokens fit: each step runs those two dense and the rest on the slots
  (`sparse_step` = the share on the slots), and the result is still the dense step's."""
  c, mesh, spec, rules, tx, xs = _setup(tiny_config, name, (1, 1))
  xs = xs.at[:, 3:5].multiply(10.0)
  setup = (c, mesh, spec, rules, tx, xs)
  batch = xs.shape[1]
  dense, _, _ = _train(setup, paths.PathChoice(sparse=False))
  split, flags, _ = _train(setup, paths.PathChoice(True, capacity=32, dead_capacity=D_SAE,
                                                   kernels=kernels, split_rows=2))
  assert flags == [(batch - 2) / batch] * STEPS
  _assert_params_close(split, dense)
  _, too_few, _ = _train(setup, paths.PathChoice(True, capacity=32, dead_capacity=D_SAE,
                                                 kernels=kernels, split_rows=1))
  assert too_few == [0.0] * STEPS  # one dense row cannot hold both outliers: the dense step


def test_too_many_dead_latents_fall_back_to_dense(tiny_config):
  """AuxK's dead-latent view holds dead_capacity features; more dead ones: the dense step."""
  name = next(n for n in NAMES if registry.get(n).SUPPORT_BIAS is None)  # one with AuxK
  setup = _setup(tiny_config, name, (1, 1))
  dense, _, _ = _train(setup, paths.PathChoice(sparse=False))
  capped, flags, dead = _train(setup, paths.PathChoice(True, capacity=32, dead_capacity=1))
  assert flags[0] == 1.0 and 0.0 in flags  # no dead latents at first, then too many
  _assert_params_close(capped, dense)


def test_auto_path_is_dense_for_small_dictionaries_and_sparse_for_large(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  assert not paths.choose(c.train, describe(c, c.data.d_in)).sparse  # d_sae 64
  c.sae.d_sae = 65536
  choice = paths.choose(c.train, describe(c, c.data.d_in))
  assert choice.sparse and choice.capacity == 128
  assert choice.split_rows == c.train.batch_size // 32 > 0
  c.train.path = "dense"
  assert not paths.choose(c.train, describe(c, c.data.d_in)).sparse


def test_auto_on_accelerators_follows_their_measurements(tiny_config, monkeypatch):
  """On an H200 the sparse step won only from d_sae / K = 2048 and one batch part was fastest."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  c = tiny_config.copy_and_resolve_references()
  c.train.batch_size, c.train.batch_chunks = 4096, 0
  c.sae.d_sae = 65536  # Gated, 128 slots: 1/512 of the dictionary, sparse on CPU
  choice = paths.choose(c.train, describe(c, c.data.d_in))
  assert not choice.sparse and choice.batch_chunks == 1
  c.sae.architecture, c.sae.topk.k = "topk", 32  # 1/2048
  assert paths.choose(c.train, describe(c, c.data.d_in)).sparse
  assert paths.member_execution(c.sweep, paths.PathChoice(False)) == "vmap"
  assert paths.member_execution(c.sweep, paths.PathChoice(True)) == "sequential"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert paths.choose(c.train, describe(c, c.data.d_in)).sparse
  c.sae.architecture = "gated"
  choice = paths.choose(c.train, describe(c, c.data.d_in))
  assert choice.sparse and choice.batch_chunks == 1
  c.train.path = "dense"
  assert paths.choose(c.train, describe(c, c.data.d_in)).batch_chunks == 4
  assert paths.member_execution(c.sweep, paths.PathChoice(False)) == "separate"


def test_sparse_path_refused_where_the_gradient_is_dense(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  c.sae.gated.gate_backward = "straight_through"
  c.train.path = "sparse"
  with pytest.raises(ValueError, match="no sparse step"):
    paths.choose(c.train, describe(c, c.data.d_in))
  c.train.path = "auto"
  assert not paths.choose(c.train, describe(c, c.data.d_in)).sparse


def test_with_support_l0_sets_the_support_size(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  c.sae.d_sae = D_SAE
  spec = describe(c, c.data.d_in)
  x = jax.random.normal(jax.random.key(0), (512, c.data.d_in))
  params = paths.with_support_l0(spec, spec.init_params(), x, 10)
  score = nnx.merge(spec.graphdef, params).support_score(x, spec.coefficients_at(jnp.asarray(0)),
                                                         features.Recorder())
  assert abs(float(jnp.mean(jnp.sum(score > 0, axis=-1))) - 10) < 0.1


@pytest.mark.parametrize("name", [n for n in NAMES if registry.get(n).TOKENWISE_LOSS])
def test_batch_chunks_equal_one_pass(tiny_config, name):
  """Gradients accumulated over 4 parts of the batch (dense and sparse) equal one pass."""
  setup = _setup(tiny_config, name, (2, 1))
  whole, _, _ = _train(setup, paths.PathChoice(sparse=False))
  for sparse in (False, True):
    chunked, flags, _ = _train(setup, paths.PathChoice(sparse, capacity=32, dead_capacity=D_SAE,
                                                       batch_chunks=4))
    assert flags == [float(sparse)] * STEPS
    _assert_params_close(chunked, whole)


def test_batch_chunks_refused_for_batch_level_selection(tiny_config):
  name = next(n for n in NAMES if not registry.get(n).TOKENWISE_LOSS)
  c = tiny_config.copy_and_resolve_references()
  c.sae.architecture, c.train.batch_chunks = name, 2
  with pytest.raises(ValueError, match="not a mean over tokens"):
    paths.choose(c.train, describe(c, c.data.d_in))
  c.train.batch_chunks = 0
  assert paths.choose(c.train, describe(c, c.data.d_in)).batch_chunks == 1
  c.sae.architecture, c.train.batch_size = NAMES[0], 8192
  assert paths.choose(c.train, describe(c, c.data.d_in), data_parallel=2).batch_chunks == 4
  c.train.path = "sparse"  # its temporaries are small: no parts unless asked
  assert paths.choose(c.train, describe(c, c.data.d_in), data_parallel=2).batch_chunks == 1


def test_slot_buckets():
  assert paths.slot_buckets(128) == (32, 48, 64, 96, 128)
  assert paths.slot_buckets(5) == (1, 2, 3, 5)


def test_bf16_compute_runs_matmuls_in_bf16(tiny_config):
  """compute_dtype bf16: gradients close to float32's but not equal (the matmuls ran in bf16),
  and every gradient stays float32."""
  c, mesh, spec, rules, tx, xs = _setup(tiny_config, NAMES[0], (1, 1), "float32")
  params, dead = spec.init_params(), jnp.zeros((D_SAE,), bool)
  coefficients = spec.coefficients_at(jnp.asarray(10**6))
  f32, _, _ = paths.loss_grads(params, xs[0], coefficients, dead, graphdef=spec.graphdef,
                               choice=paths.PathChoice(False))
  bf16, _, _ = paths.loss_grads(params, xs[0], coefficients, dead, graphdef=spec.graphdef,
                                choice=paths.PathChoice(False, compute_dtype=jnp.bfloat16))
  w = np.asarray(f32["W_dec"])
  assert bf16["W_dec"].dtype == jnp.float32
  diff = float(np.max(np.abs(np.asarray(bf16["W_dec"]) - w))) / float(np.max(np.abs(w)))
  assert 1e-5 < diff < 5e-2, diff
