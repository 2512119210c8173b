import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax.eval import metrics


def _x():
  return jax.random.normal(jax.random.key(0), (64, 8)) + 2.0


def test_gamma_of_scaled_reconstruction_is_the_scale():
  x = _x()
  for scale in (0.7, 1.0, 1.3):
    m = metrics.batch_metrics(x, scale * x, jnp.ones((64, 3)))
    np.testing.assert_allclose(m["gamma"], scale, rtol=1e-5)


def test_fvu_perfect_is_zero_and_mean_is_one():
  x = _x()
  f = jnp.zeros((64, 3))
  np.testing.assert_allclose(metrics.batch_metrics(x, x, f)["fvu"], 0.0, atol=1e-7)
  mean = jnp.broadcast_to(jnp.mean(x, 0), x.shape)
  m = metrics.batch_metrics(x, mean, f)
  np.testing.assert_allclose(m["fvu"], 1.0, rtol=1e-4)
  np.testing.assert_allclose(m["explained_variance"], 0.0, atol=1e-4)


def test_l0_counts_active_features_per_token():
  f = jnp.array([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
  x = jnp.ones((2, 5))
  assert float(metrics.batch_metrics(x, x, f)["l0"]) == 1.5


def test_sums_accumulate_like_one_batch():
  x, x_hat = _x(), 0.9 * _x() + 0.1
  f = jax.random.uniform(jax.random.key(2), (64, 5)) - 0.5
  halves = [metrics.reconstruction_sums(x[s], x_hat[s], f[s]) for s in (slice(0, 20), slice(20, 64))]
  total = jax.tree.map(lambda a, b: a + b, *halves)
  whole = metrics.batch_metrics(x, x_hat, f)
  for k, v in metrics.reconstruction_metrics(total).items():
    np.testing.assert_allclose(v, whole[k], rtol=1e-5)


def test_dead_dense_fractions():
  counts = jnp.array([0.0, 0.0, 5.0, 50.0])
  assert float(metrics.dead_fraction(counts)) == 0.5
  assert float(metrics.dense_fraction(counts, 100.0)) == 0.25


def test_mean_max_cosine_recovers_permuted_scaled_dictionary():
  d = jax.random.normal(jax.random.key(3), (10, 6))
  learned = 3.0 * d[::-1]
  np.testing.assert_allclose(metrics.mean_max_cosine(learned, d), 1.0, rtol=1e-6)


def test_token_sums_of_scaled_and_mean_reconstructions():
  x = _x()
  f = jnp.array([[1.0, -2.0, 0.0]] * 64)
  s = metrics.token_metrics(metrics.token_sums(x, 0.5 * x, f))
  np.testing.assert_allclose(s["cossim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(s["l2_ratio"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(s["l2_norm_out"], 0.5 * s["l2_norm_in"], rtol=1e-6)
  np.testing.assert_allclose(s["l2_norm_in"], jnp.mean(jnp.linalg.norm(x, axis=-1)), rtol=1e-6)
  np.testing.assert_allclose(s["l1"], 3.0, rtol=1e-6)
  np.testing.assert_allclose(
      metrics.token_metrics(metrics.token_sums(x, x, f))["explained_variance_per_token"], 1.0)
  mean = jnp.broadcast_to(jnp.mean(x, 0), x.shape)
  per_token = metrics.token_metrics(metrics.token_sums(x, mean, f))
  np.testing.assert_allclose(per_token["explained_variance_per_token"], 0.0, atol=1e-6)


def test_per_token_explained_variance_is_the_mean_of_token_ratios():
  """Unlike the pooled definition, tokens with little variance weigh as much as the others."""
  x = jnp.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 3.0], [0.0, -3.0]])
  x_hat = x + jnp.array([[0.5, 0.0]] * 4)
  s = metrics.token_metrics(metrics.token_sums(x, x_hat, jnp.zeros((4, 1))))
  centred = jnp.sum(jnp.square(x - jnp.mean(x, 0)), axis=-1)
  np.testing.assert_allclose(s["explained_variance_per_token"], jnp.mean(1 - 0.25 / centred),
                             rtol=1e-6)
  pooled = metrics.batch_metrics(x, x_hat, jnp.zeros((4, 1)))["explained_variance"]
  np.testing.assert_allclose(pooled, 1 - 4 * 0.25 / jnp.sum(centred), rtol=1e-6)


def test_kl_div_score():
  assert metrics.kl_div_score(0.0, 2.0) == 1.0
  assert metrics.kl_div_score(2.0, 2.0) == 0.0
  assert metrics.kl_div_score(0.5, 2.0) == 0.75
