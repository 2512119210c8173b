"""Config validation: every bad value fails at start with the field, the expected and the found."""

from __future__ import annotations

import copy
import math

from gsae_jax.sae import registry

DATA_SOURCES = ("synthetic", "shards")
PATHS = ("auto", "dense", "sparse")  # train.path: gsae_jax/train/paths.py
SWEEP_EXECUTIONS = ("auto", "vmap", "sequential")
COMPUTE_DTYPES = ("float32", "bfloat16")


def _check(ok: bool, field: str, expected: str, found) -> None:
  if not ok:
    raise ValueError(f"config.{field}: expected {expected}, found {found!r}")


def validate(config, mesh_shape: dict[str, int]) -> None:
  """Raises ValueError naming the first invalid field. `mesh_shape` is e.g. {'data': 2, 'model': 4}."""
  sae, optim, train = config.sae, config.optim, config.train
  _check(sae.architecture in registry.names(), "sae.architecture", f"one of {registry.names()}",
         sae.architecture)
  arch = registry.get(sae.architecture)
  arch.validate_config(sae[arch.NAME], lambda ok, field, expected, found: _check(
      ok, f"sae.{arch.NAME}.{field}", expected, found))
  _check(sae.init_b_dec in ("zeros", "mean"), "sae.init_b_dec", "'zeros' or 'mean'",
         sae.init_b_dec)
  _validate_sweep(config.sweep, arch)
  _check(sae.d_sae > 0, "sae.d_sae", "> 0", sae.d_sae)
  _check(sae.d_sae % mesh_shape["model"] == 0, "sae.d_sae",
         f"a multiple of the mesh 'model' axis size {mesh_shape['model']}", sae.d_sae)
  _check(optim.lr > 0, "optim.lr", "> 0", optim.lr)
  _check(0 <= optim.b1 < 1 and 0 <= optim.b2 < 1, "optim.b1/b2", "in [0, 1)", (optim.b1, optim.b2))
  _check(optim.warmup_steps >= 0, "optim.warmup_steps", ">= 0", optim.warmup_steps)
  _check(0 <= optim.decay_fraction <= 1, "optim.decay_fraction", "in [0, 1]", optim.decay_fraction)
  _check(train.steps > 0, "train.steps", "> 0", train.steps)
  _check(train.batch_size > 0 and train.batch_size % mesh_shape["data"] == 0, "train.batch_size",
         f"a positive multiple of the mesh 'data' axis size {mesh_shape['data']}", train.batch_size)
  _check(train.log_every > 0, "train.log_every", "> 0", train.log_every)
  _check(train.feature_window_tokens > 0, "train.feature_window_tokens", "> 0",
         train.feature_window_tokens)
  _check(train.resample_every >= 0, "train.resample_every", ">= 0 (0 = off)", train.resample_every)
  _check(train.compute_dtype in COMPUTE_DTYPES, "train.compute_dtype",
         f"one of {COMPUTE_DTYPES}", train.compute_dtype)
  _check(train.batch_chunks >= 0, "train.batch_chunks", ">= 0 (0: auto)", train.batch_chunks)
  _check(train.path in PATHS, "train.path", f"one of {PATHS}", train.path)
  _check(train.sparse_capacity >= 0, "train.sparse_capacity", ">= 0 (0: the default)",
         train.sparse_capacity)
  _check(train.sparse_dead_capacity >= 1, "train.sparse_dead_capacity", ">= 1",
         train.sparse_dead_capacity)
  _check(config.checkpoint.save_every > 0, "checkpoint.save_every", "> 0",
         config.checkpoint.save_every)
  _check(config.checkpoint.keep > 0, "checkpoint.keep", "> 0", config.checkpoint.keep)
  _check(config.data.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}",
         config.data.source)
  if config.data.source == "shards":
    _validate_shards(config.data)


def _validate_sweep(sweep, arch) -> None:
  """The swept coefficient exists and every value is valid for it."""
  _check(sweep.execution in SWEEP_EXECUTIONS, "sweep.execution", f"one of {SWEEP_EXECUTIONS}",
         sweep.execution)
  values = tuple(sweep.grid)
  if not values:
    return
  names = [c.name for c in arch.COEFFICIENTS]
  name = sweep.coefficient or names[0]
  _check(name in names, "sweep.coefficient", f"a coefficient of {arch.NAME}: one of {names}", name)
  coef = arch.coefficient(name)
  if coef.integer:
    ok = all(float(v) == int(v) and v >= 1 for v in values)
    _check(ok, "sweep.grid", f"integers >= 1 (values of {name})", values)
  else:
    ok = all(math.isfinite(v) and v >= 0 for v in values)
    _check(ok, "sweep.grid", f"finite numbers >= 0 (values of {name})", values)


# Fields of the single-block layout (before per-architecture blocks) and where they went.
_LEGACY_SAE_FIELDS = ("l1_coefficient", "l1_warmup_steps", "gate_backward", "gate_eps",
                      "gate_clip", "tie_r_mag", "frozen_aux_decoder")


def upgrade_legacy(config: dict) -> dict:
  """A config dict saved by an earlier gsae_jax (one flat `sae` block, `sweep.l1_coefficients`)
  in today's layout: architecture fields move to `sae.<architecture>`, the lambda grid becomes
  `sweep.grid` over 'l1'. Today's configs are returned unchanged."""
  sae = config.get("sae", {})
  if not any(k in sae for k in _LEGACY_SAE_FIELDS) and "l1_coefficients" not in config.get(
      "sweep", {}):
    return config
  config = copy.deepcopy(config)
  sae = config["sae"]
  arch = sae["architecture"]  # every earlier config had it
  block = registry.get(arch).default_config().to_dict()
  for k in _LEGACY_SAE_FIELDS:
    if k in sae:
      value = sae.pop(k)
      if k in block:
        block[k] = value
  sae[arch] = block
  sweep = config.setdefault("sweep", {})
  grid = tuple(sweep.pop("l1_coefficients", ()) or ())
  sweep.update({"coefficient": "l1" if grid else "", "grid": grid})
  return config


def _validate_shards(data) -> None:
  """Cheap checks at start (manifest only); checksums and finiteness are checked on open."""
  from gsae_jax.data.shards import MANIFEST, read_manifest  # keeps configs free of data imports
  _check(bool(data.get("path")), "data.path", "a folder written by launch/harvest.py",
         data.get("path"))
  try:
    manifest = read_manifest(data.path)
  except ValueError as e:
    raise ValueError(f"config.data.path: {e}") from None
  _check(data.get("d_in") == manifest["d_model"], "data.d_in",
         f"the shards' d_model {manifest['d_model']} from {data.path}/{MANIFEST}",
         data.get("d_in"))
  _check(data.num_epochs >= 0, "data.num_epochs", ">= 0 (0 = repeat forever)", data.num_epochs)
  _check(data.num_threads > 0, "data.num_threads", "> 0", data.num_threads)
