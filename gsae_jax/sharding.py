"""Mesh construction and the logical-axis -> mesh-axis rules table (MaxText style).

We use `AxisType.Auto` (GSPMD propagation) rather than the Explicit default of `jax.make_mesh`:
the decoder matmul f[batch, d_sae] @ W_dec[d_sae, d_in] contracts the sharded feature axis, and
Auto lets XLA insert the one reduce it needs without `out_sharding=` annotations in the math.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "model")
DEFAULT_RULES = (("batch", "data"), ("features", "model"), ("d_in", None))


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'model') mesh; data=-1 takes all devices left after `model`."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    if len(devices) % model:
      raise ValueError(f"mesh.model={model} does not divide the {len(devices)} devices")
    data = len(devices) // model
  if data * model > len(devices):
    raise ValueError(f"mesh data={data} x model={model} needs {data * model} devices, "
                     f"found {len(devices)}")
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices[: data * model])


def logical_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> P:
  """Maps logical axis names to a PartitionSpec with the rules table."""
  table = dict(rules)
  return P(*(table.get(a) if a is not None else None for a in axes))


def param_specs(params: Mapping[str, jax.Array], logical_axes: Mapping[str, tuple],
                rules=DEFAULT_RULES) -> dict[str, P]:
  """PartitionSpec per parameter from the architecture's LOGICAL_AXES."""
  return {name: logical_spec(logical_axes[name], rules) for name in params}


def named(mesh: Mesh, specs):
  """A pytree of PartitionSpecs -> NamedShardings on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda s: isinstance(s, P))


def batch_spec(rules=DEFAULT_RULES) -> P:
  """[batch, d_in] activations: batch on the data axis."""
  return logical_spec(("batch", "d_in"), rules)

