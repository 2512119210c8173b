"""Toy ground truth for the architectures added beside Gated and the baseline: trained with the
synthetic experiment's settings (`experiments/synthetic.py`, true L0 = 4 of 256 features), each
recovers the true features (mean max cosine >= 0.9) at an L0 within 20% of the true L0.
Gated and the baseline have their matched-L0 comparison in test_toy_recovery.py."""

import pytest
from flax import nnx

from experiments import synthetic
from gsae_jax import sharding
from gsae_jax.data.sources import make_source
from gsae_jax.eval.metrics import mean_max_cosine
from gsae_jax.sae import registry
from gsae_jax.sae.spec import describe
from gsae_jax.train.loop import train

NEW_ARCHITECTURES = ("jumprelu", "topk", "batchtopk", "matryoshka")


def _train(architecture: str) -> dict:
  c = synthetic.get_config()
  c.sae.architecture = architecture
  c.train.log_every = c.train.steps
  mesh = sharding.make_mesh(1, 1)
  source = make_source(c, mesh)
  spec = describe(c, source.d_in)
  final = {}
  state = train(c, mesh, source.batches, spec, lambda s, m: final.update(m))
  # L0 of the SAE as it will be used (inference encode), on fresh synthetic batches.
  module = nnx.merge(spec.graphdef, state.params)
  l0 = sum(float((module.encode(next(source.batches)) > 0).sum(-1).mean()) for _ in range(4)) / 4
  return {"train_l0": final["l0"], "l0": l0, "true_l0": c.data.fire_prob * c.data.m_true,
          "mmcs": float(mean_max_cosine(state.params["W_dec"], source.ground_truth))}


@pytest.mark.parametrize("architecture", NEW_ARCHITECTURES)
def test_recovers_true_features_at_true_l0(architecture):
  assert architecture in registry.names()
  r = _train(architecture)
  assert abs(r["l0"] - r["true_l0"]) <= 0.2 * r["true_l0"], r
  assert r["mmcs"] >= 0.9, r
