"""Tiny random transformers models and their hook-site tensors read with PyTorch forward hooks."""

from __future__ import annotations

import numpy as np
import torch
import transformers

D, VOCAB = 64, 128

# One tiny config per family; windows/soft-caps small enough that they change the output.
TINY_CONFIGS = {
    "gemma3": lambda: transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        bos_token_id=2, pad_token_id=0, eos_token_id=1),
    "gemma2": lambda: transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=5, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        bos_token_id=2, pad_token_id=0, eos_token_id=1),
    "gemma": lambda: transformers.GemmaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, bos_token_id=2,
        pad_token_id=0, eos_token_id=1),
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, tie_word_embeddings=False),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, rotary_pct=0.25, use_parallel_residual=True, bos_token_id=0,
        eos_token_id=0, tie_word_embeddings=False),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=False, bos_token_id=0,
        eos_token_id=0, tie_word_embeddings=False),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4, n_positions=64, bos_token_id=5,
        eos_token_id=5),
}


def tiny_model(name: str, seed: int = 0):
  """Random model in eval mode; all weights perturbed so norms and biases are not trivial."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[name](),
                                                        attn_implementation="eager").eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _layers(model):
  base = getattr(model, "model", None) or getattr(model, "gpt_neox", None) or model.transformer
  return base.layers if hasattr(base, "layers") else base.h


def _first(x):
  return x[0] if isinstance(x, tuple) else x


def hf_sites(model, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(logits, {site: tensor}) from the PyTorch model, read with forward hooks on its modules."""
  out, handles = {}, []

  def save(name, pre=False):
    def hook(module, args, kwargs_or_out=None, output=None):
      if pre:
        t = args[0] if args else kwargs_or_out["hidden_states"]
      else:
        t = _first(output if output is not None else kwargs_or_out)
      out[name] = t.detach().numpy().copy()
    return hook

  for i, layer in enumerate(_layers(model)):
    attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None) or layer.attn
    o_proj = getattr(attn, "o_proj", None) or getattr(attn, "dense", None) or attn.c_proj
    handles.append(layer.register_forward_pre_hook(save(f"blocks.{i}.resid_pre", pre=True),
                                                   with_kwargs=True))
    handles.append(layer.register_forward_hook(save(f"blocks.{i}.resid_post")))
    handles.append(o_proj.register_forward_pre_hook(save(f"blocks.{i}.attn_z", pre=True),
                                                    with_kwargs=True))
    post_attn = getattr(layer, "pre_feedforward_layernorm", None) and layer.post_attention_layernorm
    handles.append((post_attn or attn).register_forward_hook(save(f"blocks.{i}.attn_out")))
    mlp_out = getattr(layer, "post_feedforward_layernorm", None) or layer.mlp
    handles.append(mlp_out.register_forward_hook(save(f"blocks.{i}.mlp_out")))
  try:
    with torch.no_grad():
      logits = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
  finally:
    for h in handles:
      h.remove()
  return logits, out
