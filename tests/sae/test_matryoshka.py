"""Matryoshka SAE (Bussmann et al. 2025): the loss is the sum of the nested prefixes'
reconstruction losses, on BatchTopK codes."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsae_jax.sae.matryoshka import MatryoshkaSAE, prefix_sizes
from tests.sae.test_topk import D_SAE, assert_saelens_round_trip, build, inputs


def test_loss_is_the_sum_over_prefixes():
  graphdef, p = build("matryoshka", k=4)
  x, dead = inputs(), jnp.arange(D_SAE) >= 48
  sae = nnx.merge(graphdef, p)
  assert sae.prefixes == (4, 8, 16, 32, 64)
  terms, out = sae.loss_terms(x, {"k": 4, "aux_k": 0.5}, dead)
  f, w, b = (np.asarray(v, np.float64) for v in (out["f"], p["W_dec"], p["b_dec"]))
  x64 = np.asarray(x, np.float64)
  by_hand = sum(np.mean(np.sum((x64 - f[:, :m] @ w[:m] - b) ** 2, -1)) for m in sae.prefixes)
  np.testing.assert_allclose(terms["reconstruct"], by_hand, rtol=1e-5)
  np.testing.assert_allclose(out["x_hat"], f @ w + b, rtol=1e-5, atol=1e-5)
  # the codes and AuxK are BatchTopK's (same parameters, the full reconstruction's error)
  bt_terms, bt_out = nnx.merge(build("batchtopk", k=4)[0], p).loss_terms(
      x, {"k": 4, "aux_k": 0.5}, dead)
  np.testing.assert_array_equal(out["f"], bt_out["f"])
  np.testing.assert_allclose(terms["aux"], bt_terms["aux"], rtol=1e-6)
  assert terms["reconstruct"] > bt_terms["reconstruct"]  # the smaller prefixes add loss


def test_prefix_sizes_from_fractions():
  assert prefix_sizes((1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0), 4096) == (256, 512, 1024, 2048, 4096)
  assert prefix_sizes((0.25, 1.0), 40) == (10, 40)
  with pytest.raises(ValueError, match=r"prefix_fractions=\(0.01, 1.0\) with d_sae=40"):
    prefix_sizes((0.01, 1.0), 40)  # rounds to a first prefix of 0 latents
  errors = []
  bad = MatryoshkaSAE.default_config()
  bad.prefix_fractions = (0.5, 0.25, 1.0)
  MatryoshkaSAE.validate_config(bad, lambda ok, field, *_: ok or errors.append(field))
  bad.prefix_fractions = (0.5, 0.75)
  MatryoshkaSAE.validate_config(bad, lambda ok, field, *_: ok or errors.append(field))
  assert errors == ["prefix_fractions", "prefix_fractions"]


def test_saelens_stores_it_as_jumprelu_and_it_comes_back_nested(tmp_path):
  cfg = assert_saelens_round_trip(tmp_path, "matryoshka", k=3, prefix_fractions=(0.25, 0.5, 1.0))
  assert cfg["architecture"] == "jumprelu"
  assert cfg["metadata"]["gsae_jax_architecture"] == "matryoshka"
