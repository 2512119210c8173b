"""Config validation: every bad value fails at start with the field, the expected and the found
(`ConfigError`, one line: `config.optim.lr: expected a finite number > 0, found inf`)."""

from __future__ import annotations

import copy
import math
import numbers

import jax.numpy as jnp

from gsae_jax.errors import ConfigError
from gsae_jax.sae import registry

DATA_SOURCES = ("synthetic", "shards", "lm")
PATHS = ("auto", "dense", "sparse")  # train.path: gsae_jax/train/paths.py
SWEEP_EXECUTIONS = ("auto", "vmap", "sequential", "separate")
COMPUTE_DTYPES = ("float32", "bfloat16")
SEED_LIMIT = 2**31  # JAX keys take 32 bits: larger seeds wrap onto smaller ones (or overflow)


def _check(ok: bool, field: str, expected: str, found) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: expected {expected}, found {found!r}")


def is_real(value) -> bool:
  """An int or float (numpy scalars included), not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive(value, field: str) -> None:
  _check(is_real(value) and math.isfinite(value) and value > 0, field, "a finite number > 0",
         value)


def check_int(value, field: str, low: int, note: str = "") -> None:
  _check(is_int(value) and value >= low, field,
         f"an integer > 0{note}" if low == 1 else f"an integer >= {low}{note}", value)


def check_seed(value, field: str) -> None:
  _check(is_int(value) and 0 <= value < SEED_LIMIT, field, "an integer in [0, 2**31)", value)


def check_finite_everywhere(node, path: str = "") -> None:
  """Refuses inf and nan anywhere under `node` (unused blocks and sweep grids included): no
  field means anything by them, and one used later would only show up as a NaN loss."""
  if hasattr(node, "items"):  # ConfigDict, FrozenConfigDict, dict
    for key, value in node.items():
      check_finite_everywhere(value, f"{path}.{key}" if path else str(key))
  elif isinstance(node, (list, tuple)):
    for i, value in enumerate(node):
      check_finite_everywhere(value, f"{path}[{i}]")
  elif is_real(node) and not is_int(node):
    _check(math.isfinite(node), path, "a finite number", node)


def validate(config, mesh_shape: dict[str, int]) -> None:
  """Raises ConfigError naming the first invalid field. `mesh_shape` is e.g. {'data': 2,
  'model': 4}."""
  sae, optim, train = config.sae, config.optim, config.train
  check_seed(config.seed, "seed")
  _check(sae.architecture in registry.names(), "sae.architecture", f"one of {registry.names()}",
         sae.architecture)
  arch = registry.get(sae.architecture)
  arch.validate_config(sae[arch.NAME], lambda ok, field, expected, found: _check(
      ok, f"sae.{arch.NAME}.{field}", expected, found))
  check_int(sae.d_sae, "sae.d_sae", 1)
  for c in arch.COEFFICIENTS:  # integer coefficients count latents (TopK's k)
    if c.integer:
      _check(sae[arch.NAME][c.field] <= sae.d_sae, f"sae.{arch.NAME}.{c.field}",
             f"an integer in [1, sae.d_sae={sae.d_sae}]", sae[arch.NAME][c.field])
  _check(sae.init_b_dec in ("zeros", "mean"), "sae.init_b_dec", "'zeros' or 'mean'",
         sae.init_b_dec)
  check_int(sae.init_b_dec_batches, "sae.init_b_dec_batches", 1)
  _check(_is_float_dtype(sae.param_dtype), "sae.param_dtype",
         "a floating dtype name ('float32', 'bfloat16', ...)", sae.param_dtype)
  _validate_sweep(config.sweep, arch, sae.d_sae)
  _check(sae.d_sae % mesh_shape["model"] == 0, "sae.d_sae",
         f"a multiple of the mesh 'model' axis size {mesh_shape['model']}", sae.d_sae)
  check_positive(optim.lr, "optim.lr")
  _check(all(is_real(b) and 0 <= b < 1 for b in (optim.b1, optim.b2)), "optim.b1/b2",
         "in [0, 1)", (optim.b1, optim.b2))
  check_positive(optim.eps, "optim.eps")
  check_int(optim.warmup_steps, "optim.warmup_steps", 0)
  _check(is_real(optim.decay_fraction) and 0 <= optim.decay_fraction <= 1,
         "optim.decay_fraction", "in [0, 1]", optim.decay_fraction)
  check_int(train.steps, "train.steps", 1)
  _check(is_int(train.batch_size) and train.batch_size > 0
         and train.batch_size % mesh_shape["data"] == 0, "train.batch_size",
         f"a positive multiple of the mesh 'data' axis size {mesh_shape['data']}", train.batch_size)
  check_int(train.log_every, "train.log_every", 1)
  check_int(train.feature_window_tokens, "train.feature_window_tokens", 1)
  check_int(train.resample_every, "train.resample_every", 0, " (0 = off)")
  check_int(train.resample_until, "train.resample_until", 0, " (0 = never stop)")
  _check(train.compute_dtype in COMPUTE_DTYPES, "train.compute_dtype",
         f"one of {COMPUTE_DTYPES}", train.compute_dtype)
  check_int(train.batch_chunks, "train.batch_chunks", 0, " (0: auto)")
  _check(train.path in PATHS, "train.path", f"one of {PATHS}", train.path)
  check_int(train.sparse_capacity, "train.sparse_capacity", 0, " (0: the default)")
  check_int(train.sparse_dead_capacity, "train.sparse_dead_capacity", 1)
  for switch in ("cpu_row_kernels", "split_step"):
    _check(isinstance(train.get(switch, False), bool), f"train.{switch}", "True or False",
           train.get(switch))
  check_int(config.checkpoint.save_every, "checkpoint.save_every", 1)
  check_int(config.checkpoint.keep, "checkpoint.keep", 1)
  _check(isinstance(config.checkpoint.async_save, bool), "checkpoint.async_save", "True or False",
         config.checkpoint.async_save)
  _check(config.mesh.data == -1 or is_int(config.mesh.data) and config.mesh.data >= 1,
         "mesh.data", "an integer > 0, or -1 (all devices not used by 'model')", config.mesh.data)
  check_int(config.mesh.model, "mesh.model", 1)
  _validate_data(config.data)
  check_finite_everywhere(config)


def _is_float_dtype(name) -> bool:
  try:
    return isinstance(name, str) and jnp.issubdtype(jnp.dtype(name), jnp.floating)
  except TypeError:
    return False


def _validate_data(data) -> None:
  _check(data.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}", data.source)
  target = data.normalise_target
  _check(target in (None, "d_model", "off") or _positive_number(target), "data.normalise_target",
         "'d_model', 'off' or a finite number > 0", target)
  check_int(data.normalise_sample_tokens, "data.normalise_sample_tokens", 1)
  check_seed(data.seed, "data.seed")
  if data.source == "synthetic":
    check_int(data.d_in, "data.d_in", 1)
    check_int(data.m_true, "data.m_true", 1)
    _check(is_real(data.fire_prob) and 0 < data.fire_prob <= 1, "data.fire_prob",
           "a probability in (0, 1]", data.fire_prob)
    _check(all(is_real(v) and math.isfinite(v) for v in (data.mag_low, data.mag_high))
           and 0 < data.mag_low <= data.mag_high, "data.mag_low/mag_high",
           "finite numbers with 0 < mag_low <= mag_high", (data.mag_low, data.mag_high))
  elif data.source == "lm":
    _validate_lm(data)
  else:
    _validate_shards(data)


def _positive_number(value) -> bool:
  """A finite number > 0, or a string of one (flags give strings)."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    return False
  return math.isfinite(value) and value > 0


def _validate_sweep(sweep, arch, d_sae: int) -> None:
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
  finite = all(is_real(v) and math.isfinite(v) for v in values)  # int(inf) would raise
  if coef.integer:
    ok = finite and all(float(v) == int(v) and 1 <= v <= d_sae for v in values)
    _check(ok, "sweep.grid", f"integers in [1, sae.d_sae={d_sae}] (values of {name})", values)
  else:
    ok = finite and all(v >= 0 for v in values)
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
  """Cheap checks at start (manifest only); checksums and finiteness are checked on open. The
  lanes' fit to the batch and the process count is checked where both are known (the loader)."""
  from gsae_jax.data import storage  # keeps configs free of data imports
  from gsae_jax.data.block_shuffle import BlockSpec, check_blocks
  from gsae_jax.data.shards import MANIFEST, read_manifest
  _check(bool(data.get("path")), "data.path", "a folder written by launch/harvest.py",
         data.get("path"))
  _check(data.shuffle in ("global", "block"), "data.shuffle", "'global' or 'block'", data.shuffle)
  _check(data.shuffle == "block" or storage.is_local(data.path), "data.shuffle",
         f"'block' for shards on remote storage ({data.path}): the global shuffle reads single "
         "rows from memory-mapped local files", data.shuffle)
  try:
    manifest = read_manifest(data.path)
  except ValueError as e:
    raise ConfigError(f"config.data.path: {e}") from None
  _check(data.get("d_in") == manifest["d_model"], "data.d_in",
         f"the shards' d_model {manifest['d_model']} from {data.path}/{MANIFEST}",
         data.get("d_in"))
  check_int(data.num_epochs, "data.num_epochs", 0, " (0 = repeat forever)")
  check_int(data.num_threads, "data.num_threads", 1)
  check_int(data.prefetch, "data.prefetch", 0)
  _check(isinstance(data.verify_checksums, bool), "data.verify_checksums", "True or False",
         data.verify_checksums)
  if data.shuffle == "block":
    check_int(data.block_rows, "data.block_rows", 1)
    check_int(data.buffer_blocks, "data.buffer_blocks", 1)
    check_int(data.lanes, "data.lanes", 1)
    check_blocks(BlockSpec(data.block_rows, data.buffer_blocks, data.lanes),
                 manifest["token_count"])


def validate_target_l0(block) -> None:
  """A sweep's `target_l0` block (`gsae_jax/runs/target_l0.py`): target L0s > 0, a relative
  tolerance in (0, 1), search steps (0: the full schedule), refinement rounds, measured tokens,
  and `ratio`: () or the (reference, baseline) architectures of the headline L0 ratio."""
  targets = tuple(block.targets)
  _check(all(is_real(t) and math.isfinite(t) and t > 0 for t in targets), "target_l0.targets",
         "finite numbers > 0 (L0s)", targets)
  _check(is_real(block.tolerance) and 0 < block.tolerance < 1, "target_l0.tolerance",
         "a relative tolerance in (0, 1)", block.tolerance)
  check_int(block.search_steps, "target_l0.search_steps", 0, " (0: train.steps)")
  check_int(block.rounds, "target_l0.rounds", 0)
  check_int(block.measure_tokens, "target_l0.measure_tokens", 1)
  ratio = tuple(block.get("ratio", ()) or ())
  _check(not ratio or len(ratio) == 2 and all(a in registry.names() for a in ratio),
         "target_l0.ratio", f"() or two of {registry.names()} (reference, baseline)", ratio)


def _validate_lm(data) -> None:
  """Streaming from the LM (`gsae_jax/data/stream.py`): fields only, no LM or text loaded."""
  from gsae_jax.data import stream  # keeps configs free of data imports
  stream.validate(data)
