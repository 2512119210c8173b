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
