"""Harvesting activations of an LM over text into a shard folder (config: experiments/harvest_*)."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import configs, locking
from gsae_jax.data import harvest, shards, text
from gsae_jax.errors import ConfigError

SITE_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out", "attn_z")
TEXT_SOURCES = ("embedded", "files", "hf")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check(ok: bool, field: str, expected: str, found) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: expected {expected}, found {found!r}")


def validate(c) -> None:
  """Raises ConfigError naming the first bad field; reads neither the model nor the text."""
  _check(isinstance(c.model, str) and bool(c.model), "model",
         "a gsae_jax.lm.load id, a local HF folder or a hub name", c.model)
  _check(c.site in SITE_KINDS, "site", f"one of {SITE_KINDS}", c.site)
  configs.check_int(c.layer, "layer", 0)
  configs.check_int(c.context_length, "context_length", 2, " (BOS plus one token)")
  configs.check_int(c.num_tokens, "num_tokens", 1)
  _check(c.dtype in shards.DTYPES, "dtype", "'float32' or 'bfloat16'", c.dtype)
  _check(c.model_dtype in _DTYPES, "model_dtype", f"one of {tuple(_DTYPES)}", c.model_dtype)
  _check(isinstance(c.exclude_bos, bool), "exclude_bos", "True or False", c.exclude_bos)
  _check(isinstance(c.output_dir, str) and bool(c.output_dir), "output_dir",
         "a folder for the shards", c.output_dir)
  configs.check_int(c.windows_per_shard, "windows_per_shard", 1)
  configs.check_int(c.batch_size, "batch_size", 1)
  configs.check_int(c.skip_windows, "skip_windows", 0)
  configs.check_int(c.normalise_sample_tokens, "normalise_sample_tokens", 1)
  configs.check_seed(c.seed, "seed")
  _validate_text(c.text)
  if c.get("mesh"):  # read by --dry_run only
    _validate_mesh(c.mesh)
  configs.check_finite_everywhere(c)


def _validate_text(t) -> None:
  _check(t.source in TEXT_SOURCES, "text.source", f"one of {TEXT_SOURCES}", t.source)
  if t.source == "files":
    paths = t.paths
    _check(isinstance(paths, (list, tuple)) and bool(paths) and all(
        isinstance(p, str) for p in paths), "text.paths",
           "a list of globs of .txt/.md/.jsonl/.parquet files", paths)
    _check(any(os.path.isfile(f) for p in paths
               for f in glob.glob(os.path.expanduser(p), recursive=True)), "text.paths",
           "globs matching at least one file", paths)
  if t.source in ("files", "hf"):
    _check(isinstance(t.text_field, str) and bool(t.text_field), "text.text_field",
           "the column holding the text", t.text_field)
  if t.source == "hf":
    _check(isinstance(t.hf_name, str) and bool(t.hf_name), "text.hf_name",
           "a dataset name for text.source='hf'", t.hf_name)


def _validate_mesh(mesh) -> None:
  from gsae_jax.lm.partition import MESH_RULES
  data = mesh.get("data", -1)
  _check(data == -1 or configs.is_int(data) and data >= 1, "mesh.data",
         "an integer > 0, or -1 (all devices not used by 'model')", data)
  configs.check_int(mesh.get("model", 1), "mesh.model", 1)
  _check(mesh.get("strategy", "fsdp") in MESH_RULES, "mesh.strategy",
         f"one of {sorted(MESH_RULES)}", mesh.get("strategy"))


def check_output_dir(c) -> None:
  """Refuses, before the LM is loaded, an output_dir the harvest cannot use: a file, a place
  that cannot be written, or a folder holding a harvest made with another config (the
  creation config in its manifest; `harvest.harvest` checks the rest once the LM is known)."""
  out = c.output_dir
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"config.output_dir: expected a folder, found a file at {out}")
  missing = _outermost_missing(out)
  above = os.path.dirname(missing) if missing else out  # the folder the harvest writes into
  if not os.path.isdir(above):
    raise ConfigError(f"config.output_dir: expected a folder path, found a file at {above} "
                      f"(above {out})")
  if not os.access(above, os.W_OK | os.X_OK):
    raise ConfigError(f"config.output_dir: cannot write {out}: {above} is not writable")
  if os.path.exists(os.path.join(out, shards.MANIFEST)):
    harvest.check_creation_config(out, shards.read_manifest(out), c.to_dict())


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
  """Checks the config and the output folder, then, holding the folder's lock (process 0), loads
  the LM (unless given), packs the text and harvests; returns the manifest. Every refusal that
  needs no LM comes before it is loaded, and a refusal leaves no new folder behind."""
  validate(c)
  check_output_dir(c)
  created = _outermost_missing(c.output_dir)
  try:
    with locking.hold(c.output_dir, enabled=jax.process_index() == 0):
      return _run_locked(c, progress, lm_and_tokenizer)
  except BaseException:
    if created:
      _remove_empty(c.output_dir, created)
    raise


def _outermost_missing(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet (taking the lock creates it)."""
  path, missing = os.path.abspath(path), None
  while not os.path.exists(path):
    path, missing = os.path.dirname(path), path
  return missing


def _remove_empty(path: str, outermost: str) -> None:
  """Removes `path` and its parents up to `outermost` while they are empty (nothing harvested)."""
  path = os.path.abspath(path)
  with contextlib.suppress(OSError):
    while True:
      os.rmdir(path)  # fails on a folder that is not empty, which ends the removal
      if path == outermost:
        return
      path = os.path.dirname(path)


def _run_locked(c, progress: bool, lm_and_tokenizer) -> dict:
  model, tokenizer = lm_and_tokenizer or load_lm(c)
  cfg = model.config
  if tokenizer is None:
    raise ConfigError(f"config.model: no tokenizer files next to the model {c.model!r}")
  if c.layer >= cfg.n_layers:
    raise ConfigError(f"config.layer: expected < {cfg.n_layers} (layers of {cfg.model_id}), "
                      f"found {c.layer}")
  site = f"blocks.{c.layer}.{c.site}"
  bos = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id
  if bos is None:
    raise ConfigError(f"config.model: {cfg.model_id} has no BOS token id in its config or "
                      "tokenizer")

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
