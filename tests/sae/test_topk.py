"""TopK SAE (Gao et al. 2024): the selection, the masked-k sweep path, AuxK's reach, SAELens.

Holds the helpers test_batchtopk.py and test_matryoshka.py share. Sharded training, resume, the
k sweep (members equal separate runs), the SAELens round trip at default settings and the plan
are tested for every architecture in tests/test_registry.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gsae_jax import export
from gsae_jax.sae import registry
from gsae_jax.sae.spec import from_metadata
from gsae_jax.sae.topk import TopKSAE, top_k_mask
from tests.saelens_check import assert_saelens_matches_ours

D_IN, D_SAE, BATCH = 16, 64, 32


def build(arch: str, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0, **fields):
  """(graphdef, params) of `arch` with its block's `fields`, every parameter perturbed (biases
  nonzero) as after training."""
  cls = registry.get(arch)
  block = cls.default_config()
  block.update(fields)
  graphdef, state = nnx.split(cls(d_in, d_sae, block, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(params))
  params = {k: v + 0.1 * jax.random.normal(kk, v.shape, v.dtype)
            for (k, v), kk in zip(sorted(params.items()), keys)}
  return graphdef, params


def inputs(seed: int = 1, batch: int = BATCH, d_in: int = D_IN) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (batch, d_in))


def pre_activations(p, x) -> np.ndarray:
  """pi = (x - b_dec) W_enc + b_enc, in numpy."""
  return (np.asarray(x) - np.asarray(p["b_dec"])) @ np.asarray(p["W_enc"]) + np.asarray(p["b_enc"])


def assert_saelens_round_trip(tmp_path, arch: str, **fields) -> dict:
  """sae_lens.SAE.load_from_disk of our export encodes and decodes raw activations as we do
  (within 1e-5), and load_saelens gives our parameters back; returns the folder's cfg.json."""

  d_in, d_sae, scale = 12, 40, 2.5
  spec = from_metadata({"architecture": arch, "d_in": d_in, "d_sae": d_sae,
                        "architecture_config": fields})
  graphdef, params = build(arch, d_in, d_sae, **fields)
  params = {k: np.asarray(v) for k, v in params.items()}
  folder = str(tmp_path / "sl")
  export.save_saelens(folder, params, spec, scale=scale, metadata={})
  x_raw = np.random.default_rng(0).normal(size=(32, d_in)).astype(np.float32) / scale + 0.1
  assert_saelens_matches_ours(folder, spec, params, scale, x_raw)
  back, cfg, back_spec = export.load_saelens(folder, scale=scale)
  assert back_spec.name == arch and back_spec.block == spec.block
  assert back.keys() == params.keys()
  for k in params:
    np.testing.assert_allclose(back[k], params[k], rtol=1e-6, atol=1e-7, err_msg=k)
  return cfg


def test_top_k_mask_is_exact_for_any_sign_and_a_traced_k():
  rng = np.random.default_rng(0)
  v = (rng.normal(size=(16, 50)) * 10.0 ** rng.integers(-15, 15, (16, 50))).astype(np.float32)
  v[:, :5] = -np.inf  # as AuxK's masked alive latents
  v[0, 5:] = -v[0, 5:] ** 2  # a row with no positive entry
  for k in (1, 7, 45):
    np.testing.assert_array_equal(top_k_mask(v, k), v >= np.sort(v, -1)[:, -k][:, None])
    np.testing.assert_array_equal(top_k_mask(v, k * 3, per_row=False),
                                  v >= np.sort(v.ravel())[-k * 3])
  masks = jax.jit(jax.vmap(lambda k: top_k_mask(v, k)))(jnp.array([2, 9], jnp.int32))
  np.testing.assert_array_equal(masks[1], top_k_mask(v, 9))
  assert np.all(np.asarray(masks).sum(-1) == np.array([2, 9])[:, None])


def test_keeps_exactly_k_per_token_as_relu_of_top_k():
  graphdef, p = build("topk", k=5)
  x = inputs()
  sae = nnx.merge(graphdef, p)
  pi = pre_activations(p, x)
  top = np.argsort(-pi, axis=-1)[:, :5]
  expected = np.zeros_like(pi)
  np.put_along_axis(expected, top, np.maximum(np.take_along_axis(pi, top, -1), 0), -1)
  _, out = sae.loss_terms(x, {"k": 5, "aux_k": 1 / 32})
  for f in (np.asarray(sae.encode(x)), np.asarray(out["f"])):
    np.testing.assert_allclose(f, expected, rtol=1e-5, atol=1e-6)
    assert np.all((f != 0).sum(-1) == 5)  # every token here has >= 5 positive pre-activations


def test_masked_k_equals_a_module_built_at_that_k():
  x, dead = inputs(), jnp.arange(D_SAE) % 3 == 0
  graphdef8, p = build("topk", k=8)
  graphdef3, _ = build("topk", k=3)
  sweep_module, single = nnx.merge(graphdef8, p), nnx.merge(graphdef3, p)
  want_terms, want = single.loss_terms(x, {"k": 3, "aux_k": 0.5}, dead)
  # k as a Python int, and as a traced int32 per member under vmap (what a sweep passes)
  got_terms, got = sweep_module.loss_terms(x, {"k": 3, "aux_k": 0.5}, dead)
  f_vmapped = jax.vmap(lambda k: sweep_module.loss_terms(x, {"k": k, "aux_k": 0.5}, dead)[1]["f"])(
      jnp.array([3, 8], jnp.int32))
  np.testing.assert_array_equal(got["f"], want["f"])
  np.testing.assert_array_equal(f_vmapped[0], want["f"])
  np.testing.assert_array_equal(f_vmapped[1], sweep_module.encode(x))
  for name in want_terms:
    np.testing.assert_allclose(got_terms[name], want_terms[name], rtol=1e-6)
  assert np.all((np.asarray(want["f"]) != 0).sum(-1) == 3)


def test_auxk_is_the_dead_latents_reconstruction_of_the_error():
  graphdef, p = build("topk", k=4, k_aux=6)
  x, dead = inputs(), jnp.arange(D_SAE) >= 40  # 24 dead latents
  sae = nnx.merge(graphdef, p)
  terms, out = sae.loss_terms(x, {"k": 4, "aux_k": 0.25}, dead)
  e = np.asarray(x - out["x_hat"])
  pi = np.where(np.asarray(dead), pre_activations(p, x), -np.inf)
  top = np.argsort(-pi, axis=-1)[:, :6]
  z = np.zeros_like(pi)
  np.put_along_axis(z, top, np.maximum(np.take_along_axis(pi, top, -1), 0), -1)
  e_hat = z @ np.asarray(p["W_dec"])  # no b_dec
  np.testing.assert_allclose(terms["aux"], 0.25 * np.mean(np.sum((e - e_hat) ** 2, -1)), rtol=1e-5)
  assert set(terms) == {"reconstruct", "aux"}
  assert float(sae.loss_terms(x, {"k": 4, "aux_k": 0.25})[0]["aux"]) == 0.0  # no mask: no AuxK


def test_auxk_reaches_only_dead_latents():
  graphdef, p = build("topk", k=4, k_aux=6)
  x, dead = inputs(), jnp.arange(D_SAE) >= 40
  grads = jax.grad(lambda q: nnx.merge(graphdef, q).loss_terms(x, {"k": 4, "aux_k": 1.0},
                                                                dead)[0]["aux"])(p)
  alive = ~np.asarray(dead)
  np.testing.assert_array_equal(grads["W_enc"][:, alive], 0.0)
  np.testing.assert_array_equal(grads["b_enc"][alive], 0.0)
  np.testing.assert_array_equal(grads["W_dec"][alive], 0.0)  # e = x - x_hat is stop-gradient
  assert float(jnp.abs(grads["W_enc"][:, ~alive]).max()) > 1e-4
  assert float(jnp.abs(grads["W_dec"][~alive]).max()) > 1e-4


def test_fewer_dead_latents_than_k_aux_use_only_the_dead():
  graphdef, p = build("topk", k=4, k_aux=8)
  x, dead = inputs(), jnp.arange(D_SAE) < 3
  grads = jax.grad(lambda q: nnx.merge(graphdef, q).loss_terms(x, {"k": 4, "aux_k": 1.0},
                                                                dead)[0]["aux"])(p)
  np.testing.assert_array_equal(grads["b_enc"][3:], 0.0)
  assert np.all(np.isfinite(grads["W_enc"]))


def test_eq3_literal_has_no_encoder_bias_nor_relu(tmp_path):
  graphdef, p = build("topk", k=40, eq3_literal=True)  # k large: some kept values are < 0
  assert "b_enc" not in p
  x = inputs()
  f = np.asarray(nnx.merge(graphdef, p).encode(x))
  assert np.all((f != 0).sum(-1) == 40) and np.any(f < 0)
  spec = from_metadata({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE,
                        "architecture_config": {"eq3_literal": True}})
  with pytest.raises(ValueError, match="eq3_literal"):
    export.save_saelens(str(tmp_path / "sl"), {k: np.asarray(v) for k, v in p.items()}, spec,
                        scale=1.0, metadata={})


def test_sizes_and_config_checks():
  assert TopKSAE(64, 512, rngs=nnx.Rngs(0)).k_aux == 32    # d_in // 2 (paper: ~ d_model / 2)
  assert TopKSAE(16, 6, _block(k=4), rngs=nnx.Rngs(0)).k_aux == 6  # capped at d_sae
  with pytest.raises(ValueError, match=r"sae.topk.k=80: expected an integer in \[1, d_sae=64\]"):
    TopKSAE(D_IN, D_SAE, _block(k=80), rngs=nnx.Rngs(0))
  errors = []
  bad = ml_collections.ConfigDict({**TopKSAE.default_config().to_dict(), "k": 2.5, "k_aux": -1})
  TopKSAE.validate_config(bad, lambda ok, field, *_: ok or errors.append(field))
  assert errors == ["k", "k_aux"]


def _block(**fields):
  block = TopKSAE.default_config()
  block.update(fields)
  return block


def test_saelens_topk_round_trip(tmp_path):
  cfg = assert_saelens_round_trip(tmp_path, "topk", k=6)
  assert cfg["architecture"] == "topk" and cfg["k"] == 6
  assert cfg["rescale_acts_by_decoder_norm"] is False


def test_saelens_decoder_norm_rescaling_is_folded():
  """A SAELens TopK trained with rescale_acts_by_decoder_norm (pi * ||W_dec row||) loads as the
  same function with unit-norm decoder rows."""
  rng = np.random.default_rng(0)
  t = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "b_enc": rng.normal(size=D_SAE),
       "W_dec": rng.normal(size=(D_SAE, D_IN)) * rng.uniform(0.5, 2, (D_SAE, 1)),
       "b_dec": rng.normal(size=D_IN)}
  t = {k: v.astype(np.float32) for k, v in t.items()}
  params, block = TopKSAE.from_saelens(t, {"k": 5, "rescale_acts_by_decoder_norm": True})
  np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=-1), 1.0, rtol=1e-5)
  x = rng.normal(size=(8, D_IN)).astype(np.float32)
  norms = np.linalg.norm(t["W_dec"], axis=-1)
  pi = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
  top = np.argsort(-pi, -1)[:, :5]
  f = np.zeros_like(pi)
  np.put_along_axis(f, top, np.maximum(np.take_along_axis(pi, top, -1), 0), -1)
  x_hat = (f / norms) @ t["W_dec"] + t["b_dec"]
  spec = from_metadata({"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE,
                        "architecture_config": block})
  ours = nnx.merge(spec.graphdef, params)
  np.testing.assert_allclose(ours.decode(ours.encode(x)), x_hat, rtol=1e-4, atol=1e-4)
