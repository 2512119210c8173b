"""SAEBench's core-eval layout: the field names of SAEBench 0.6.0 (copied below from
`sae_bench/evals/core/eval_output_schema_core.json`, as SAEBench is not a dependency), our
metrics under them in the LM's units, nulls only where we compute nothing, strict JSON; and, where
SAEBench is importable, its own pydantic model accepts the file."""

import json

import jax
import numpy as np
import pytest

from gsae_jax.eval import evaluate, saebench
from gsae_jax.sae.spec import from_metadata

REQUIRED_TOP = ["eval_config", "eval_id", "datetime_epoch_millis", "eval_result_metrics",
                "sae_bench_commit_hash", "sae_lens_id", "sae_lens_release_id", "sae_lens_version",
                "sae_cfg_dict"]
OPTIONAL_TOP = ["eval_type_id", "eval_result_details", "eval_result_unstructured"]
CONFIG = ["model_name", "llm_dtype", "batch_size_prompts", "n_eval_reconstruction_batches",
          "n_eval_sparsity_variance_batches", "dataset", "context_size", "compute_kl",
          "compute_ce_loss", "compute_l2_norms", "compute_sparsity_metrics",
          "compute_variance_metrics", "compute_featurewise_density_statistics",
          "compute_featurewise_weight_based_metrics",
          "exclude_special_tokens_from_reconstruction", "verbose"]
METRICS = {
    "model_behavior_preservation": ["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"],
    "model_performance_preservation": ["ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"],
    "reconstruction_quality": ["explained_variance", "explained_variance_legacy", "mse",
                               "cossim"],
    "shrinkage": ["l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"],
    "sparsity": ["l0", "l1"],
    "token_stats": ["total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"],
    "misc_metrics": ["freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                     "frac_alive"],
}
NOT_COMPUTED: set = set()  # every field is filled for an SAE SAELens can hold
SOURCE = {"model_id": "fake/lm", "site": "blocks.1.resid_post", "context_length": 32}
SCALE = 2.0


def _run() -> tuple[dict, object]:
  """A run dict as evaluation.evaluate_runs fills it: real activation metrics of a Gated SAE
  on random data (in normalised units) and LM metrics."""
  spec = from_metadata({"architecture": "gated", "d_in": 8, "d_sae": 16})
  xs = [jax.random.normal(jax.random.key(i), (32, 8)) * SCALE for i in range(2)]
  metrics, density = evaluate.activation_metrics(spec.graphdef, spec.init_params(), xs)
  lm = {"ce_loss_score": 0.8, "ce_loss_with_sae": 3.2, "ce_loss_without_sae": 3.0,
        "ce_loss_with_ablation": 4.0, "delta_lm_loss": 0.2, "kl_div_score": 0.9,
        "kl_div_with_sae": 0.1, "kl_div_with_ablation": 1.0, "lm_tokens": 124}
  params = jax.tree.map(np.asarray, spec.init_params())
  return {"name": "gated_0", "step": 5, "coefficients": {"l1": 1.0}, **metrics, **lm,
          "log10_density": density, "params": params}, spec


def _output() -> tuple[dict, dict]:
  run, spec = _run()
  out = saebench.core_eval_output(run, spec, SOURCE, SCALE, {"batch_size_prompts": 8},
                                  now_ms=1_700_000_000_000)
  return json.loads(json.dumps(out, allow_nan=False)), run


def test_field_names_are_saebench_core():
  out, _ = _output()
  assert sorted(out) == sorted(REQUIRED_TOP + OPTIONAL_TOP)
  assert out["eval_type_id"] == "core"
  assert sorted(out["eval_config"]) == sorted(CONFIG)
  assert {g: sorted(v) for g, v in out["eval_result_metrics"].items()} == \
      {g: sorted(v) for g, v in METRICS.items()}


def test_values_are_ours_in_the_lms_units_and_null_only_where_not_computed():
  out, run = _output()
  got = out["eval_result_metrics"]
  for group, names in METRICS.items():
    for name in names:
      assert (got[group][name] is None) == ((group, name) in NOT_COMPUTED), (group, name)
  assert got["model_behavior_preservation"]["kl_div_score"] == 0.9
  assert got["model_performance_preservation"]["ce_loss_with_ablation"] == 4.0
  quality = got["reconstruction_quality"]
  assert quality["explained_variance"] == run["explained_variance"]
  assert quality["explained_variance_legacy"] == run["explained_variance_per_token"]
  np.testing.assert_allclose(quality["mse"], run["mse"] / SCALE ** 2)
  np.testing.assert_allclose(got["shrinkage"]["l2_norm_in"], run["l2_norm_in"] / SCALE)
  assert got["shrinkage"]["l2_ratio"] == run["l2_ratio"]
  assert got["sparsity"] == {"l0": run["l0"], "l1": run["l1"]}
  assert got["token_stats"] == {"total_tokens_eval_reconstruction": 124,
                                "total_tokens_eval_sparsity_variance": 64}
  density = 10.0 ** run["log10_density"]
  np.testing.assert_allclose(got["misc_metrics"]["frac_alive"], np.mean(density > 0))
  np.testing.assert_allclose(got["misc_metrics"]["freq_over_10_percent"], np.mean(density > 0.1))
  config = out["eval_config"]
  assert config["batch_size_prompts"] == 8 and config["compute_kl"] and config["model_name"] == "fake/lm"
  assert out["sae_cfg_dict"]["architecture"] == "gated"
  assert out["sae_cfg_dict"]["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
  assert out["eval_result_unstructured"]["fvu"] == run["fvu"]


def test_density_metrics():
  log10 = np.r_[np.log10([0.5, 0.05, 0.005]), -np.inf]  # the last never fired
  m = saebench.density_metrics(log10)
  assert m["frac_alive"] == 0.75
  assert m["freq_over_1_percent"] == 0.5 and m["freq_over_10_percent"] == 0.25
  np.testing.assert_allclose(m["normalized_freq_over_1_percent"], 0.55 / 0.555)
  np.testing.assert_allclose(m["normalized_freq_over_10_percent"], 0.5 / 0.555)


def test_without_lm_the_lm_groups_are_null():
  run, spec = _run()
  for key in ("ce_loss_score", "kl_div_score", "kl_div_with_sae", "lm_tokens"):
    run.pop(key)
  out = saebench.core_eval_output(run, spec, SOURCE, SCALE, {})
  assert out["eval_result_metrics"]["model_behavior_preservation"]["kl_div_score"] is None
  assert not out["eval_config"]["compute_kl"] and out["eval_config"]["compute_variance_metrics"]


def test_saebench_pydantic_model_accepts_the_file():
  """SAEBench is not a dependency (its numpy<2 pin clashes with ours): runs where it is
  importable, e.g. PYTHONPATH=<unpacked sae_bench wheel>. Its model types every metric as float,
  so the two we leave null are filled for this check."""
  eval_output = pytest.importorskip("sae_bench.evals.core.eval_output")
  from pydantic import TypeAdapter
  out, _ = _output()
  for group, name in NOT_COMPUTED:
    out["eval_result_metrics"][group][name] = 0.0
  parsed = TypeAdapter(eval_output.CoreEvalOutput).validate_python(out)
  assert parsed.eval_result_metrics.model_behavior_preservation.kl_div_score == 0.9


def test_weight_metrics_are_saebench_max_cosine_on_the_saelens_weights():
  out, run = _output()
  misc = out["eval_result_metrics"]["misc_metrics"]
  w_gate, w_dec = run["params"]["W_gate"], run["params"]["W_dec"]  # SAELens' Gated W_enc, W_dec

  def brute(rows):  # every pair, the feature itself excluded
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1).mean()

  np.testing.assert_allclose(misc["average_max_encoder_cosine_sim"], brute(w_gate.T), rtol=1e-5)
  np.testing.assert_allclose(misc["average_max_decoder_cosine_sim"], brute(w_dec), rtol=1e-5)
  from gsae_jax.eval.metrics import max_cosine_to_others
  np.testing.assert_allclose(max_cosine_to_others(w_dec, chunk=3).mean(), brute(w_dec), rtol=1e-6)
