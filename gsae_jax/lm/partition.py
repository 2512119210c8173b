"""How LM parameters are laid out on the ('data', 'model') mesh: rules as data.

`PARAM_AXES` gives each parameter (regex over its dotted path) logical axes; `MESH_RULES` maps
logical axes to mesh axes, one table per strategy. A dimension the mesh axis does not divide is
replicated instead (e.g. a 1-head key projection under tensor parallelism), so any table works on
any mesh; `describe` prints the resulting plan.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PARAM_AXES: tuple[tuple[str, tuple[str | None, ...] | None], ...] = (
    (r"^embed$", ("vocab", "embed")),
    (r"^pos_embed$", (None, "embed")),
    (r"^unembed$", ("embed", "vocab")),
    (r"attn\.[qkv]\.kernel$", ("embed", "heads")),
    (r"attn\.[qkv]\.bias$", ("heads",)),
    (r"attn\.o\.kernel$", ("heads", "embed")),
    (r"mlp\.(gate|up)\.kernel$", ("embed", "mlp")),
    (r"mlp\.(gate|up)\.bias$", ("mlp",)),
    (r"mlp\.down\.kernel$", ("mlp", "embed")),
    (r".*", None),  # norms and d_model-sized biases: small, replicated
)

MESH_RULES: dict[str, dict[str, str | None]] = {
    # FSDP: every matrix split along d_model over 'data', gathered per layer by XLA when used.
    "fsdp": {"embed": "data"},
    # Megatron-style tensor parallelism: heads, MLP hidden units and vocabulary over 'model'.
    "tp": {"heads": "model", "mlp": "model", "vocab": "model"},
    "fsdp_tp": {"embed": "data", "heads": "model", "mlp": "model", "vocab": "model"},
    "replicated": {},
}


def logical_axes(path: str) -> tuple[str | None, ...] | None:
  """Logical axes of a parameter from its dotted path (first matching rule)."""
  for pattern, axes in PARAM_AXES:
    if re.search(pattern, path):
      return axes
  return None


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, strategy: str = "fsdp_tp") -> P:
  """PartitionSpec of one parameter; dims the mesh axis does not divide stay replicated."""
  if strategy not in MESH_RULES:
    raise ValueError(f"lm partition strategy {strategy!r}: expected one of {sorted(MESH_RULES)}")
  axes = logical_axes(path)
  if axes is None:
    return P()
  table = MESH_RULES[strategy]
  spec = []
  for dim, ax in zip(shape, axes):
    mesh_ax = table.get(ax) if ax is not None else None
    spec.append(mesh_ax if mesh_ax is not None and dim % mesh.shape[mesh_ax] == 0 else None)
  return P(*spec)


def sharding_for(path: str, shape: Sequence[int], mesh: Mesh | None,
                 strategy: str = "fsdp_tp") -> jax.sharding.Sharding | None:
  """NamedSharding on `mesh` (None without a mesh: default device)."""
  return None if mesh is None else NamedSharding(mesh, spec_for(path, shape, mesh, strategy))


def describe(shapes: dict[str, tuple[int, ...]], mesh: Mesh, strategy: str = "fsdp_tp") -> str:
  """One line per parameter: path, shape, PartitionSpec (a printable memory plan)."""
  return "\n".join(f"{p:48s} {str(tuple(s)):20s} {spec_for(p, s, mesh, strategy)}"
                   for p, s in shapes.items())
