"""BatchTopK SAE (Bussmann et al. 2024): top B k over the batch, the threshold estimate, and
inference with it reproducing the training L0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsae_jax import sharding
from gsae_jax.data.sources import make_source
from gsae_jax.sae.batchtopk import BatchTopKSAE
from gsae_jax.sae.spec import describe
from gsae_jax.train import optim
from gsae_jax.train.loop import train
from gsae_jax.train.state import create_train_state
from gsae_jax.train.step import train_step
from tests.sae.test_topk import (BATCH, D_SAE, assert_saelens_round_trip, build, inputs,
                                 pre_activations)


def test_keeps_exactly_batch_times_k_in_total():
  graphdef, p = build("batchtopk", k=3)
  x = inputs()
  _, out = nnx.merge(graphdef, p).loss_terms(x, {"k": 3, "aux_k": 1 / 32})
  a = np.maximum(pre_activations(p, x), 0).ravel()
  expected = np.zeros_like(a)
  top = np.argsort(-a)[:BATCH * 3]
  expected[top] = a[top]
  f = np.asarray(out["f"])
  np.testing.assert_allclose(f, expected.reshape(f.shape), rtol=1e-5, atol=1e-6)
  per_token = (f > 0).sum(-1)
  assert per_token.sum() == BATCH * 3 and per_token.min() < 3 < per_token.max()
  np.testing.assert_allclose(out["min_kept"], f[f > 0].min(), rtol=1e-6)


def test_masked_k_equals_a_module_built_at_that_k():
  x, dead = inputs(), jnp.arange(D_SAE) % 4 == 0
  graphdef8, p = build("batchtopk", k=8)
  graphdef3, _ = build("batchtopk", k=3)
  want_terms, want = nnx.merge(graphdef3, p).loss_terms(x, {"k": 3, "aux_k": 0.5}, dead)
  got_terms, got = jax.jit(lambda k: nnx.merge(graphdef8, p).loss_terms(
      x, {"k": k, "aux_k": 0.5}, dead))(jnp.int32(3))
  # (jit and eager matmuls differ in the last bit: the kept set must be the same)
  np.testing.assert_array_equal(np.asarray(got["f"]) > 0, np.asarray(want["f"]) > 0)
  np.testing.assert_allclose(got["f"], want["f"], rtol=1e-6)
  np.testing.assert_allclose(got["min_kept"], want["min_kept"], rtol=1e-6)
  for name in want_terms:
    np.testing.assert_allclose(got_terms[name], want_terms[name], rtol=1e-6)


def test_threshold_is_a_running_estimate_of_the_smallest_kept_activation():
  sae = BatchTopKSAE(16, 64, rngs=nnx.Rngs(0))  # threshold_rate 0.01
  assert float(sae.threshold[...]) == 0.0  # not estimated yet
  sae.update_statistics({"min_kept": jnp.float32(2.0)})
  assert float(sae.threshold[...]) == 2.0  # the first batch's value, not 0.01 * 2
  sae.update_statistics({"min_kept": jnp.float32(4.0)})
  np.testing.assert_allclose(sae.threshold[...], 0.99 * 2.0 + 0.01 * 4.0, rtol=1e-6)
  sae.update_statistics({"min_kept": jnp.float32(jnp.inf)})  # no positive activation
  np.testing.assert_allclose(sae.threshold[...], 2.02, rtol=1e-6)


def test_train_step_sets_threshold_from_the_batch_not_from_adam(tiny_config):
  tiny_config.sae.architecture = "batchtopk"
  spec = describe(tiny_config, 16)
  tx = optim.make_optimizer(tiny_config.optim, 5)
  state, _ = create_train_state(spec, sharding.make_mesh(1, 1), (("batch", None),), tx)
  x = inputs(batch=32)
  grads = jax.grad(lambda q: sum(nnx.merge(spec.graphdef, q).loss_terms(
      x, {"k": 32, "aux_k": 1 / 32}, jnp.ones(64, bool))[0].values()))(state.params)
  assert float(grads["threshold"]) == 0.0  # not used by the training loss
  new_state, _ = train_step(state, x, spec.coefficients_at(state.step), graphdef=spec.graphdef,
                            tx=tx, feature_window_tokens=64)
  _, out = nnx.merge(spec.graphdef, state.params).loss_terms(x, spec.coefficients_at(0))
  np.testing.assert_allclose(new_state.params["threshold"], out["min_kept"], rtol=1e-6)


def test_inference_is_per_token_jumprelu_at_theta():
  graphdef, p = build("batchtopk")
  p = {**p, "threshold": jnp.float32(0.3)}
  x = inputs()
  sae = nnx.merge(graphdef, p)
  pi = pre_activations(p, x)
  np.testing.assert_allclose(sae.encode(x), np.where(pi > 0.3, pi, 0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(sae.encode(x[:5]), sae.encode(x)[:5])


def test_inference_threshold_reproduces_the_training_l0(tiny_config):
  """Trained briefly on synthetic data, the encode() L0 on fresh batches is within 10% of k."""
  c = tiny_config
  c.sae.architecture, c.sae.batchtopk.k = "batchtopk", 3
  c.train.steps, c.train.batch_size, c.optim.lr = 400, 256, 3e-3
  mesh = sharding.make_mesh(1, 1)
  source = make_source(c, mesh)
  spec = describe(c, source.d_in)
  state = train(c, mesh, source.batches, spec)
  sae = nnx.merge(spec.graphdef, state.params)
  assert float(state.params["threshold"]) > 0
  l0 = np.mean([float((sae.encode(next(source.batches)) > 0).sum(-1).mean()) for _ in range(8)])
  assert abs(l0 - 3) <= 0.1 * 3, l0


def test_saelens_stores_theta_as_a_jumprelu_threshold(tmp_path):
  cfg = assert_saelens_round_trip(tmp_path, "batchtopk", k=5, threshold_rate=0.05)
  assert cfg["architecture"] == "jumprelu"
  assert cfg["metadata"]["gsae_jax_architecture"] == "batchtopk"


def test_a_per_feature_threshold_is_refused():
  tensors = {"W_enc": np.zeros((4, 3), np.float32), "b_enc": np.zeros(3, np.float32),
             "W_dec": np.ones((3, 4), np.float32), "b_dec": np.zeros(4, np.float32),
             "threshold": np.array([0.1, 0.2, 0.1], np.float32)}
  cfg = {"metadata": {"model_name": "gemma", "hook_name": "blocks.3.hook_resid_post"}}
  with pytest.raises(ValueError, match="per-feature threshold, a JumpReLU SAE") as e:
    BatchTopKSAE.from_saelens(tensors, cfg)
  assert "blocks.3.hook_resid_post" in str(e.value)
  tensors["threshold"] = np.full(3, 0.25, np.float32)
  params, _ = BatchTopKSAE.from_saelens(tensors, cfg)
  assert params["threshold"].shape == () and float(params["threshold"]) == 0.25
