import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax.sae.gate import heaviside

Z = jnp.array([-2.0, -0.6, -0.2, 0.0, 0.1, 0.4, 0.9, 1.5])


def _grad(mode, eps=1.0, clip=False):
  return jax.grad(lambda z: jnp.sum(heaviside(z, mode, eps, clip) * jnp.arange(1.0, 9.0)))(Z)


@pytest.mark.parametrize("mode", ["zero", "straight_through", "rectangle"])
def test_forward_is_indicator_of_positive(mode):
  np.testing.assert_array_equal(heaviside(Z, mode), (Z > 0).astype(Z.dtype))


def test_zero_backward():
  np.testing.assert_array_equal(_grad("zero"), np.zeros(8))


def test_straight_through_backward():
  w = np.arange(1.0, 9.0)
  np.testing.assert_array_equal(_grad("straight_through"), w)
  np.testing.assert_array_equal(_grad("straight_through", clip=True), w * (np.abs(Z) <= 1.0))


def test_rectangle_backward():
  eps = 0.5
  w = np.arange(1.0, 9.0)
  expected = w * (np.abs(np.asarray(Z)) < eps / 2) / eps
  np.testing.assert_allclose(_grad("rectangle", eps=eps), expected)
  assert expected[2] != 0 and expected[4] != 0 and expected[5] == 0  # the window is (-0.25, 0.25)


def test_gate_under_jit_and_vmap():
  f = jax.jit(jax.vmap(lambda z: heaviside(z, "rectangle", 0.5)))
  np.testing.assert_array_equal(f(Z[None]), (Z[None] > 0).astype(Z.dtype))
