"""The Heaviside gate H(z) = 1[z > 0] as a `jax.custom_vjp` with a configurable backward.

GATED_SAE.md section 3: `zero` (the paper), `straight_through` (optionally clipped to |z| <= 1)
and `rectangle(eps)` (the JumpReLU kernel pseudo-derivative).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

GATE_BACKWARD_MODES = ("zero", "straight_through", "rectangle")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def heaviside(z: jax.Array, mode: str = "zero", eps: float = 1.0, clip: bool = False) -> jax.Array:
  """Returns 1[z > 0] in z's dtype; the backward is chosen by `mode` (see module docstring)."""
  return (z > 0).astype(z.dtype)


def _heaviside_fwd(z, mode, eps, clip):
  return heaviside(z, mode, eps, clip), z


def _heaviside_bwd(mode, eps, clip, z, g):
  if mode == "zero":
    return (None,)  # a symbolic zero: no [batch, d_sae] cotangent is computed at all
  if mode == "straight_through":
    dh_dz = (jnp.abs(z) <= 1.0).astype(z.dtype) if clip else jnp.ones_like(z)
  elif mode == "rectangle":
    dh_dz = rectangle(z, eps)
  else:
    raise ValueError(f"gate backward mode {mode!r}: expected one of {GATE_BACKWARD_MODES}")
  return (g * dh_dz,)


heaviside.defvjp(_heaviside_fwd, _heaviside_bwd)


def rectangle(z: jax.Array, eps: float) -> jax.Array:
  """The rectangle kernel at bandwidth eps, K(z / eps) / eps with K(u) = 1[|u| < 1/2]: the
  pseudo-derivative of H(z) (JumpReLU paper, Eqs. 11-12); also used by `sae/jumprelu.py`."""
  return (jnp.abs(z) < eps / 2).astype(z.dtype) / eps
