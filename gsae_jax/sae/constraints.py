"""Unit-norm decoder constraint as optax transformations, shared by every architecture.

Before the optimiser: remove from each decoder row's gradient its component parallel to the row
(so Adam does not fight the constraint). After it: renormalise the rows. Both act on the params
entry named `W_dec` ([d_sae, d_in], one row per feature).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DECODER = "W_dec"


def remove_parallel_component(grad: jax.Array, w_dec: jax.Array) -> jax.Array:
  """grad - (grad . w / w . w) w for each row: [d_sae, d_in] -> [d_sae, d_in]."""
  coef = jnp.sum(grad * w_dec, axis=-1, keepdims=True) / jnp.sum(w_dec * w_dec, axis=-1, keepdims=True)
  return grad - coef * w_dec


def unit_rows(w: jax.Array) -> jax.Array:
  """Each row scaled to unit L2 norm."""
  return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def _replace(tree: dict, name: str, value: jax.Array) -> dict:
  return {**tree, name: value}


def project_decoder_grads(name: str = DECODER) -> optax.GradientTransformation:
  """Removes the gradient component parallel to each decoder row."""

  def update(updates, state, params):
    return _replace(updates, name, remove_parallel_component(updates[name], params[name])), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def renormalise_decoder(name: str = DECODER) -> optax.GradientTransformation:
  """Turns the update of the decoder into one that lands on unit-norm rows."""

  def update(updates, state, params):
    new = unit_rows(params[name] + updates[name])
    return _replace(updates, name, new - params[name]), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def with_unit_norm_decoder(inner: optax.GradientTransformation,
                           name: str = DECODER) -> optax.GradientTransformation:
  """project -> inner optimiser -> renormalise."""
  return optax.chain(project_decoder_grads(name), inner, renormalise_decoder(name))
