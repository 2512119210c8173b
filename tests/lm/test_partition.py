"""Partition rules: which mesh axis each LM parameter uses, and replication when it does not divide."""

import pytest
from jax.sharding import PartitionSpec as P

from gsae_jax.lm import partition
from gsae_jax.sharding import make_mesh


def test_rules_per_strategy_and_indivisible_dims_replicate():
  mesh = make_mesh(data=4, model=2)
  assert partition.spec_for("blocks.3.mlp.down.kernel", (128, 64), mesh, "fsdp_tp") == P("model", "data")
  assert partition.spec_for("blocks.3.mlp.down.kernel", (128, 64), mesh, "fsdp") == P(None, "data")
  assert partition.spec_for("blocks.3.mlp.down.kernel", (128, 64), mesh, "tp") == P("model", None)
  assert partition.spec_for("blocks.0.attn.k.kernel", (64, 16), mesh, "tp") == P(None, "model")
  # a 1-head key projection of width 15 cannot split over model=2: replicated, not an error
  assert partition.spec_for("blocks.0.attn.k.kernel", (64, 15), mesh, "tp") == P(None, None)
  assert partition.spec_for("blocks.0.attn_post_norm.scale", (64,), mesh) == P()
  assert partition.spec_for("unembed", (64, 128), mesh) == P("data", "model")
  assert "blocks.0.mlp.up.kernel" in partition.describe({"blocks.0.mlp.up.kernel": (64, 128)}, mesh)
  with pytest.raises(ValueError, match="expected one of"):
    partition.spec_for("embed", (128, 64), mesh, "zero3")
