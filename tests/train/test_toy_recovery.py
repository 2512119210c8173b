"""Toy ground truth (GATED_SAE.md): at matched L0, Gated is unbiased and recovers the features,
the baseline shrinks. n=64, 256 true features, dictionary 512, the synthetic experiment config."""

import pytest

from experiments import synthetic
from gsae_jax import sharding
from gsae_jax.data.sources import make_source
from gsae_jax.eval.metrics import mean_max_cosine
from gsae_jax.sae.spec import describe
from gsae_jax.train.loop import train

# Lambdas chosen once (sweep over 1, 3, 10) so both land near the same L0 (about 9).
L1 = {"gated": 3.0, "baseline": 3.0}


def _train(architecture, compute_dtype="float32"):
  c = synthetic.get_config()
  c.sae.architecture = architecture
  c.train.compute_dtype = compute_dtype
  c.sae[architecture].l1_coefficient = L1[architecture]
  c.train.log_every = c.train.steps
  mesh = sharding.make_mesh(1, 1)
  source = make_source(c, mesh)
  final = {}
  state = train(c, mesh, source.batches, describe(c, source.d_in), lambda s, m: final.update(m))
  final["mmcs"] = float(mean_max_cosine(state.params["W_dec"], source.ground_truth))
  return final


@pytest.fixture(scope="module")
def results():
  return {**{arch: _train(arch) for arch in ("gated", "baseline")},
          "gated_bf16": _train("gated", "bfloat16")}


def test_matched_l0(results):
  l0_g, l0_b = results["gated"]["l0"], results["baseline"]["l0"]
  assert abs(l0_g - l0_b) / l0_b < 0.2, (l0_g, l0_b)


@pytest.mark.parametrize("run", ["gated", "gated_bf16"])
def test_gated_is_unbiased_and_recovers_features(results, run):
  """Also with bf16 matmuls (train.compute_dtype): the same thresholds as float32."""
  g = results[run]
  assert abs(g["gamma"] - 1) < 0.02, g
  assert g["mmcs"] >= 0.9, g
  assert abs(g["l0"] - results["gated"]["l0"]) / results["gated"]["l0"] < 0.2, g


def test_baseline_shrinks(results):
  assert results["baseline"]["gamma"] < 0.95, results["baseline"]
