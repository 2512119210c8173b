import jax
import jax.numpy as jnp
import numpy as np
import optax

from gsae_jax.sae.constraints import remove_parallel_component, unit_rows, with_unit_norm_decoder


def test_projected_gradient_is_orthogonal_to_each_row():
  k1, k2 = jax.random.split(jax.random.key(0))
  w = unit_rows(jax.random.normal(k1, (20, 8)))
  g = jax.random.normal(k2, (20, 8))
  proj = remove_parallel_component(g, w)
  np.testing.assert_allclose(jnp.sum(proj * w, axis=-1), 0.0, atol=1e-6)
  # The orthogonal part is untouched: projecting twice changes nothing.
  np.testing.assert_allclose(remove_parallel_component(proj, w), proj, atol=1e-6)
  assert float(jnp.max(jnp.abs(g - proj))) > 1e-3


def test_rows_stay_unit_norm_and_other_params_are_plain_adam():
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {"W_dec": unit_rows(jax.random.normal(k1, (16, 4))), "b": jnp.zeros(4)}
  tx = with_unit_norm_decoder(optax.adam(0.1, b1=0.0, b2=0.999))
  plain = optax.adam(0.1, b1=0.0, b2=0.999)
  state, plain_state, plain_b = tx.init(params), plain.init(params["b"]), params["b"]
  for i in range(5):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(k2, i), p.shape), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(jnp.linalg.norm(params["W_dec"], axis=-1), 1.0, rtol=1e-6)
    b_update, plain_state = plain.update(grads["b"], plain_state, plain_b)
    plain_b = optax.apply_updates(plain_b, b_update)
  np.testing.assert_allclose(params["b"], plain_b, rtol=1e-6)
