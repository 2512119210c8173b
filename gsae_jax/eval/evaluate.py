"""Evaluation of a trained SAE: reconstruction metrics on held-out activations, and loss
recovered and KL divergence by splicing the reconstruction into the LM (GATED_SAE.md section 5).

Names follow SAELens' eval keys where the meaning is the same (`l0`, `l1`, `mse`,
`explained_variance`, `cossim`, `l2_norm_in`, `l2_norm_out`, `l2_ratio`,
`relative_reconstruction_bias`, `ce_loss_score`, `ce_loss_with_sae`, `ce_loss_without_sae`,
`ce_loss_with_ablation`, `kl_div_score`, `kl_div_with_sae`, `kl_div_with_ablation`); ours
otherwise (`fvu`, `explained_variance_per_token`, `delta_lm_loss`, `dead_fraction`,
`dense_fraction`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsae_jax.eval import metrics as m
from gsae_jax.lm.language_model import LOGITS_CHUNK_BYTES, replaced_nll
from gsae_jax.sae.features import SparseCodes

SPARSE_CODES = SparseCodes(slots=256)  # decode through each token's non-zero codes (CPU)


@functools.lru_cache(maxsize=None)
def _batch_sums(graphdef):
  @jax.jit
  def sums(params, x):
    sae = nnx.merge(graphdef, params)
    f = sae.encode(x)
    x_hat = sae.decode(f, SPARSE_CODES)
    return m.reconstruction_sums(x, x_hat, f), m.token_sums(x, x_hat, f)
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
  pooled, per_token = totals
  rec = {k: float(v) for k, v in m.reconstruction_metrics(pooled).items()}
  counts, tokens = pooled["fire_count"], pooled["tokens"]
  out = {
      "l0": rec["l0"], "mse": rec["mse"], "fvu": rec["fvu"],
      "explained_variance": rec["explained_variance"],
      "relative_reconstruction_bias": rec["gamma"],
      **{k: float(v) for k, v in m.token_metrics(per_token).items()},
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
    return (sae.decode(sae.encode(x), SPARSE_CODES) / scale).reshape(act.shape)
  return fn


@dataclasses.dataclass(frozen=True)
class LMPasses:
  """What `lm_losses` measured, as means over the same non-BOS target positions.

  ce: next-token cross-entropy of 'clean', 'zero' (site zero-ablated) and each replacement.
  kl: KL(clean || spliced) of the next-token distributions of 'zero' and each replacement.
  tokens: the number of positions averaged over.
  """
  ce: dict[str, float]
  kl: dict[str, float]
  tokens: int


def _zeros(act):
  return jnp.zeros_like(act)


@functools.lru_cache(maxsize=None)
def _clean_pass(graphdef, bos, chunk_bytes):
  """jit(params, tokens) -> (CE sum, scored targets, final residual stream [batch, seq,
  d_model]): the clean hidden states stay on device for the KLs (d_model wide, not vocab
  wide). Sums over the global batch: the same on every process."""
  def run(params, tokens):
    out = replaced_nll(nnx.merge(graphdef, params), tokens, bos, None, None, None, False,
                       chunk_bytes=chunk_bytes)
    return jnp.sum(jnp.where(out.mask, out.nll, 0.0)), jnp.sum(out.mask), out.hidden
  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _spliced_pass(graphdef, bos, site, fn, with_params, chunk_bytes):
  """jit(params, tokens, fn_params, clean_hidden) -> (CE sum, KL(clean || spliced) sum): one LM
  forward gives both, so the KL costs no extra pass (only a second unembedding per chunk of
  positions). Cached per fn: one compilation each."""
  def run(params, tokens, fn_params, clean_hidden):
    out = replaced_nll(nnx.merge(graphdef, params), tokens, bos, site, fn, fn_params, with_params,
                       clean_hidden, chunk_bytes)
    return jnp.sum(jnp.where(out.mask, out.nll, 0.0)), jnp.sum(jnp.where(out.mask, out.kl, 0.0))
  return jax.jit(run)


def lm_losses(lm, token_batches: Iterable[np.ndarray], site: str,
              replacements: dict[str, tuple[Callable, Any]],
              chunk_bytes: int = LOGITS_CHUNK_BYTES) -> LMPasses:
  """Mean next-token CE and KL(clean || spliced) over all batches, for the clean LM, the site
  zero-ablated ('zero') and each named replacement (fn, fn_params; fn_params None: fn(act)).
  One LM forward per batch and variant, as before the KL was added; logits exist one chunk of
  positions (at most chunk_bytes) at a time.

  With an LM on a mesh over several processes, each process passes its own rows of every global
  batch (as `LanguageModel` takes them); sums and counts are reduced over the global batch
  inside the jitted passes, so every process returns the same means."""
  lm.site_dim(site)  # a bad site fails here, naming the valid ones
  bos = lm.config.bos_token_id
  variants = {"zero": (_zeros, None), **replacements}
  ce = dict.fromkeys(["clean", *variants], 0.0)
  kl = dict.fromkeys(variants, 0.0)
  count = 0
  for tokens in token_batches:
    tokens = lm.place_tokens(tokens)  # checked and placed on the LM's data axis, as its own losses
    ce_sum, targets, clean_hidden = _clean_pass(lm.graphdef, bos, chunk_bytes)(lm.params, tokens)
    ce["clean"] += float(ce_sum)
    count += int(targets)
    for name, (fn, fn_params) in variants.items():
      run = _spliced_pass(lm.graphdef, bos, site, fn, fn_params is not None, chunk_bytes)
      ce_sum, kl_sum = run(lm.params, tokens, fn_params, clean_hidden)
      ce[name] += float(ce_sum)
      kl[name] += float(kl_sum)
  if not count:
    raise ValueError("lm_losses: no target tokens to evaluate")
  return LMPasses({k: v / count for k, v in ce.items()}, {k: v / count for k, v in kl.items()},
                  count)


def loss_recovered_metrics(passes: LMPasses, name: str) -> dict[str, float]:
  """SAELens-named loss-recovered and KL metrics of replacement `name` from `lm_losses`."""
  clean, zero, sae = passes.ce["clean"], passes.ce["zero"], passes.ce[name]
  return {"ce_loss_score": m.loss_recovered(clean, sae, zero), "ce_loss_with_sae": sae,
          "ce_loss_without_sae": clean, "ce_loss_with_ablation": zero,
          "delta_lm_loss": sae - clean,
          "kl_div_score": m.kl_div_score(passes.kl[name], passes.kl["zero"]),
          "kl_div_with_sae": passes.kl[name], "kl_div_with_ablation": passes.kl["zero"],
          "lm_tokens": passes.tokens}
