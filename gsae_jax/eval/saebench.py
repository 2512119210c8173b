"""SAEBench's core-eval result file (`sae_bench/evals/core/eval_output.py`, `CoreEvalOutput`),
filled from our evaluation of one SAE, so that SAEBench's tables and plots read our numbers.

Field names are SAEBench 0.6.0's. Metrics we do not compute are null (SAEBench's own pydantic
model types them as float, so it would refuse those fields; every other tool just reads them).
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any, Mapping

import numpy as np

import gsae_jax
from gsae_jax import export
from gsae_jax.eval.metrics import max_cosine_to_others
from gsae_jax.sae.spec import SAESpec

SAEBENCH_VERSION = "0.6.0"  # the release whose field names METRIC_GROUPS copies
EVAL_TYPE_ID = "core"

METRIC_GROUPS: dict[str, tuple[str, ...]] = {
    "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
    "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation",
                                       "ce_loss_with_sae", "ce_loss_without_sae"),
    "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse",
                               "cossim"),
    "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
    "sparsity": ("l0", "l1"),
    "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    "misc_metrics": ("freq_over_1_percent", "freq_over_10_percent",
                     "normalized_freq_over_1_percent", "normalized_freq_over_10_percent",
                     "average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim",
                     "frac_alive"),
}

# SAEBench name -> our metric name, where they differ.
_OUR_NAME = {"explained_variance_legacy": "explained_variance_per_token",
             "total_tokens_eval_reconstruction": "lm_tokens",
             "total_tokens_eval_sparsity_variance": "tokens"}
# We evaluate in normalised units (scale * x); SAEBench in the LM's. These scale with x.
_SCALE_POWER = {"mse": 2, "l2_norm_in": 1, "l2_norm_out": 1}
# Ours, kept beside SAEBench's fields in `eval_result_unstructured`.
_EXTRA = ("fvu", "delta_lm_loss", "dead_fraction", "dense_fraction")


def density_metrics(log10_density: np.ndarray) -> dict[str, float]:
  """SAEBench's `misc_metrics` that follow from feature densities (log10, -inf = never fired):
  fractions of features alive / firing on more than 1% and 10% of tokens, and the share of all
  firings those frequent features account for."""
  density = np.power(10.0, np.asarray(log10_density, np.float64))
  total = density.sum()
  out = {"frac_alive": float(np.mean(density > 0))}
  for pct in (1, 10):
    frequent = density > pct / 100
    out[f"freq_over_{pct}_percent"] = float(np.mean(frequent))
    out[f"normalized_freq_over_{pct}_percent"] = (float(density[frequent].sum() / total)
                                                  if total > 0 else 0.0)
  return out


def _finite_or_none(value: Any) -> Any:
  """JSON null for missing and non-finite numbers (bare NaN is not JSON)."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return None
  return value


def sae_cfg_dict(spec: SAESpec, source: Mapping[str, Any]) -> dict[str, Any]:
  """SAELens-style cfg of the SAE, as our SAELens export writes it (less the folded weights)."""
  return {"architecture": spec.architecture.SAELENS_ARCHITECTURE, "d_in": spec.d_in,
          "d_sae": spec.d_sae, "dtype": "float32",
          "metadata": {"model_name": source.get("model_id"),
                       "hook_name": export.saelens_hook_name(source.get("site")),
                       "context_size": source.get("context_length"), "prepend_bos": True,
                       "gsae_jax_architecture": spec.name,
                       "gsae_jax_architecture_config": spec.block.to_dict()}}


def weight_metrics(params: Mapping[str, Any], spec: SAESpec) -> dict[str, float]:
  """SAEBench's weight-based `misc_metrics`: the mean over features of each feature's largest
  cosine similarity with another feature, of the encoder and of the decoder directions, on the
  weights SAELens would hold (`to_saelens`: e.g. a Gated SAE's W_enc is its W_gate). Cosines do
  not depend on the normalisation scale."""
  try:
    tensors, _ = spec.architecture.to_saelens(
        {k: np.asarray(v, np.float32) for k, v in params.items()}, spec.block)
  except ValueError:  # no SAELens layout (an untied Gated SAE): left null
    return {}
  return {"average_max_encoder_cosine_sim": float(max_cosine_to_others(tensors["W_enc"].T).mean()),
          "average_max_decoder_cosine_sim": float(max_cosine_to_others(tensors["W_dec"]).mean())}


def core_eval_output(run: Mapping[str, Any], spec: SAESpec, source: Mapping[str, Any],
                     scale: float, eval_config: Mapping[str, Any],
                     now_ms: int | None = None) -> dict[str, Any]:
  """SAEBench's `CoreEvalOutput` of one evaluated run (a dict `evaluation.evaluate_runs` filled;
  its activation metrics are in normalised units, `scale` converts them back; with its
  `params`, the weight-based metrics too).

  `eval_config` holds the CoreEvalConfig fields we know (model_name, batch_size_prompts, ...);
  the compute_* switches say which groups we filled.
  """
  ours = {**run, **(density_metrics(run["log10_density"]) if "log10_density" in run else {}),
          **(weight_metrics(run["params"], spec) if "params" in run else {})}
  metrics = {}
  for group, names in METRIC_GROUPS.items():
    metrics[group] = {}
    for name in names:
      value = ours.get(_OUR_NAME.get(name, name))
      if value is not None and name in _SCALE_POWER:
        value = value / scale ** _SCALE_POWER[name]
      metrics[group][name] = _finite_or_none(value)
  has_lm, has_acts = "kl_div_score" in run, "l0" in run
  config = {"model_name": source.get("model_id") or "", "llm_dtype": "float32",
            "batch_size_prompts": 0, "n_eval_reconstruction_batches": 0,
            "n_eval_sparsity_variance_batches": 0, "dataset": "", "context_size": 0,
            "compute_kl": has_lm, "compute_ce_loss": has_lm, "compute_l2_norms": has_acts,
            "compute_sparsity_metrics": has_acts, "compute_variance_metrics": has_acts,
            "compute_featurewise_density_statistics": False,
            "compute_featurewise_weight_based_metrics": False,
            # BOS positions are neither replaced nor scored, nor in the activation shards.
            "exclude_special_tokens_from_reconstruction": True, "verbose": False,
            **eval_config}
  return {
      "eval_type_id": EVAL_TYPE_ID,
      "eval_config": config,
      "eval_id": str(uuid.uuid4()),
      "datetime_epoch_millis": int(time.time() * 1000) if now_ms is None else now_ms,
      "eval_result_metrics": metrics,
      "eval_result_details": [],
      "sae_bench_commit_hash": f"none: written by gsae_jax {gsae_jax.__version__}",
      "sae_lens_id": None,
      "sae_lens_release_id": None,
      "sae_lens_version": None,
      "sae_cfg_dict": sae_cfg_dict(spec, source),
      "eval_result_unstructured": {
          "producer": f"gsae_jax {gsae_jax.__version__}",
          "name": run.get("name"), "step": run.get("step"),
          "coefficients": run.get("coefficients"),
          "units": "mse, l2_norm_in, l2_norm_out in the LM's activation units",
          **{k: _finite_or_none(run.get(k)) for k in _EXTRA}},
  }
