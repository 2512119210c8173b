"""Evaluation's decode through each token's non-zero codes (features.SparseCodes, the CPU row
kernels) equals the dense product, and falls back to it when a token has too many codes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax.kernels import rows
from gsae_jax.sae import features

D_SAE, D_IN, SLOTS = 512, 24, 8


def _codes(key, per_token: int, batch: int = 64) -> jax.Array:
  """[batch, D_SAE] codes with `per_token` non-zeros per row, of both signs (TopK's
  eq3_literal codes can be negative)."""
  k1, k2 = jax.random.split(key)
  idx = jax.vmap(lambda k: jax.random.choice(k, D_SAE, (per_token,), replace=False))(
      jax.random.split(k1, batch))
  values = jax.random.normal(k2, (batch, per_token))
  return jnp.zeros((batch, D_SAE)).at[jnp.arange(batch)[:, None], idx].set(values)


@pytest.mark.parametrize("per_token", [1, SLOTS, SLOTS + 1])  # SLOTS + 1: the dense branch
def test_sparse_decode_equals_dense(per_token):
  assert rows.available()
  w_dec = jax.random.normal(jax.random.key(1), (D_SAE, D_IN))
  f = _codes(jax.random.key(0), per_token)
  got = jax.jit(features.SparseCodes(SLOTS).decode)(f, w_dec)
  np.testing.assert_allclose(got, f @ w_dec, rtol=1e-5, atol=1e-5)


def test_the_sparse_branch_is_taken_when_the_codes_fit(monkeypatch):
  """A bag that returns zeros shows which branch ran."""
  monkeypatch.setattr(rows, "bag", lambda v, idx, table: jnp.zeros((v.shape[0], table.shape[1])))
  w_dec = jax.random.normal(jax.random.key(1), (D_SAE, D_IN))
  decode = lambda f: features.SparseCodes(SLOTS).decode(f, w_dec)
  assert float(jnp.max(jnp.abs(decode(_codes(jax.random.key(0), SLOTS))))) == 0.0
  assert float(jnp.max(jnp.abs(decode(_codes(jax.random.key(0), SLOTS + 1))))) > 0.0
