"""Export a trained SAE to `.npz` + JSON or to a SAELens folder, and load either back.

Only safe formats: `.npz` of plain arrays (loaded with allow_pickle=False), safetensors, JSON.
The architecture is written into every export (`sae.json`: `architecture`, `architecture_config`;
SAELens `cfg.json`: `architecture` plus `metadata.gsae_jax_architecture`) and read back from
there; `sae.json` files of earlier versions give it through their training config.
Our SAEs act on normalised activations c * x_raw (GATED_SAE.md section 4); the SAELens export
folds c in so that it acts on raw activations: for x_norm = c x_raw,
    (c x - b_dec) W + b = (x - b_dec / c)(c W) + b    and    x_hat_raw = f (W_dec / c) + b_dec / c.
Pre-activations are unchanged, so thresholds (JumpReLU, BatchTopK) need no folding.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from gsae_jax import configs
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


def check_params(params: Mapping[str, Any], spec: SAESpec, where: str) -> None:
  """ValueError naming `where` unless params have exactly the spec's names and shapes."""
  expected = {k: tuple(v.shape) for k, v in spec.abstract_params.items()}
  found = {k: tuple(np.shape(v)) for k, v in params.items()}
  if expected != found:
    raise ValueError(f"{where}: parameters {found} do not match a {spec.name} SAE "
                     f"(d_in={spec.d_in}, d_sae={spec.d_sae}): expected {expected}")


def save_npz(path: str, params: Mapping[str, np.ndarray], spec: SAESpec,
             metadata: Mapping[str, Any]) -> None:
  """Writes `path` (.npz of the parameters, our names and layouts) and `path` with .json: the
  spec's metadata (architecture, sizes, architecture config) plus `metadata`."""
  check_params(params, spec, path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **{k: np.asarray(v) for k, v in params.items()})
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump({**dict(metadata), **spec.metadata()}, f, indent=2, default=str)


def load_npz(path: str) -> tuple[dict[str, np.ndarray], dict, SAESpec]:
  """(params, metadata, spec) from `save_npz` output (or an export of an earlier version)."""
  with np.load(path, allow_pickle=False) as data:
    params = {k: data[k] for k in data.files}
  sidecar = os.path.splitext(path)[0] + ".json"
  metadata = json.load(open(sidecar)) if os.path.exists(sidecar) else {}
  if "architecture_config" not in metadata:
    metadata = {**metadata, **_legacy_metadata(params, metadata, path)}
  spec = from_metadata(metadata)
  check_params(params, spec, path)
  return params, metadata, spec


def _legacy_metadata(params: Mapping[str, np.ndarray], metadata: Mapping, path: str) -> dict:
  """Architecture fields for an export of an earlier version: its sidecar recorded the
  architecture (the main job's `architecture`, launch.export's `config.sae.architecture`) and the
  training config, whose flat `sae` block `configs.upgrade_legacy` reads. Never guessed from
  parameter names (a TopK SAE has the baseline's)."""
  config = dict(metadata.get("config") or {})
  arch = metadata.get("architecture") or (config.get("sae") or {}).get("architecture")
  if not arch:
    raise ValueError(f"{path}: its .json sidecar records no 'architecture' (nor "
                     f"config.sae.architecture); expected one of {registry.names()}")
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


def save_saelens(folder: str, params: Mapping[str, np.ndarray], spec: SAESpec, *, scale: float,
                 metadata: Mapping[str, Any]) -> None:
  """Writes `sae_weights.safetensors` + `cfg.json` that `sae_lens.SAE.load_from_disk` reads.

  `scale` is the normalisation constant the params were trained under; it is folded in.
  `metadata` may hold model_name, hook_name, context_size, prepend_bos and anything else.
  """
  cls = spec.architecture
  check_params(params, spec, folder)
  tensors, extra_cfg = cls.to_saelens(fold_input_scale(params, scale, spec.logical_axes),
                                      spec.block)
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  cfg = {
      "architecture": cls.SAELENS_ARCHITECTURE,
      "d_in": spec.d_in, "d_sae": spec.d_sae, "dtype": "float32", "device": "cpu",
      "apply_b_dec_to_input": True, "normalize_activations": "none",
      "reshape_activations": "none", **extra_cfg,
      "metadata": {"prepend_bos": True, **dict(metadata), "gsae_jax_folded_scale": float(scale),
                   "gsae_jax_architecture": spec.name,
                   "gsae_jax_architecture_config": spec.block.to_dict()},
  }
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, "sae_weights.safetensors"))
  with open(os.path.join(folder, "cfg.json"), "w") as f:
    json.dump(cfg, f, indent=2, default=str)


def load_saelens(folder: str, scale: float = 1.0) -> tuple[dict[str, np.ndarray], dict, SAESpec]:
  """(params in our names, cfg, spec) from a SAELens folder of any architecture we have.

  The result acts on scale * x_raw (pass the normalisation constant to fine-tune or evaluate on
  normalised activations; 1.0 keeps it on raw activations). Folders we wrote come back as the
  architecture they were trained as (e.g. BatchTopK, which SAELens stores as JumpReLU).
  """
  with open(os.path.join(folder, "cfg.json")) as f:
    cfg = json.load(f)
  tensors = load_file(os.path.join(folder, "sae_weights.safetensors"))
  meta = cfg.get("metadata") or {}
  if meta.get("gsae_jax_architecture"):
    cls = registry.get(meta["gsae_jax_architecture"])
  else:
    cls = registry.by_saelens_name(cfg.get("architecture"))
  if not cfg.get("apply_b_dec_to_input", True):
    raise ValueError(f"{folder}/cfg.json: apply_b_dec_to_input=false is not supported")
  if cfg.get("normalize_activations", "none") not in ("none", None):
    raise ValueError(f"{folder}/cfg.json: normalize_activations="
                     f"{cfg['normalize_activations']!r} is not supported; expected 'none'")
  try:
    params, block = cls.from_saelens(tensors, cfg)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{folder}: not a loadable SAELens {cfg.get('architecture')!r} SAE: "
                     f"{e}") from None
  block = {**(meta.get("gsae_jax_architecture_config") or {}), **block}
  d_sae, d_in = np.shape(params["W_dec"])
  spec = from_metadata({"architecture": cls.NAME, "d_in": int(d_in), "d_sae": int(d_sae),
                        "architecture_config": block})
  check_params(params, spec, folder)
  return fold_input_scale(params, 1.0 / scale, spec.logical_axes), cfg, spec
