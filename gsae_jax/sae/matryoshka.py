"""Matryoshka BatchTopK SAE (Bussmann et al. 2025, arXiv 2503.17547): nested dictionaries.

Prefix sizes m_1 < ... < m_L = M; each prefix of the latents reconstructs x on its own:
    f = BatchTopK(ReLU(W_enc (x - b_dec) + b_enc))          (as `gsae_jax.sae.batchtopk`)
    x_hat_m = f_{1:m} W_dec[1:m] + b_dec
    L = sum_{m in {m_1..m_L}} ||x - x_hat_m||^2 + alpha ||e - e_hat||^2,   e = sg(x - x_hat_M)
AuxK on the full reconstruction's error, as in the authors' code. Their code also adds a
b_dec-only term ||x - b_dec||^2 and averages the L + 1 terms; we sum the paper's L prefixes.
Inference (threshold theta) and the SAELens export (JumpReLU) are BatchTopK's.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gsae_jax.sae.base import sum_sq
from gsae_jax.sae.batchtopk import BatchTopKSAE
from gsae_jax.sae.features import ALL


def prefix_sizes(fractions: Sequence[float], d_sae: int) -> tuple[int, ...]:
  """m_i = round(fraction_i * d_sae); ValueError unless 1 <= m_1 < ... < m_L = d_sae."""
  sizes = tuple(int(round(f * d_sae)) for f in fractions)
  if sizes[0] < 1 or sizes[-1] != d_sae or any(a >= b for a, b in zip(sizes, sizes[1:])):
    raise ValueError(f"sae.matryoshka.prefix_fractions={tuple(fractions)} with d_sae={d_sae}: "
                     f"expected prefix sizes 1 <= m_1 < ... < m_L = d_sae, found {sizes}")
  return sizes


class MatryoshkaSAE(BatchTopKSAE):
  """Matryoshka SAE with BatchTopK activations; shapes as in `SAE`."""

  NAME = "matryoshka"
  # The per-prefix decodes are one f @ W_dec split into groups: the FLOPs stay BatchTopK's.
  # Fitted to XLA's memory_analysis (k ~ 7.6-10.1 on the three meshes): slicing the sharded
  # feature axis into prefix groups reshards f, two buffers more than BatchTopK.
  ACTIVATION_BUFFERS = 9
  SAELENS_TRAINING_ARCHITECTURE = "matryoshka_batchtopk"
  DECODER_PRODUCTS = 6    # the 5 default groups' partial decodes (stacked) and AuxK's e_hat

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    block = super().default_config()
    # The authors' code: groups of M/16, M/16, M/8, M/4, M/2 latents.
    block.prefix_fractions = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
    return block

  @classmethod
  def validate_config(cls, block, check) -> None:
    super().validate_config(block, check)
    fr = tuple(block.prefix_fractions)
    check(len(fr) >= 1 and all(0 < a < b for a, b in zip(fr, fr[1:])) and fr[0] > 0
          and fr[-1] == 1.0, "prefix_fractions",
          "increasing fractions of d_sae in (0, 1], the last 1.0", fr)

  def __init__(self, d_in: int, d_sae: int, block=None, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32):
    b = self.default_config() if block is None else block
    super().__init__(d_in, d_sae, b, rngs=rngs, dtype=dtype)
    self.prefixes = prefix_sizes(b.prefix_fractions, d_sae)

  def reconstruction(self, x: jax.Array, f: jax.Array, view=ALL) -> tuple[jax.Array, jax.Array]:
    """(sum over prefixes of ||x - x_hat_m||^2, x_hat_M). Each group's partial decode
    f[:, m_{i-1}:m_i] W_dec[m_{i-1}:m_i] is computed once and cumulatively summed, so the
    decoder costs 2 n M FLOPs per token, not L times that."""
    w_dec, bounds = self.W_dec[...], (0,) + self.prefixes
    partials = view.group_decodes(f, w_dec, bounds)
    x_hats = jnp.cumsum(partials, axis=0) + self.b_dec[...]  # [L, batch, d_in]
    return sum(sum_sq(x - x_hat) for x_hat in x_hats), x_hats[-1]
