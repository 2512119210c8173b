"""Equations and gradient routing of GATED_SAE.md sections 1-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsae_jax.sae.baseline import BaselineSAE
from gsae_jax.sae.gated import GatedSAE

D_IN, D_SAE, BATCH = 6, 10, 7


def _gated_block(**fields):
  block = GatedSAE.default_config()
  block.update(fields)
  return block


def _perturbed(sae, seed=0):
  """Splits sae into (graphdef, params) with every parameter randomised (biases nonzero)."""
  graphdef, state = nnx.split(sae)
  params = nnx.to_pure_dict(state)
  keys = jax.random.split(jax.random.key(seed), len(params))
  params = {k: v + 0.3 * jax.random.normal(kk, v.shape) for (k, v), kk in zip(sorted(params.items()), keys)}
  return graphdef, params


@pytest.fixture
def gated():
  return _perturbed(GatedSAE(D_IN, D_SAE, rngs=nnx.Rngs(0)))


@pytest.fixture
def x():
  return jax.random.normal(jax.random.key(1), (BATCH, D_IN))


def _term_grads(graphdef, params, x, term, lam=0.7):
  return jax.grad(lambda p: nnx.merge(graphdef, p).loss_terms(x, {"l1": lam})[0][term])(params)


def _nonzero(g):
  return float(jnp.max(jnp.abs(g))) > 1e-6


def test_gated_forward_matches_equations(gated, x):
  graphdef, p = gated
  sae = nnx.merge(graphdef, p)
  xc = np.asarray(x - p["b_dec"])
  pi_gate = xc @ np.asarray(p["W_gate"]) + np.asarray(p["b_gate"])
  pi_mag = xc @ (np.asarray(p["W_gate"]) * np.exp(np.asarray(p["r_mag"]))) + np.asarray(p["b_mag"])
  f = (pi_gate > 0) * np.maximum(pi_mag, 0)
  x_hat = f @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"])
  np.testing.assert_allclose(sae.encode(x), f, rtol=1e-5, atol=1e-6)
  terms, out = sae.loss_terms(x, {"l1": 0.7})
  np.testing.assert_allclose(out["x_hat"], x_hat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(terms["reconstruct"], np.mean(np.sum((x - x_hat) ** 2, -1)), rtol=1e-5)
  np.testing.assert_allclose(terms["sparsity"], 0.7 * np.mean(np.sum(np.maximum(pi_gate, 0), -1)), rtol=1e-5)
  x_aux = np.maximum(pi_gate, 0) @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"])
  np.testing.assert_allclose(terms["aux"], np.mean(np.sum((x - x_aux) ** 2, -1)), rtol=1e-5)
  assert 0 < np.mean(f > 0) < 1  # both gate states are exercised


def test_reconstruct_trains_magnitude_path_never_b_gate(gated, x):
  graphdef, p = gated
  g = _term_grads(graphdef, p, x, "reconstruct")
  for name in ("W_dec", "b_dec", "r_mag", "b_mag", "W_gate"):
    assert _nonzero(g[name]), name
  np.testing.assert_array_equal(g["b_gate"], 0.0)

  # W_gate's gradient is exactly the magnitude path's: the same loss with the gate held constant.
  def rec_gate_constant(w_gate):
    xc = x - p["b_dec"]
    gate = jax.lax.stop_gradient((xc @ w_gate + p["b_gate"] > 0).astype(x.dtype))
    f = gate * jax.nn.relu(xc @ (w_gate * jnp.exp(p["r_mag"])) + p["b_mag"])
    return jnp.mean(jnp.sum((x - f @ p["W_dec"] - p["b_dec"]) ** 2, -1))

  np.testing.assert_allclose(g["W_gate"], jax.grad(rec_gate_constant)(p["W_gate"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("term", ["sparsity", "aux"])
def test_sparsity_and_aux_train_gate_and_b_dec(gated, x, term):
  graphdef, p = gated
  g = _term_grads(graphdef, p, x, term)
  for name in ("W_gate", "b_gate", "b_dec"):
    assert _nonzero(g[name]), (term, name)


def test_aux_never_reaches_decoder(gated, x):
  graphdef, p = gated
  g = _term_grads(graphdef, p, x, "aux")
  np.testing.assert_array_equal(g["W_dec"], 0.0)

  # b_dec's gradient from L_aux flows only through pi_gate (x - b_dec), not through x_hat_frozen.
  def aux_via_pi_gate_only(b_dec):
    relu_gate = jax.nn.relu((x - b_dec) @ p["W_gate"] + p["b_gate"])
    return jnp.mean(jnp.sum((x - relu_gate @ p["W_dec"] - p["b_dec"]) ** 2, -1))

  np.testing.assert_allclose(g["b_dec"], jax.grad(aux_via_pi_gate_only)(p["b_dec"]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("term", ["sparsity", "aux"])
def test_r_mag_and_b_mag_only_from_reconstruct(gated, x, term):
  graphdef, p = gated
  g = _term_grads(graphdef, p, x, term)
  np.testing.assert_array_equal(g["r_mag"], 0.0)
  np.testing.assert_array_equal(g["b_mag"], 0.0)


def test_unfrozen_aux_decoder_ablation_reaches_decoder(x):
  graphdef, p = _perturbed(GatedSAE(D_IN, D_SAE, _gated_block(frozen_aux_decoder=False), rngs=nnx.Rngs(0)))
  assert _nonzero(_term_grads(graphdef, p, x, "aux")["W_dec"])


def test_untied_magnitude_ablation_has_separate_w_mag(x):
  graphdef, p = _perturbed(GatedSAE(D_IN, D_SAE, _gated_block(tie_r_mag=False), rngs=nnx.Rngs(0)))
  assert "W_mag" in p and "r_mag" not in p
  g = _term_grads(graphdef, p, x, "reconstruct")
  assert _nonzero(g["W_mag"])
  np.testing.assert_array_equal(g["W_gate"], 0.0)  # gate is only trained by sparsity + aux


@pytest.mark.parametrize("mode", ["straight_through", "rectangle"])
def test_pseudo_derivative_gates_let_reconstruct_reach_b_gate(x, mode):
  graphdef, p = _perturbed(GatedSAE(D_IN, D_SAE, _gated_block(gate_backward=mode, gate_eps=2.0),
                                    rngs=nnx.Rngs(0)))
  assert _nonzero(_term_grads(graphdef, p, x, "reconstruct")["b_gate"])


def test_init_ties_encoder_to_unit_decoder():
  p = nnx.to_pure_dict(nnx.split(GatedSAE(D_IN, D_SAE, rngs=nnx.Rngs(3)))[1])
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p["W_gate"], p["W_dec"].T)
  for name in ("r_mag", "b_gate", "b_mag", "b_dec"):
    np.testing.assert_array_equal(p[name], 0.0)


def test_baseline_forward_and_loss(x):
  graphdef, p = _perturbed(BaselineSAE(D_IN, D_SAE, rngs=nnx.Rngs(0)))
  sae = nnx.merge(graphdef, p)
  f = np.maximum(np.asarray(x - p["b_dec"]) @ np.asarray(p["W_enc"]) + np.asarray(p["b_enc"]), 0)
  x_hat = f @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"])
  terms, out = sae.loss_terms(x, {"l1": 0.5})
  np.testing.assert_allclose(out["f"], f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(terms["reconstruct"], np.mean(np.sum((x - x_hat) ** 2, -1)), rtol=1e-5)
  np.testing.assert_allclose(terms["sparsity"], 0.5 * np.mean(np.sum(f, -1)), rtol=1e-5)
  assert set(terms) == {"reconstruct", "sparsity"}
