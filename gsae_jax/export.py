"""Export a trained SAE to `.npz` + JSON or to a SAELens folder, and load either back.

Only safe formats: `.npz` of plain arrays (loaded with allow_pickle=False), safetensors, JSON.
The architecture is written into every export (`sae.json`: `architecture`, `architecture_config`;
SAELens `cfg.json`: `architecture` plus `metadata.gsae_jax_architecture`) and read back from
there; `sae.json` files of earlier versions give it through their training config.
Our SAEs act on normalised activations c * x_raw (GATED_SAE.md section 4); the SAELens export
folds c in so that it acts on raw activations: for x_norm = c x_raw,
    (c x - b_dec) W + b = (x - b_dec / c)(c W) + b    and    x_hat_raw = f (W_dec / c) + b_dec / c.
Pre-activations are unchanged, so thresholds (JumpReLU, BatchTopK) need no folding.
Savers check every parameter before writing and write each file as `<file>.tmp` first, renaming
only once all are written, so a failure leaves no half-written export. Loaders check names,
shapes, dtypes and finiteness and name the file on any mismatch (`DataError`).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
import zlib
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from gsae_jax import configs
from gsae_jax.errors import DataError, one_line
from gsae_jax.sae import registry
from gsae_jax.sae.spec import SAESpec, from_metadata

SAELENS_HOOKS = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post",
                 "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out", "attn_z": "attn.hook_z"}


def fold_input_scale(params: Mapping[str, np.ndarray], scale: float,
                     logical_axes: Mapping[str, tuple]) -> dict[str, np.ndarray]:
  """Params of the SAE acting on x when `params` act on scale * x (and reconstruct scale * x).

  Encoder weights (logical axes ('d_in', 'features')) are multiplied by `scale`; the decoder and
  b_dec (the other parameters with a 'd_in' axis) divided. `fold_input_scale(p, 1 / scale)`
  undoes it.
  """
  out = {}
  for name, value in params.items():
    value, axes = np.asarray(value), tuple(logical_axes[name])
    if axes == ("d_in", "features"):
      out[name] = value * scale
    elif "d_in" in axes:
      out[name] = value / scale
    else:
      out[name] = value
  return out


def check_finite(arrays: Mapping[str, Any], where: str, way_out: str = "") -> None:
  """DataError naming `where` and the first array that is not floating point or holds NaN/Inf
  (saying how many, then `way_out`)."""
  for name, value in arrays.items():
    value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp.issubdtype also knows bfloat16
      raise DataError(f"{where}: parameter {name}: expected a floating-point array, found dtype "
                      f"{value.dtype}")
    bad = value.size - np.count_nonzero(np.isfinite(value))
    if bad:
      then = f"; {way_out}" if way_out else ""
      raise DataError(f"{where}: parameter {name} has {bad} non-finite values (NaN or Inf) of "
                      f"{value.size}{then}")


def check_params(params: Mapping[str, Any], spec: SAESpec, where: str, *,
                 sizes_from: str | None = None, way_out: str = "") -> None:
  """DataError naming `where` unless params have exactly the spec's names and shapes and are
  finite floating-point arrays. `sizes_from` names the file the spec's sizes were read from."""
  expected = {k: tuple(v.shape) for k, v in spec.abstract_params.items()}
  found = {k: tuple(np.shape(v)) for k, v in params.items()}
  problems = [f"{k} has shape {found[k]}, expected {expected[k]}"
              for k in sorted(expected) if k in found and found[k] != expected[k]]
  if set(expected) - set(found):
    problems.append(f"missing {sorted(set(expected) - set(found))}")
  if set(found) - set(expected):
    problems.append(f"unexpected {sorted(set(found) - set(expected))}")
  if problems:
    said = f" (as {sizes_from} says)" if sizes_from else ""
    raise DataError(f"{where}: parameters do not match a {spec.name} SAE with d_in={spec.d_in}, "
                    f"d_sae={spec.d_sae}{said}: {'; '.join(problems)}")
  check_finite(params, where, way_out)


_NOTHING_WRITTEN = "nothing written; export an earlier checkpoint (launch/export.py --step)"


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_together(writers: Mapping[str, Callable[[str], None]]) -> None:
  """Calls each writer on `<target>.tmp`, then renames every temp file onto its target: a failure
  while writing leaves the targets as they were and no temp file behind."""
  written = []
  try:
    for target, write in writers.items():
      written.append(target + ".tmp")
      write(written[-1])
      _fsync(written[-1])
  except BaseException:
    for tmp in written:
      if os.path.exists(tmp):
        os.remove(tmp)
    raise
  for target in writers:
    os.replace(target + ".tmp", target)


def _write_text(text: str) -> Callable[[str], None]:
  def write(path: str) -> None:
    with open(path, "w") as f:
      f.write(text)
  return write


def _read_json(path: str, what: str) -> dict:
  """The JSON object in `path`; DataError naming it if it is missing, not JSON or not an object."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing; expected {what}")
  try:
    with open(path) as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({one_line(e)})") from None
  except OSError as e:
    raise DataError(f"{path}: cannot be read ({e.strerror})") from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: expected a JSON object, found a {type(value).__name__}")
  return value


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an .npz; DataError naming it if it is missing or not a readable .npz."""
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing; expected an .npz written by launch/export.py")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":  # np.load would read anything else as one .npy array
    raise DataError(f"{path}: expected an .npz archive (a zip of arrays), found another format")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise DataError(f"{path}: not a readable .npz ({one_line(e)})") from None


def _spec_of(metadata: Mapping, where: str) -> SAESpec:
  """The spec that `metadata` (read from `where`) describes; DataError naming `where` and the
  field on an unknown architecture, bad sizes or unknown architecture_config fields."""
  if metadata.get("architecture") not in registry.names():
    raise DataError(f"{where}: architecture: expected one of {registry.names()}, found "
                    f"{metadata.get('architecture')!r}")
  for key in ("d_in", "d_sae"):
    value = metadata.get(key)
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
      raise DataError(f"{where}: {key}: expected an int > 0, found {value!r}")
  if not isinstance(metadata.get("architecture_config", {}), dict):
    raise DataError(f"{where}: architecture_config: expected an object, found "
                    f"{metadata['architecture_config']!r}")
  try:
    return from_metadata(metadata)
  except ValueError as e:
    raise DataError(f"{where}: {one_line(e)}") from None


def save_npz(path: str, params: Mapping[str, np.ndarray], spec: SAESpec,
             metadata: Mapping[str, Any]) -> None:
  """Writes `path` (.npz of the parameters, our names and layouts) and `path` with .json: the
  spec's metadata (architecture, sizes, architecture config) plus `metadata`. Refuses params that
  do not match `spec` or are not finite before writing anything."""
  arrays = {k: np.asarray(v) for k, v in params.items()}
  check_params(arrays, spec, path, way_out=_NOTHING_WRITTEN)
  sidecar = json.dumps({**dict(metadata), **spec.metadata()}, indent=2, default=str)

  def write_npz(tmp: str) -> None:
    with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
      np.savez(f, **arrays)

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  # The sidecar first: a reader that finds the new .npz finds its sidecar too.
  _write_together({os.path.splitext(path)[0] + ".json": _write_text(sidecar), path: write_npz})


def load_npz(path: str) -> tuple[dict[str, np.ndarray], dict, SAESpec]:
  """(params, metadata, spec) from `save_npz` output (or an export of an earlier version)."""
  params = _read_npz(path)
  sidecar = os.path.splitext(path)[0] + ".json"
  metadata = _read_json(sidecar, f"the JSON sidecar that launch/export.py writes next to "
                                 f"{os.path.basename(path)}")
  if "architecture_config" not in metadata:
    metadata = {**metadata, **_legacy_metadata(params, metadata, path)}
  spec = _spec_of(metadata, sidecar)
  check_params(params, spec, path, sizes_from=sidecar)
  return params, metadata, spec


def _legacy_metadata(params: Mapping[str, np.ndarray], metadata: Mapping, path: str) -> dict:
  """Architecture fields for an export of an earlier version: its sidecar recorded the
  architecture (the main job's `architecture`, launch.export's `config.sae.architecture`) and the
  training config, whose flat `sae` block `configs.upgrade_legacy` reads. Never guessed from
  parameter names (a TopK SAE has the baseline's)."""
  config = dict(metadata.get("config") or {})
  arch = metadata.get("architecture") or (config.get("sae") or {}).get("architecture")
  if not arch:
    raise DataError(f"{path}: its .json sidecar records no 'architecture' (nor "
                    f"config.sae.architecture); expected one of {registry.names()}")
  if np.ndim(params.get("W_dec")) != 2:
    raise DataError(f"{path}: expected a 2-D W_dec (the decoder, [d_sae, d_in]) to size the SAE "
                    f"of this earlier-version export, found shape {np.shape(params.get('W_dec'))}")
  config["sae"] = {**(config.get("sae") or {}), "architecture": arch}
  block = configs.upgrade_legacy(config)["sae"].get(arch, {})
  d_sae, d_in = params["W_dec"].shape
  return {"architecture": arch, "d_in": int(d_in), "d_sae": int(d_sae),
          "architecture_config": block}


def saelens_hook_name(site: str | None) -> str | None:
  """'blocks.6.resid_post' -> 'blocks.6.hook_resid_post' (TransformerLens names)."""
  if site is None:
    return None
  prefix, _, kind = site.rpartition(".")
  if kind not in SAELENS_HOOKS:
    raise ValueError(f"site {site!r}: expected a kind in {sorted(SAELENS_HOOKS)}")
  return f"{prefix}.{SAELENS_HOOKS[kind]}"


def _check_scale(scale: float, where: str) -> None:
  try:
    ok = math.isfinite(float(scale)) and float(scale) > 0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise DataError(f"{where}: normalisation scale: expected a finite number > 0, found {scale!r}")


def save_saelens(folder: str, params: Mapping[str, np.ndarray], spec: SAESpec, *, scale: float,
                 metadata: Mapping[str, Any]) -> None:
  """Writes `sae_weights.safetensors` + `cfg.json` that `sae_lens.SAE.load_from_disk` reads.

  `scale` is the normalisation constant the params were trained under; it is folded in.
  `metadata` may hold model_name, hook_name, context_size, prepend_bos and anything else.
  Refuses params that do not match `spec` or are not finite before writing anything.
  """
  cls = spec.architecture
  check_params(params, spec, folder, way_out=_NOTHING_WRITTEN)
  _check_scale(scale, folder)
  tensors, extra_cfg = cls.to_saelens(fold_input_scale(params, scale, spec.logical_axes),
                                      spec.block)
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  check_finite(tensors, folder, _NOTHING_WRITTEN)  # folding by scale may overflow
  cfg = {
      "architecture": cls.SAELENS_ARCHITECTURE,
      "d_in": spec.d_in, "d_sae": spec.d_sae, "dtype": "float32", "device": "cpu",
      "apply_b_dec_to_input": True, "normalize_activations": "none",
      "reshape_activations": "none", **extra_cfg,
      "metadata": {"prepend_bos": True, **dict(metadata), "gsae_jax_folded_scale": float(scale),
                   "gsae_jax_architecture": spec.name,
                   "gsae_jax_architecture_config": spec.block.to_dict()},
  }
  text = json.dumps(cfg, indent=2, default=str)
  os.makedirs(folder, exist_ok=True)
  _write_together({os.path.join(folder, "sae_weights.safetensors"):
                   lambda tmp: save_file(tensors, tmp),
                   os.path.join(folder, "cfg.json"): _write_text(text)})


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise DataError(f"{path}: missing; expected the weights of a SAELens folder")
  try:
    return load_file(path)
  except (OSError, SafetensorError, TypeError) as e:  # TypeError: a dtype numpy lacks (bfloat16)
    raise DataError(f"{path}: not a readable float32 safetensors file ({one_line(e)})") from None


def load_saelens(folder: str, scale: float = 1.0) -> tuple[dict[str, np.ndarray], dict, SAESpec]:
  """(params in our names, cfg, spec) from a SAELens folder of any architecture we have.

  The result acts on scale * x_raw (pass the normalisation constant to fine-tune or evaluate on
  normalised activations; 1.0 keeps it on raw activations). Folders we wrote come back as the
  architecture they were trained as (e.g. BatchTopK, which SAELens stores as JumpReLU).
  """
  cfg_path = os.path.join(folder, "cfg.json")
  weights = os.path.join(folder, "sae_weights.safetensors")
  _check_scale(scale, folder)
  cfg = _read_json(cfg_path, "the cfg.json of a SAELens folder")
  tensors = _read_safetensors(weights)
  check_finite(tensors, weights)  # in the file's names, before any conversion
  meta = cfg.get("metadata") or {}
  if not isinstance(meta, dict):
    raise DataError(f"{cfg_path}: metadata: expected an object, found {type(meta).__name__}")
  our_block = meta.get("gsae_jax_architecture_config") or {}
  if not isinstance(our_block, dict):
    raise DataError(f"{cfg_path}: metadata.gsae_jax_architecture_config: expected an object, "
                    f"found {type(our_block).__name__}")
  try:
    if meta.get("gsae_jax_architecture"):
      cls = registry.get(meta["gsae_jax_architecture"])
    else:
      cls = registry.by_saelens_name(cfg.get("architecture"))
  except ValueError as e:
    raise DataError(f"{cfg_path}: {one_line(e)}") from None
  if not cfg.get("apply_b_dec_to_input", True):
    raise DataError(f"{cfg_path}: apply_b_dec_to_input=false is not supported")
  if cfg.get("normalize_activations", "none") not in ("none", None):
    raise DataError(f"{cfg_path}: normalize_activations={cfg['normalize_activations']!r} is not "
                    "supported; expected 'none'")
  try:
    params, block = cls.from_saelens(tensors, cfg)
  except (KeyError, ValueError) as e:
    raise DataError(f"{folder}: not a loadable SAELens {cfg.get('architecture')!r} SAE: "
                    f"{one_line(e)}") from None
  shape = np.shape(params["W_dec"])
  if shape != (cfg.get("d_sae"), cfg.get("d_in")):
    raise DataError(f"{weights}: W_dec has shape {shape}, but {cfg_path} says "
                    f"d_sae={cfg.get('d_sae')!r}, d_in={cfg.get('d_in')!r}")
  spec = _spec_of({"architecture": cls.NAME, "d_in": int(shape[1]), "d_sae": int(shape[0]),
                   "architecture_config": {**our_block, **block}}, cfg_path)
  check_params(params, spec, weights, sizes_from=cfg_path)
  return fold_input_scale(params, 1.0 / scale, spec.logical_axes), cfg, spec
