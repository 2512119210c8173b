r"""Harvests one site's activations from a language model into a shard folder.

  python -m launch.harvest --config=experiments/harvest_gemma3_270m.py \
      --config.layer=6 --config.output_dir=/tmp/harvest/gemma3-270m-l6

Re-running the same command after a stop continues after the last complete shard.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gsae_jax import distributed, plan
from gsae_jax.data import harvest, text

_CONFIG = config_flags.DEFINE_config_file("config", None, "Harvest config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
_DIST = distributed.define_flags()  # --distributed, --coordinator_address, ..., --dry_run

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
  _check(c.text.source in ("embedded", "files", "hf"), "text.source",
         "'embedded', 'files' or 'hf'", c.text.source)


def run(c, progress: bool = True) -> dict:
  """Loads the LM, packs the text and harvests; returns the manifest."""
  from gsae_jax import lm  # the LM stack is only needed here, not by the data pipeline

  model, tokenizer = lm.load(c.model, gguf_file=c.gguf_file or None, dtype=_DTYPES[c.model_dtype],
                             revision=c.revision or None)
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
  docs = text.tokenize_documents(text.documents(c.text), text.hf_encoder(tokenizer))
  windows = text.pack_windows(docs, c.context_length, int(bos))
  return harvest.harvest(c.output_dir, windows, activation_fn, spec, c.to_dict(), progress)


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    validate(config)
  except ValueError as e:
    sys.exit(f"invalid config {config_flags.get_config_filename(flags.FLAGS['config'])}: {e}")
  if _DIST.dry_run.value:  # the LM's plan from its config.json alone: no weights, no text
    try:
      refused = plan.dry_run_harvest(config, _DIST.dry_run_devices.value,
                                     _DIST.device_memory_gib.value)
    except ValueError as e:
      sys.exit(f"invalid config: {e}")
    sys.exit(f"dry run: {refused}" if refused else 0)
  if distributed.initialize_from_flags(_DIST) and jax.process_count() > 1:
    sys.exit("multi-process harvest is not supported yet: shards are written by one process; "
             "run one harvest per host on disjoint text (config.skip_windows) instead")
  m = run(config)
  if m["token_count"] < config.num_tokens:
    print(f"warning: the text ran out after {m['token_count']:,} of {config.num_tokens:,} tokens",
          flush=True)
  print(f"harvested {m['token_count']:,} tokens of {m['site']} (d={m['d_model']}, {m['dtype']}) "
        f"in {len(m['shards'])} shards to {config.output_dir}; "
        f"E||x||^2={m['normalisation']['mean_sq_norm']:.4g}, scale={m['normalisation']['scale']:.4g}",
        flush=True)


if __name__ == "__main__":
  app.run(main)
