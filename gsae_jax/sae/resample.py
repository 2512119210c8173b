"""Dead-feature resampling (Bricken et al. 2023), for every architecture.

Dead features get a decoder row equal to a normalised input drawn with probability proportional
to its squared reconstruction loss, an encoder column of that direction scaled to 0.2 x the mean
alive encoder norm, zero biases, and zeroed Adam moments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gsae_jax.sae.constraints import unit_rows

ENCODER_NORM_SCALE = 0.2


def resample_dead(params: dict, opt_state, x: jax.Array, dead: jax.Array, key: jax.Array, *,
                  graphdef, tx: optax.GradientTransformation, logical_axes: dict):
  """Returns (params, opt_state) with `dead` [d_sae] features re-initialised from batch x."""
  sae = nnx.merge(graphdef, params)
  per_token_loss = jnp.sum(jnp.square(x - sae.decode(sae.encode(x))), axis=-1)
  idx = jax.random.categorical(key, jnp.log(jnp.square(per_token_loss) + 1e-30), shape=dead.shape)
  directions = unit_rows(x[idx].astype(jnp.float32)).astype(x.dtype)
  enc_norms = jnp.linalg.norm(sae.encoder_weight(), axis=0)
  n_alive = jnp.sum(~dead)
  mean_alive = jnp.where(n_alive > 0, jnp.sum(jnp.where(dead, 0.0, enc_norms)) / jnp.maximum(n_alive, 1), 1.0)
  sae.reinit_features(dead, directions, ENCODER_NORM_SCALE * mean_alive)
  new_params = nnx.to_pure_dict(nnx.split(sae)[1])

  def reset_moments(leaf, name):
    axes = logical_axes[name]
    if "features" not in axes:
      return leaf
    shape = [1] * leaf.ndim
    shape[axes.index("features")] = -1
    return jnp.where(dead.reshape(shape), jnp.zeros_like(leaf), leaf)

  names = {name: name for name in params}
  new_opt_state = optax.tree_utils.tree_map_params(tx, reset_moments, opt_state, names,
                                                   is_leaf=lambda v: isinstance(v, str))
  return new_params, new_opt_state
