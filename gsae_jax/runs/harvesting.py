"""Harvesting activations of an LM over text into a shard folder (config: experiments/harvest_*)."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np

from gsae_jax.data import harvest, text

SITE_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out", "attn_z")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check(ok: bool, field: str, expected: str, found) -> None:
  if not ok:
    raise ValueError(f"config.{field}: expected {expected}, found {found!r}")


def validate(c) -> None:
  """Raises ValueError naming the first bad field, before the model is loaded."""
  _check(c.site in SITE_KINDS, "site", f"one of {SITE_KINDS}", c.site)
  _check(c.layer >= 0, "layer", ">= 0", c.layer)
  _check(c.context_length >= 2, "context_length", ">= 2", c.context_length)
  _check(c.num_tokens > 0, "num_tokens", "> 0", c.num_tokens)
  _check(c.dtype in ("float32", "bfloat16"), "dtype", "'float32' or 'bfloat16'", c.dtype)
  _check(c.model_dtype in _DTYPES, "model_dtype", f"one of {tuple(_DTYPES)}", c.model_dtype)
  _check(bool(c.output_dir), "output_dir", "a folder for the shards", c.output_dir)
  _check(c.windows_per_shard > 0, "windows_per_shard", "> 0", c.windows_per_shard)
  _check(c.batch_size > 0, "batch_size", "> 0", c.batch_size)
  _check(c.skip_windows >= 0, "skip_windows", ">= 0", c.skip_windows)
  _check(c.text.source in ("embedded", "files", "hf"), "text.source",
         "'embedded', 'files' or 'hf'", c.text.source)


def load_lm(c):
  """(LanguageModel, tokenizer) named by the harvest config."""
  from gsae_jax import lm  # the LM stack is only needed here, not by the data pipeline

  return lm.load(c.model, gguf_file=c.gguf_file or None, dtype=_DTYPES[c.model_dtype],
                 revision=c.revision or None)


def text_windows(c, tokenizer, bos: int):
  """[context_length] int32 BOS-prefixed windows of the configured text, after skipping the first
  `c.skip_windows` (held-out splits: harvest or evaluate on windows training never saw)."""
  docs = text.tokenize_documents(text.documents(c.text), text.hf_encoder(tokenizer))
  return itertools.islice(text.pack_windows(docs, c.context_length, bos), c.skip_windows, None)


def run(c, progress: bool = True, lm_and_tokenizer=None) -> dict:
  """Loads the LM (unless given), packs the text and harvests; returns the manifest."""
  model, tokenizer = lm_and_tokenizer or load_lm(c)
  cfg = model.config
  if tokenizer is None:
    raise ValueError(f"config.model={c.model!r}: no tokenizer files next to the model")
  if c.layer >= cfg.n_layers:
    raise ValueError(f"config.layer: expected < {cfg.n_layers} (layers of {cfg.model_id}), "
                     f"found {c.layer}")
  site = f"blocks.{c.layer}.{c.site}"
  bos = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id
  if bos is None:
    raise ValueError(f"model {cfg.model_id}: no BOS token id in its config or tokenizer")

  def activation_fn(tokens: np.ndarray) -> np.ndarray:
    out = model.activations(jnp.asarray(tokens, jnp.int32), [site])[site]
    return np.asarray(out, np.float32)

  width = model.site_dim(site)  # attn_z is n_heads * d_head, not always d_model
  spec = harvest.HarvestSpec(
      model_id=cfg.model_id, revision=getattr(cfg, "revision", None), site=site, layer=c.layer,
      d_model=int(width), context_length=c.context_length, num_tokens=c.num_tokens,
      bos_token_id=int(bos), dtype=c.dtype, exclude_bos=c.exclude_bos,
      windows_per_shard=c.windows_per_shard, batch_size=c.batch_size,
      normalise_sample_tokens=c.normalise_sample_tokens, seed=c.seed)
  windows = text_windows(c, tokenizer, int(bos))
  return harvest.harvest(c.output_dir, windows, activation_fn, spec, c.to_dict(), progress)
