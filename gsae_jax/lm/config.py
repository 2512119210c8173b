"""Architecture facts of each supported family, read from a transformers config (the single source).

`LMConfig` is what our Flax model needs, nothing else; `FAMILIES` maps a transformers `model_type`
to one function stating that family's quirks (norm kind, post-norms, soft-caps, rotary, ...).
Everything shared is read once in `_common`. The config is frozen and hashable: it is a static
attribute of the NNX module, so per-layer scales, windows and rotary frequencies become
compile-time constants.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Our model's architecture plus provenance. Per-layer tuples have length n_layers."""
  family: str
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_mlp: int
  vocab_size: int
  bos_token_id: int | None
  model_id: str = ""
  revision: str | None = None
  norm: str = "rms"                 # "rms" | "layer"
  norm_eps: float = 1e-6
  norm_plus_one: bool = False       # Gemma: x_normed * (1 + w)
  embed_scale: float | None = None  # Gemma: embeddings * sqrt(d_model)
  learned_positions: int = 0        # GPT-2: size of the learned absolute position table
  post_norms: bool = False          # Gemma 2/3: norm on attention and MLP outputs before the add
  parallel_residual: bool = False   # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
  gated_mlp: bool = True            # down(act(gate(x)) * up(x)) vs down(act(up(x)))
  act: str = "silu"
  qk_norm: bool = False             # Gemma 3: RMSNorm on each head's q and k
  qkv_bias: bool = False
  out_bias: bool = False
  mlp_bias: bool = False
  norm_bias: bool = False
  attn_softcap: float | None = None
  final_softcap: float | None = None
  tied_embeddings: bool = True
  rotary_dim: int = 0               # leading head dims rotated (0: no rotary)
  attn_scales: tuple[float, ...] = ()
  windows: tuple[int | None, ...] = ()  # sliding window per layer, None = global attention
  # Per layer (inv_freq, attention_scaling), taken from transformers' own rotary module so every
  # rope_type it knows (default, linear, llama3, yarn...) is handled by it, not re-derived here.
  rope: tuple[tuple[tuple[float, ...], float] | None, ...] = dataclasses.field(default=(), repr=False)

  def site_dim(self, kind: str) -> int:
    """Width of a hook site: d_model, or n_heads * head_dim for `attn_z`."""
    return self.n_heads * self.head_dim if kind == "attn_z" else self.d_model


def _get(hf: Any, *names: str, default: Any = None) -> Any:
  for n in names:
    v = getattr(hf, n, None)
    if v is not None:
      return v
  return default


def _common(hf: Any) -> dict:
  n_heads = hf.num_attention_heads
  head_dim = _get(hf, "head_dim", default=hf.hidden_size // n_heads)
  return dict(
      d_model=hf.hidden_size, n_layers=hf.num_hidden_layers, n_heads=n_heads,
      n_kv_heads=_get(hf, "num_key_value_heads", default=n_heads), head_dim=head_dim,
      d_mlp=_get(hf, "intermediate_size", "n_inner", default=4 * hf.hidden_size),
      vocab_size=hf.vocab_size, bos_token_id=hf.bos_token_id,
      tied_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
      attn_scales=(head_dim ** -0.5,) * hf.num_hidden_layers,
      windows=(None,) * hf.num_hidden_layers)


def _layer_windows(hf: Any) -> tuple[int | None, ...]:
  return tuple(hf.sliding_window if t == "sliding_attention" else None for t in hf.layer_types)


def _gemma(hf: Any, act_field: str = "hidden_act") -> dict:
  return dict(norm="rms", norm_eps=hf.rms_norm_eps, norm_plus_one=True,
              embed_scale=math.sqrt(hf.hidden_size), act=getattr(hf, act_field), gated_mlp=True,
              qkv_bias=hf.attention_bias, out_bias=hf.attention_bias, tied_embeddings=True)


def _gemma2(hf: Any) -> dict:
  # Gemma 2/3 read `hidden_activation` (Gemma 1 reads `hidden_act`).
  return dict(_gemma(hf, "hidden_activation"), post_norms=True,
              attn_scales=(hf.query_pre_attn_scalar ** -0.5,) * hf.num_hidden_layers,
              attn_softcap=hf.attn_logit_softcapping, final_softcap=hf.final_logit_softcapping,
              windows=_layer_windows(hf))


def _gemma3(hf: Any) -> dict:
  return dict(_gemma2(hf), qk_norm=True)


def _llama(hf: Any) -> dict:
  return dict(norm="rms", norm_eps=hf.rms_norm_eps, act=hf.hidden_act, gated_mlp=True,
              qkv_bias=hf.attention_bias, out_bias=hf.attention_bias, mlp_bias=hf.mlp_bias)


def _gpt_neox(hf: Any) -> dict:
  return dict(norm="layer", norm_eps=hf.layer_norm_eps, norm_bias=True, act=hf.hidden_act,
              gated_mlp=False, parallel_residual=hf.use_parallel_residual,
              qkv_bias=hf.attention_bias, out_bias=hf.attention_bias, mlp_bias=True)


def _gpt2(hf: Any) -> dict:
  n, hd = hf.n_layer, hf.n_embd // hf.n_head
  scales = tuple((hd ** -0.5 if hf.scale_attn_weights else 1.0)
                 / ((i + 1) if hf.scale_attn_by_inverse_layer_idx else 1) for i in range(n))
  return dict(norm="layer", norm_eps=hf.layer_norm_epsilon, norm_bias=True,
              act=hf.activation_function, gated_mlp=False, learned_positions=hf.n_positions,
              qkv_bias=True, out_bias=True, mlp_bias=True, attn_scales=scales)


# transformers model_type -> (our family name, quirks). The one place each family is described.
FAMILIES: dict[str, tuple[str, Callable[[Any], dict]]] = {
    "gemma3_text": ("gemma3", _gemma3),
    "gemma2": ("gemma2", _gemma2),
    "gemma": ("gemma", _gemma),
    "llama": ("llama", _llama),
    "gpt_neox": ("gpt_neox", _gpt_neox),
    "gpt2": ("gpt2", _gpt2),
}


def check_supported(hf_config: Any, source: str) -> str:
  """Our family name for a transformers config, or a ValueError listing what is supported."""
  model_type = getattr(hf_config, "model_type", None)
  if model_type not in FAMILIES:
    raise ValueError(f"{source}: config.json model_type={model_type!r} is not supported; "
                     f"supported model_types: {sorted(FAMILIES)}")
  return FAMILIES[model_type][0]


def _rope_tables(hf_model: Any, hf: Any) -> tuple[int, tuple]:
  """(rotary_dim, per-layer (inv_freq, scaling)) from the model's own rotary module."""
  rot = next((m for m in hf_model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
  if rot is None:
    return 0, (None,) * hf.num_hidden_layers
  layer_types = getattr(hf, "layer_types", None) or ["default"] * hf.num_hidden_layers
  tables = []
  for t in layer_types:
    if hasattr(rot, f"{t}_inv_freq"):
      inv, scale = getattr(rot, f"{t}_inv_freq"), getattr(rot, f"{t}_attention_scaling")
    else:
      inv, scale = rot.inv_freq, rot.attention_scaling
    tables.append((tuple(float(f) for f in np.asarray(inv.float().cpu())), float(scale)))
  return 2 * len(tables[0][0]), tuple(tables)


def config_from_hf(hf_model: Any, model_id: str, revision: str | None = None) -> LMConfig:
  """LMConfig of a loaded transformers causal LM (config facts + its rotary tables)."""
  hf = hf_model.config
  family = check_supported(hf, model_id)
  facts = dict(_common(hf), **FAMILIES[hf.model_type][1](hf))
  facts["rotary_dim"], facts["rope"] = _rope_tables(hf_model, hf)
  return LMConfig(family=family, model_id=model_id, revision=revision, **facts)
