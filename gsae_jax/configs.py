"""Config validation: every bad value fails at start with the field, the expected and the found."""

from __future__ import annotations

from gsae_jax.sae.gate import GATE_BACKWARD_MODES
from gsae_jax.sae.models import ARCHITECTURES

DATA_SOURCES = ("synthetic", "shards")


def _check(ok: bool, field: str, expected: str, found) -> None:
  if not ok:
    raise ValueError(f"config.{field}: expected {expected}, found {found!r}")


def validate(config, mesh_shape: dict[str, int]) -> None:
  """Raises ValueError naming the first invalid field. `mesh_shape` is e.g. {'data': 2, 'model': 4}."""
  sae, optim, train = config.sae, config.optim, config.train
  _check(sae.architecture in ARCHITECTURES, "sae.architecture", f"one of {ARCHITECTURES}",
         sae.architecture)
  _check(sae.gate_backward in GATE_BACKWARD_MODES, "sae.gate_backward",
         f"one of {GATE_BACKWARD_MODES}", sae.gate_backward)
  _check(sae.init_b_dec in ("zeros", "mean"), "sae.init_b_dec", "'zeros' or 'mean'",
         sae.init_b_dec)
  _check(sae.gate_eps > 0, "sae.gate_eps", "> 0", sae.gate_eps)
  _check(sae.l1_coefficient >= 0, "sae.l1_coefficient", ">= 0", sae.l1_coefficient)
  grid = tuple(config.sweep.l1_coefficients)
  _check(all(g >= 0 for g in grid), "sweep.l1_coefficients", "values >= 0", grid)
  _check(sae.l1_warmup_steps >= 0, "sae.l1_warmup_steps", ">= 0", sae.l1_warmup_steps)
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
  _check(config.checkpoint.save_every > 0, "checkpoint.save_every", "> 0",
         config.checkpoint.save_every)
  _check(config.checkpoint.keep > 0, "checkpoint.keep", "> 0", config.checkpoint.keep)
  _check(config.data.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}",
         config.data.source)
  if config.data.source == "shards":
    _validate_shards(config.data)


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
