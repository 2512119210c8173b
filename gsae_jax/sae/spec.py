"""The typed description of a run's SAE, read once from the config and passed down.

`describe(config, d_in)` resolves `config.sae.architecture` in the registry, takes that
architecture's config block, the sweep (which coefficient, which values) and traces the module
once for its graphdef and abstract parameters. Training, sweeps, the plan, export and evaluation
take this record instead of re-reading the config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from gsae_jax.sae import features, registry
from gsae_jax.sae.base import SAE


@dataclasses.dataclass(frozen=True)
class Sweep:
  """One SAE per value of one named coefficient, trained in one data pass (vmap)."""
  coefficient: str
  grid: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class SAESpec:
  """What a run's SAE is: architecture, its config block, sizes, sweep, graph and shapes."""
  architecture: type[SAE]
  block: ml_collections.FrozenConfigDict  # as built (integer sweep bounds applied)
  d_in: int
  d_sae: int
  param_dtype: str
  seed: int
  sweep: Sweep | None
  graphdef: Any
  abstract_params: Mapping[str, jax.ShapeDtypeStruct]

  @property
  def name(self) -> str:
    return self.architecture.NAME

  @property
  def logical_axes(self) -> Mapping[str, tuple[str, ...]]:
    return self.architecture.LOGICAL_AXES

  @property
  def members(self) -> int:
    """SAEs trained side by side: the sweep's size, or 1."""
    return len(self.sweep.grid) if self.sweep else 1

  def build(self) -> SAE:
    """The module with freshly initialised weights (seeded by the config's seed)."""
    return _build(self.architecture, self.block, self.d_in, self.d_sae, self.param_dtype,
                  self.seed)

  def init_params(self) -> dict[str, jax.Array]:
    return nnx.to_pure_dict(nnx.split(self.build())[1])

  def coefficient_values(self) -> dict[str, float]:
    """Each coefficient's value in the block (for a swept one, see `member_coefficients`)."""
    return {c.name: self.block[c.field] for c in self.architecture.COEFFICIENTS}

  def sweep_values(self) -> jax.Array | None:
    """[members] values of the swept coefficient, or None."""
    if not self.sweep:
      return None
    coef = self.architecture.coefficient(self.sweep.coefficient)
    return jnp.asarray(self.sweep.grid, jnp.int32 if coef.integer else jnp.float32)

  def coefficients_at(self, step: jax.Array, swept: jax.Array | None = None) -> dict[str, Any]:
    """{name: value} at `step`: each value times its linear warm-up factor (0 -> 1 over the
    block's warm-up steps); `swept` replaces the swept coefficient's value (one member's)."""
    out = {}
    for c in self.architecture.COEFFICIENTS:
      value = swept if self.sweep and c.name == self.sweep.coefficient else self.block[c.field]
      warmup = self.block[c.warmup_field] if c.warmup_field else 0
      if warmup > 0:
        value = value * optax.linear_schedule(0.0, 1.0, warmup)(step)
      out[c.name] = value
    return out

  def member_coefficients(self) -> list[dict[str, float]]:
    """The coefficients of each member (no warm-up): what a report shows per SAE."""
    base = self.coefficient_values()
    if not self.sweep:
      return [base]
    return [{**base, self.sweep.coefficient: v} for v in self.sweep.grid]

  def member(self, i: int) -> "SAESpec":
    """The single-SAE spec of sweep member i: its block holds the member's coefficient value
    (an integer coefficient such as k becomes the module's static size again)."""
    if not self.sweep:
      return self
    coef = self.architecture.coefficient(self.sweep.coefficient)
    block = self.block.as_configdict()
    block[coef.field] = self.sweep.grid[i]
    return _describe(self.architecture, block, self.d_in, self.d_sae, self.param_dtype,
                     self.seed, None)

  def largest_integer_coefficient(self) -> int:
    """The largest value an integer coefficient (TopK's k) takes in the run; 0 if none."""
    values = [int(self.block[c.field]) for c in self.architecture.COEFFICIENTS if c.integer]
    return max(values, default=0)

  def support_products(self) -> tuple[str, ...] | None:
    """The encoder weights whose products the sparse step's support search computes (and the
    step reuses), or None if the architecture, as configured, has no sparse step."""
    x = jax.ShapeDtypeStruct((1, self.d_in), jnp.float32)
    names = []

    def score(params, x):
      swept = self.sweep_values()[0] if self.sweep else None
      coefficients = self.coefficients_at(jnp.zeros((), jnp.int32), swept)
      recorder = features.Recorder()
      out = nnx.merge(self.graphdef, params).support_score(x, coefficients, recorder)
      names.extend(recorder.products)
      return out

    return None if jax.eval_shape(score, self.abstract_params, x) is None else tuple(names)

  def metadata(self) -> dict:
    """What an export records about the SAE (JSON-able)."""
    return {"architecture": self.name, "d_in": self.d_in, "d_sae": self.d_sae,
            "architecture_config": self.block.to_dict()}


def _build(cls, block, d_in, d_sae, param_dtype, seed) -> SAE:
  return cls(d_in, d_sae, block, rngs=nnx.Rngs(params=seed), dtype=jnp.dtype(param_dtype))


def sweep_of(config, cls: type[SAE]) -> Sweep | None:
  """The config's sweep (`config.sweep.grid` over `config.sweep.coefficient`, default the
  architecture's first coefficient), or None for a single SAE."""
  sweep = config.get("sweep") or {}
  values = tuple(sweep.get("grid", ()) or ())
  if not values:
    return None
  name = sweep.get("coefficient") or cls.COEFFICIENTS[0].name
  coef = cls.coefficient(name)
  return Sweep(name, tuple(int(v) if coef.integer else float(v) for v in values))


def describe(config, d_in: int) -> SAESpec:
  """The SAESpec of `config` (an ml_collections ConfigDict with `sae`, `seed`, `sweep`)."""
  sae = config.sae
  cls = registry.get(sae.architecture)
  block = sae.get(cls.NAME) or cls.default_config()
  sweep = sweep_of(config, cls)
  if sweep:
    block = cls.with_coefficient_bound(block, sweep.coefficient, max(sweep.grid))
  return _describe(cls, block, d_in, int(sae.d_sae), sae.param_dtype, int(config.seed), sweep)


def _describe(cls, block, d_in, d_sae, param_dtype, seed, sweep) -> SAESpec:
  block = ml_collections.FrozenConfigDict(block)
  module = nnx.eval_shape(lambda: _build(cls, block, d_in, d_sae, param_dtype, seed))
  graphdef, params = nnx.split(module)
  return SAESpec(cls, block, d_in, d_sae, param_dtype, seed, sweep, graphdef,
                 nnx.to_pure_dict(params))


def from_metadata(metadata: Mapping, param_dtype: str = "float32") -> SAESpec:
  """The SAESpec of an export's metadata (`SAESpec.metadata()`, as in sae.json)."""
  c = ml_collections.ConfigDict({"seed": 0, "sae": {
      "architecture": metadata["architecture"], "d_sae": metadata["d_sae"],
      "param_dtype": param_dtype,
      metadata["architecture"]: _block_with_defaults(metadata["architecture"],
                                                     metadata.get("architecture_config", {}))}})
  return describe(c, metadata["d_in"])


def _block_with_defaults(name: str, fields: Mapping) -> ml_collections.ConfigDict:
  block = registry.get(name).default_config()
  unknown = set(fields) - set(block)
  if unknown:
    raise ValueError(f"{name} config: unknown fields {sorted(unknown)}; expected {sorted(block)}")
  block.update(dict(fields))
  return block
