"""JumpReLU SAE (arXiv 2407.14435): forward equations, the paper's threshold pseudo-derivatives
(Eqs. 11-12) against numpy, gradient routing, initialisation, resampling and SAELens interop."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from gsae_jax import export
from gsae_jax.sae.jumprelu import JumpReLUSAE, jumprelu, step
from gsae_jax.sae.spec import from_metadata
from tests.saelens_check import assert_saelens_matches_ours

D_IN, D_SAE, BATCH = 4, 6, 8
LAM = 0.7
EPS = 0.5  # bandwidth in absolute units: wide enough to put some pre-activations in the window


def _block(**fields):
  block = JumpReLUSAE.default_config()
  block.update(fields)
  return block


def _sae(**fields):
  """(graphdef, params) with every parameter randomised; bandwidth EPS in our units."""
  block = _block(bandwidth=EPS / math.sqrt(D_IN), **fields)
  graphdef, state = nnx.split(JumpReLUSAE(D_IN, D_SAE, block, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  keys = jax.random.split(jax.random.key(2), len(params))
  params = {k: v + 0.3 * jax.random.normal(kk, v.shape)
            for (k, v), kk in zip(sorted(params.items()), keys)}
  params["log_threshold"] = jnp.log(jnp.linspace(0.1, 0.9, D_SAE))
  return graphdef, params


@pytest.fixture
def x():
  return 1.5 * jax.random.normal(jax.random.key(1), (BATCH, D_IN))


def _np(params):
  return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _reference(p, x, pre_encoder_bias=False):
  """numpy forward: (pi, theta, f, x_hat)."""
  x = np.asarray(x, np.float64)
  xc = x - p["b_dec"] if pre_encoder_bias else x
  pi = xc @ p["W_enc"] + p["b_enc"]
  theta = np.exp(p["log_threshold"])
  f = pi * (pi > theta)
  return pi, theta, f, f @ p["W_dec"] + p["b_dec"]


def _kernel(pi, theta, eps=EPS):
  """K((pi - theta) / eps), the rectangle kernel: [batch, d_sae]."""
  return (np.abs((pi - theta) / eps) < 0.5).astype(np.float64)


def _term_grads(graphdef, params, x, term):
  return jax.grad(lambda p: nnx.merge(graphdef, p).loss_terms(x, {"l0": LAM})[0][term])(params)


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_forward_matches_equations(x, pre_encoder_bias):
  graphdef, params = _sae(pre_encoder_bias=pre_encoder_bias)
  sae = nnx.merge(graphdef, params)
  pi, theta, f, x_hat = _reference(_np(params), x, pre_encoder_bias)
  np.testing.assert_allclose(sae.encode(x), f, rtol=1e-5, atol=1e-6)
  terms, out = sae.loss_terms(x, {"l0": LAM})
  assert set(terms) == {"reconstruct", "sparsity"}
  np.testing.assert_allclose(out["f"], f, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["x_hat"], x_hat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(terms["reconstruct"], np.mean(np.sum((x - x_hat) ** 2, -1)), rtol=1e-5)
  np.testing.assert_allclose(terms["sparsity"], LAM * np.mean(np.sum(pi > theta, -1)), rtol=1e-6)
  # Features above and below their thresholds, and positive pre-activations that the jump
  # zeroes (where a ReLU would pass them).
  assert 0 < np.mean(f != 0) < 1
  assert np.any((pi > 0) & (pi <= theta))


# ----------------------------------------------------------------------------- pseudo-derivatives

def test_custom_vjps_match_equations_11_and_12():
  z = jnp.array([[0.05, 0.3, 0.71, 2.0], [-1.0, 0.62, 0.4, 0.95]])
  theta = jnp.array([0.2, 0.5, 0.5, 1.0])
  g = jnp.array([[1.0, -2.0, 3.0, 0.5], [0.7, 1.5, -1.0, 2.0]])
  zn, tn, gn = (np.asarray(a, np.float64) for a in (z, theta, g))
  k = _kernel(zn, tn)
  assert 0 < k.mean() < 1  # inside and outside the window

  out, vjp = jax.vjp(lambda z, t: jumprelu(z, t, EPS), z, theta)
  np.testing.assert_allclose(out, zn * (zn > tn))
  dz, dtheta = vjp(g)
  np.testing.assert_allclose(dz, gn * (zn > tn))  # no straight-through term into z
  np.testing.assert_allclose(dtheta, np.sum(gn * -(tn / EPS) * k, 0), rtol=1e-6)  # Eq. 11

  out, vjp = jax.vjp(lambda z, t: step(z, t, EPS), z, theta)
  np.testing.assert_allclose(out, (zn > tn).astype(np.float64))
  dz, dtheta = vjp(g)
  np.testing.assert_array_equal(dz, 0.0)
  np.testing.assert_allclose(dtheta, np.sum(gn * -(1 / EPS) * k, 0), rtol=1e-6)  # Eq. 12


def test_reconstruct_threshold_gradient_is_eq_11(x):
  graphdef, params = _sae()
  p = _np(params)
  pi, theta, f, x_hat = _reference(p, x)
  k = _kernel(pi, theta)
  assert 0 < k.mean() < 1
  dl_df = -2 * (np.asarray(x, np.float64) - x_hat) @ p["W_dec"].T / BATCH  # [batch, d_sae]
  dl_dtheta = np.sum(dl_df * -(theta / EPS) * k, 0)
  assert np.count_nonzero(dl_dtheta) >= 2
  g = _term_grads(graphdef, params, x, "reconstruct")["log_threshold"]
  np.testing.assert_allclose(g, theta * dl_dtheta, rtol=1e-4, atol=1e-6)  # chain rule via exp


def test_sparsity_threshold_gradient_is_eq_12(x):
  graphdef, params = _sae()
  pi, theta, _, _ = _reference(_np(params), x)
  k = _kernel(pi, theta)
  dl_dtheta = np.sum(LAM / BATCH * -(1 / EPS) * k, 0)
  assert np.count_nonzero(dl_dtheta) >= 2 and np.any(dl_dtheta == 0)
  g = _term_grads(graphdef, params, x, "sparsity")["log_threshold"]
  np.testing.assert_allclose(g, theta * dl_dtheta, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- routing

def test_sparsity_trains_thresholds_alone(x):
  graphdef, params = _sae()
  g = _term_grads(graphdef, params, x, "sparsity")
  for name in ("W_enc", "b_enc", "b_dec", "W_dec"):
    np.testing.assert_array_equal(g[name], 0.0, err_msg=name)
  assert float(jnp.max(jnp.abs(g["log_threshold"]))) > 1e-3


def test_reconstruct_reaches_encoder_through_the_mask_only(x):
  """The encoder's gradient is the reconstruction's with H(pi - theta) held constant: no
  kernel pseudo-derivative reaches pi, even for pre-activations inside the window."""
  graphdef, params = _sae()
  g = _term_grads(graphdef, params, x, "reconstruct")
  for name in ("W_enc", "b_enc", "b_dec", "W_dec", "log_threshold"):
    assert float(jnp.max(jnp.abs(g[name]))) > 1e-4, name

  def mask_constant(enc):
    pi = x @ enc["W_enc"] + enc["b_enc"]  # the paper's Eq. 8 (the default)
    f = pi * jax.lax.stop_gradient((pi > jnp.exp(params["log_threshold"])).astype(x.dtype))
    return jnp.mean(jnp.sum((x - f @ params["W_dec"] - enc["b_dec"]) ** 2, -1))

  expected = jax.grad(mask_constant)({k: params[k] for k in ("W_enc", "b_enc", "b_dec")})
  for name, value in expected.items():
    np.testing.assert_allclose(g[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ----------------------------------------------------------------------------- init, resampling

def test_init_as_the_paper():
  sae = JumpReLUSAE(16, 64, rngs=nnx.Rngs(3))
  p = nnx.to_pure_dict(nnx.split(sae)[1])
  np.testing.assert_allclose(np.linalg.norm(p["W_dec"], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
  np.testing.assert_array_equal(p["b_enc"], 0.0)
  np.testing.assert_array_equal(p["b_dec"], 0.0)
  # theta = 0.001 and epsilon = 0.001 at E||x||^2 = 1, i.e. 0.001 * sqrt(d_in) on our data.
  np.testing.assert_allclose(np.exp(p["log_threshold"]), 0.004, rtol=1e-6)
  assert sae.bandwidth == pytest.approx(0.004)
  assert JumpReLUSAE.default_config().l0_warmup_steps == 10_000  # the paper's lambda warm-up


def test_reinit_features_resets_to_initial_values():
  graphdef, params = _sae()
  sae = nnx.merge(graphdef, params)
  dead = jnp.arange(D_SAE) % 2 == 0
  directions = jax.random.normal(jax.random.key(5), (D_SAE, D_IN))
  sae.reinit_features(dead, directions, jnp.float32(0.3))
  p = nnx.to_pure_dict(nnx.split(sae)[1])
  init_log_theta = math.log(0.001 * math.sqrt(D_IN))
  np.testing.assert_allclose(p["W_dec"][dead], directions[dead])
  np.testing.assert_allclose(p["W_enc"][:, dead], 0.3 * directions[dead].T, rtol=1e-6)
  np.testing.assert_array_equal(p["b_enc"][dead], 0.0)
  np.testing.assert_allclose(p["log_threshold"][dead], init_log_theta, rtol=1e-6)
  for k in ("W_dec", "b_enc", "log_threshold"):
    np.testing.assert_array_equal(p[k][~dead], params[k][~dead], err_msg=k)


def test_validate_config_names_the_field():
  def check(ok, field, expected, found):
    if not ok:
      raise ValueError(f"{field}: expected {expected}, found {found!r}")

  JumpReLUSAE.validate_config(_block(), check)
  for field, value in (("bandwidth", 0.0), ("init_threshold", -1e-3), ("l0_coefficient", -1.0),
                       ("l0_warmup_steps", -5)):
    with pytest.raises(ValueError, match=f"^{field}: expected"):
      JumpReLUSAE.validate_config(_block(**{field: value}), check)


# ----------------------------------------------------------------------------- SAELens

SCALE = 2.5


def _exported(tmp_path, **block):
  spec = from_metadata({"architecture": "jumprelu", "d_in": 12, "d_sae": 40,
                        "architecture_config": block})
  params = spec.init_params()
  keys = jax.random.split(jax.random.key(7), len(params))
  params = {k: np.asarray(v + 0.2 * jax.random.normal(kk, v.shape))
            for (k, v), kk in zip(sorted(params.items()), keys)}
  # Thresholds spread over the pre-activations' range, so that both sides are exercised.
  params["log_threshold"] = np.log(np.linspace(0.05, 1.5, 40)).astype(np.float32)
  folder = str(tmp_path / "sl")
  export.save_saelens(folder, params, spec, scale=SCALE, metadata={})
  return spec, params, folder


@pytest.mark.parametrize("pre_encoder_bias", [True, False])
def test_saelens_encode_decode_equal_ours_on_raw_activations(tmp_path, pre_encoder_bias):

  spec, params, folder = _exported(tmp_path, pre_encoder_bias=pre_encoder_bias)
  assert json.load(open(f"{folder}/cfg.json"))["architecture"] == "jumprelu"
  np.testing.assert_allclose(load_file(f"{folder}/sae_weights.safetensors")["threshold"],
                             np.exp(params["log_threshold"]), rtol=1e-6)
  x_raw = np.random.default_rng(0).normal(size=(32, 12)).astype(np.float32) / SCALE + 0.1
  f_ours = assert_saelens_matches_ours(folder, spec, params, SCALE, x_raw)
  assert 0.1 < np.mean(f_ours > 0) < 0.9

  back, _, back_spec = export.load_saelens(folder, scale=SCALE)
  # our own folder comes back in the form it was trained in (Eq. 8's b_enc unfolded again)
  assert back_spec.name == "jumprelu" and back_spec.block.pre_encoder_bias == pre_encoder_bias
  back_sae = nnx.merge(back_spec.graphdef, back)
  np.testing.assert_allclose(back_sae.encode(SCALE * x_raw), f_ours, rtol=1e-5, atol=1e-5)
  for k in params:
    np.testing.assert_allclose(back[k], params[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_nonpositive_saelens_threshold_is_refused(tmp_path):
  _, _, folder = _exported(tmp_path)
  tensors = load_file(f"{folder}/sae_weights.safetensors")
  tensors["threshold"][3] = 0.0
  save_file(tensors, f"{folder}/sae_weights.safetensors")
  with pytest.raises(ValueError, match="'threshold'.*expected every value > 0.*found 1 of 40"):
    export.load_saelens(folder)
