"""The SAE architectures, by the name `config.sae.architecture` uses.

Adding an architecture: write its module (an `SAE` subclass, see `gsae_jax/sae/base.py`) and add
one line below. Everything else (configs, training, sweeps, plan, export, evaluation, reports,
benchmarks, the parametrised tests) asks this table.
"""

from __future__ import annotations

import ml_collections

from gsae_jax.sae.base import SAE
from gsae_jax.sae.baseline import BaselineSAE
from gsae_jax.sae.batchtopk import BatchTopKSAE
from gsae_jax.sae.gated import GatedSAE
from gsae_jax.sae.jumprelu import JumpReLUSAE
from gsae_jax.sae.matryoshka import MatryoshkaSAE
from gsae_jax.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {cls.NAME: cls for cls in (
    GatedSAE,
    BaselineSAE,
    JumpReLUSAE,
    TopKSAE,
    BatchTopKSAE,
    MatryoshkaSAE,
)}


def names() -> tuple[str, ...]:
  return tuple(ARCHITECTURES)


def get(name: str) -> type[SAE]:
  """The SAE class registered as `name`; ValueError naming the known ones otherwise."""
  if name not in ARCHITECTURES:
    raise ValueError(f"sae.architecture={name!r}: expected one of {names()}")
  return ARCHITECTURES[name]


def by_saelens_name(saelens_architecture: str) -> type[SAE]:
  """Our class for a SAELens `architecture`; ValueError naming the ones we can import."""
  for cls in ARCHITECTURES.values():
    if cls.SAELENS_ARCHITECTURE == saelens_architecture:
      return cls
  known = sorted({c.SAELENS_ARCHITECTURE for c in ARCHITECTURES.values()} - {None})
  raise ValueError(f"SAELens architecture {saelens_architecture!r} has no gsae_jax equivalent; "
                   f"supported: {known}")


def default_blocks() -> dict[str, ml_collections.ConfigDict]:
  """{name: default config block} of every architecture (`config.sae.<name>`)."""
  return {name: cls.default_config() for name, cls in ARCHITECTURES.items()}
