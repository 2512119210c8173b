"""The CPU row kernels (gsae_jax/kernels/rows.cc) against NumPy references: values, gradients,
duplicate indices, zero slots, padding, and refusals of bad operands."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax.kernels import rows

B, K, M, N = 12, 5, 40, 7


def _operands(dtype, seed=0):
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, M, (B, K)).astype(np.int32)
  idx[0, :] = 3  # one token whose slots all hold the same row
  v = rng.standard_normal((B, K)).astype(dtype)
  v[1, 2:] = 0  # zero slots (skipped by bag and scatter)
  table = rng.standard_normal((M, N)).astype(dtype)
  g = rng.standard_normal((B, N)).astype(dtype)
  return v, idx, table, g


@pytest.fixture(autouse=True)
def float64():
  with jax.enable_x64(True):
    yield


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bag_dot_scatter_equal_numpy(dtype):
  v, idx, table, g = _operands(dtype)
  tol = 1e-5 if dtype == np.float32 else 1e-12
  np.testing.assert_allclose(rows.bag(v, idx, table), np.einsum("bk,bkn->bn", v, table[idx]),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(rows.dot(g, idx, table), np.einsum("bn,bkn->bk", g, table[idx]),
                             rtol=tol, atol=tol)
  want = np.zeros((M, N), dtype)
  np.add.at(want, idx.reshape(-1), (v[..., None] * g[:, None, :]).reshape(-1, N))
  np.testing.assert_allclose(rows.scatter(v, idx, g, M), want, rtol=tol, atol=tol)
  assert rows.bag(v, idx, table).dtype == dtype


def test_bag_gradients_equal_the_gather_einsum():
  v, idx, table, g = _operands(np.float64, seed=1)
  loss = lambda bag: lambda v, t: jnp.sum(jnp.sin(bag(v, idx, t)))
  reference = lambda v, idx, t: jnp.einsum("bk,bkn->bn", v, t[idx])
  got = jax.grad(loss(rows.bag), argnums=(0, 1))(v, table)
  want = jax.grad(loss(reference), argnums=(0, 1))(v, table)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_positive_slots_in_feature_order_padded_and_counted():
  score = np.array([[-1.0, 2.0, 0.0, 3.0, -2.0, 1.0],    # 3 positive: 1, 3, 5; pad 0
                    [5.0, 4.0, 3.0, 2.0, 1.0, -1.0],     # 5 positive: more than 4 slots
                    [0.0, -1.0, -1.0, -1.0, -1.0, -1.0]])  # none: all padding (feature 0)
  idx, count = rows.positive_slots(jnp.asarray(score), 4)
  np.testing.assert_array_equal(count, [3, 5, 0])
  np.testing.assert_array_equal(idx[0], [1, 3, 5, 0])
  np.testing.assert_array_equal(idx[1], [0, 1, 2, 3])
  np.testing.assert_array_equal(idx[2], [0, 0, 0, 0])
  assert np.all(score[0, idx[0, 3:]] <= 0)  # padding adds nothing to a sparse step


def test_bad_operands_are_refused():
  v, idx, table, _ = _operands(np.float64)
  bad = idx.copy()
  bad[2, 1] = M  # out of the table
  with pytest.raises(Exception, match="out of range"):
    jax.block_until_ready(rows.bag(v, bad, table))
  with pytest.raises(Exception, match="different dtypes"):
    jax.block_until_ready(rows.bag(v.astype(np.float32), idx, table))
