"""Evaluation of a trained SAE: reconstruction metrics on held-out activations, and loss
recovered by splicing the reconstruction into the LM (GATED_SAE.md section 5).

Names follow SAELens' eval keys where the meaning is the same (`l0`, `mse`,
`explained_variance`, `relative_reconstruction_bias`, `ce_loss_score`, `ce_loss_with_sae`,
`ce_loss_without_sae`, `ce_loss_with_ablation`); ours otherwise (`fvu`, `delta_lm_loss`,
`dead_fraction`, `dense_fraction`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsae_jax.eval import metrics as m


@functools.lru_cache(maxsize=None)
def _batch_sums(graphdef):
  @jax.jit
  def sums(params, x):
    sae = nnx.merge(graphdef, params)
    f = sae.encode(x)
    return m.reconstruction_sums(x, sae.decode(f), f)
  return sums


def activation_metrics(graphdef, params: dict, batches: Iterable[jax.Array],
                       dense_threshold: float = m.DENSE_THRESHOLD) -> tuple[dict, np.ndarray]:
  """Reconstruction and sparsity metrics over every batch of `batches` ([batch, d_in], in the
  units the SAE was trained on). Returns (metrics, log10 feature density [d_sae])."""
  batch_sums = _batch_sums(graphdef)
  totals = None
  for x in batches:
    sums = batch_sums(params, x)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("activation_metrics: no batches to evaluate")
  rec = {k: float(v) for k, v in m.reconstruction_metrics(totals).items()}
  counts, tokens = totals["fire_count"], totals["tokens"]
  out = {
      "l0": rec["l0"], "mse": rec["mse"], "fvu": rec["fvu"],
      "explained_variance": rec["explained_variance"],
      "relative_reconstruction_bias": rec["gamma"],
      "dead_fraction": float(m.dead_fraction(counts)),
      "dense_fraction": float(m.dense_fraction(counts, tokens, dense_threshold)),
      "tokens": int(tokens),
  }
  return out, np.asarray(m.log10_feature_density(counts, tokens))


def splice_fn(graphdef) -> Callable[[jax.Array, Any], jax.Array]:
  """fn(act [batch, seq, d], (params, scale)) -> the SAE reconstruction of raw activations: the
  SAE sees scale * act (its training units) and its output is divided by scale."""
  def fn(act, fn_params):
    params, scale = fn_params
    sae = nnx.merge(graphdef, params)
    x = act.reshape(-1, act.shape[-1]).astype(jnp.float32) * scale
    return (sae.decode(sae.encode(x)) / scale).reshape(act.shape)
  return fn


def _zeros(act):
  return jnp.zeros_like(act)


def lm_losses(lm, token_batches: Iterable[np.ndarray], site: str,
              replacements: dict[str, tuple[Callable, Any]]) -> dict[str, float]:
  """Mean next-token CE over all batches: 'clean', 'zero' (site zero-ablated) and one per named
  replacement (fn, fn_params), weighted by each batch's number of non-BOS targets."""
  bos = lm.config.bos_token_id
  totals: dict[str, float] = {}
  count = 0
  for tokens in token_batches:
    n = int(np.sum(np.asarray(tokens)[:, 1:] != bos)) if bos is not None else tokens[:, 1:].size
    losses = {"clean": lm.loss(tokens), "zero": lm.loss_with_replacement(tokens, site, _zeros)}
    for name, (fn, fn_params) in replacements.items():
      losses[name] = lm.loss_with_replacement(tokens, site, fn, fn_params)
    for name, value in losses.items():
      totals[name] = totals.get(name, 0.0) + float(value) * n
    count += n
  if not count:
    raise ValueError("lm_losses: no target tokens to evaluate")
  return {k: v / count for k, v in totals.items()}


def loss_recovered_metrics(losses: dict[str, float], name: str) -> dict[str, float]:
  """SAELens-named loss-recovered metrics of replacement `name` from `lm_losses` output."""
  clean, zero, sae = losses["clean"], losses["zero"], losses[name]
  return {"ce_loss_score": m.loss_recovered(clean, sae, zero), "ce_loss_with_sae": sae,
          "ce_loss_without_sae": clean, "ce_loss_with_ablation": zero,
          "delta_lm_loss": sae - clean}
