"""Export a trained SAE to `.npz` + JSON or to a SAELens folder, and load either back.

Only safe formats: `.npz` of plain arrays (loaded with allow_pickle=False), safetensors, JSON.
Our SAEs act on normalised activations c * x_raw (GATED_SAE.md section 4); the SAELens export
folds c in so that it acts on raw activations: for x_norm = c x_raw,
    (c x - b_dec) W + b = (x - b_dec / c)(c W) + b    and    x_hat_raw = f (W_dec / c) + b_dec / c.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

PARAM_NAMES = {
    "gated": ("W_gate", "r_mag", "b_gate", "b_mag", "W_dec", "b_dec"),
    "gated_untied": ("W_gate", "W_mag", "b_gate", "b_mag", "W_dec", "b_dec"),
    "baseline": ("W_enc", "b_enc", "W_dec", "b_dec"),
}
ENCODER_WEIGHTS = ("W_gate", "W_mag", "W_enc")
SAELENS_ARCHITECTURE = {"gated": "gated", "baseline": "standard"}
SAELENS_HOOKS = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post",
                 "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out", "attn_z": "attn.hook_z"}


def architecture_of(params: Mapping[str, Any]) -> str:
  """'gated', 'gated_untied' or 'baseline', from the parameter names."""
  for arch, names in PARAM_NAMES.items():
    if set(params) == set(names):
      return arch
  raise ValueError(f"parameters {sorted(params)} match no architecture; expected one of "
                   f"{ {a: list(n) for a, n in PARAM_NAMES.items()} }")


def fold_input_scale(params: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
  """Params of the SAE acting on x when `params` act on scale * x (and reconstruct scale * x).

  `fold_input_scale(p, 1 / scale)` undoes it.
  """
  out = {}
  for name, value in params.items():
    value = np.asarray(value)
    if name in ENCODER_WEIGHTS:
      out[name] = value * scale
    elif name in ("W_dec", "b_dec"):
      out[name] = value / scale
    else:
      out[name] = value
  return out


def save_npz(path: str, params: Mapping[str, np.ndarray], metadata: Mapping[str, Any]) -> None:
  """Writes `path` (.npz of the parameters, our names and layouts) and `path` with .json."""
  architecture_of(params)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **{k: np.asarray(v) for k, v in params.items()})
  with open(os.path.splitext(path)[0] + ".json", "w") as f:
    json.dump(dict(metadata), f, indent=2, default=str)


def load_npz(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """(params, metadata) from `save_npz` output; metadata is {} without a sidecar."""
  with np.load(path, allow_pickle=False) as data:
    params = {k: data[k] for k in data.files}
  architecture_of(params)
  sidecar = os.path.splitext(path)[0] + ".json"
  metadata = json.load(open(sidecar)) if os.path.exists(sidecar) else {}
  return params, metadata


def saelens_hook_name(site: str | None) -> str | None:
  """'blocks.6.resid_post' -> 'blocks.6.hook_resid_post' (TransformerLens names)."""
  if site is None:
    return None
  prefix, _, kind = site.rpartition(".")
  if kind not in SAELENS_HOOKS:
    raise ValueError(f"site {site!r}: expected a kind in {sorted(SAELENS_HOOKS)}")
  return f"{prefix}.{SAELENS_HOOKS[kind]}"


def save_saelens(folder: str, params: Mapping[str, np.ndarray], *, scale: float,
                 metadata: Mapping[str, Any]) -> None:
  """Writes `sae_weights.safetensors` + `cfg.json` that `sae_lens.SAE.load_from_disk` reads.

  `scale` is the normalisation constant the params were trained under; it is folded in.
  `metadata` may hold model_name, hook_name, context_size, prepend_bos and anything else.
  """
  arch = architecture_of(params)
  if arch == "gated_untied":
    raise ValueError("SAELens has no Gated SAE with an untied W_mag (sae.tie_r_mag=False); "
                     "export it as .npz instead")
  raw = fold_input_scale(params, scale)
  if arch == "gated":
    tensors = {"W_enc": raw["W_gate"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"],
               "b_gate": raw["b_gate"], "b_mag": raw["b_mag"], "r_mag": raw["r_mag"]}
  else:
    tensors = {"W_enc": raw["W_enc"], "b_enc": raw["b_enc"], "W_dec": raw["W_dec"],
               "b_dec": raw["b_dec"]}
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
  d_sae, d_in = tensors["W_dec"].shape
  cfg = {
      "architecture": SAELENS_ARCHITECTURE[arch.split("_")[0]],
      "d_in": int(d_in), "d_sae": int(d_sae), "dtype": "float32", "device": "cpu",
      "apply_b_dec_to_input": True, "normalize_activations": "none",
      "reshape_activations": "none",
      "metadata": {"prepend_bos": True, **dict(metadata), "gsae_jax_folded_scale": float(scale)},
  }
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, "sae_weights.safetensors"))
  with open(os.path.join(folder, "cfg.json"), "w") as f:
    json.dump(cfg, f, indent=2, default=str)


def load_saelens(folder: str, scale: float = 1.0) -> tuple[dict[str, np.ndarray], dict]:
  """(params in our names, cfg) from a SAELens Gated or standard folder.

  The result acts on scale * x_raw (pass the normalisation constant to fine-tune or evaluate on
  normalised activations; 1.0 keeps it on raw activations).
  """
  with open(os.path.join(folder, "cfg.json")) as f:
    cfg = json.load(f)
  tensors = load_file(os.path.join(folder, "sae_weights.safetensors"))
  arch = cfg.get("architecture")
  if arch == "gated":
    params = {"W_gate": tensors["W_enc"], "r_mag": tensors["r_mag"], "b_gate": tensors["b_gate"],
              "b_mag": tensors["b_mag"], "W_dec": tensors["W_dec"], "b_dec": tensors["b_dec"]}
  elif arch == "standard":
    params = {k: tensors[k] for k in PARAM_NAMES["baseline"]}
  else:
    raise ValueError(f"{folder}/cfg.json: architecture {arch!r} is not supported; "
                     "expected 'gated' or 'standard'")
  if not cfg.get("apply_b_dec_to_input", True):
    raise ValueError(f"{folder}/cfg.json: apply_b_dec_to_input=false is not supported")
  return fold_input_scale(params, 1.0 / scale), cfg
