"""One decoder-only transformer skeleton in Flax NNX for every supported family.

The block is written once; the family differences it needs (norm kind, post-norms, parallel
residual, gated MLP, qk-norm, soft-caps, rotary, sliding windows) are fields of `LMConfig`, read
from transformers' config in `gsae_jax.lm.config`. Linear kernels are stored [in, out].
Hook sites are the tensors `Block.__call__` passes through `tap`; see `gsae_jax.lm` for the exact
definition of each site.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gsae_jax.lm.config import LMConfig

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}

# A tap sees (site kind, tensor) and returns the tensor the model continues with.
Tap = Callable[[str, jax.Array], jax.Array]


def _zeros(shape, dtype):
  # Parameters are always overwritten by the converter; models are built under nnx.eval_shape.
  return nnx.Param(jnp.zeros(shape, dtype))


class Linear(nnx.Module):
  """y = x @ kernel (+ bias); kernel [d_in, d_out]."""

  def __init__(self, d_in: int, d_out: int, bias: bool, dtype):
    self.kernel = _zeros((d_in, d_out), dtype)
    self.bias = _zeros((d_out,), dtype) if bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = x @ self.kernel[...]
    return y + self.bias[...] if self.bias is not None else y


class Norm(nnx.Module):
  """RMSNorm (optionally Gemma's (1 + w) scale) or LayerNorm, statistics in float32."""

  def __init__(self, dim: int, cfg: LMConfig, dtype):
    self.kind, self.eps, self.plus_one = cfg.norm, cfg.norm_eps, cfg.norm_plus_one
    self.scale = _zeros((dim,), dtype)
    self.bias = _zeros((dim,), dtype) if cfg.norm_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "layer":
      x32 = x32 - jnp.mean(x32, -1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
    w = self.scale[...].astype(jnp.float32)
    if self.plus_one:  # Gemma multiplies in float32, then casts
      return (y * (1.0 + w)).astype(x.dtype)
    y = y.astype(x.dtype) * self.scale[...]
    return y + self.bias[...] if self.bias is not None else y


def rotate(x: jax.Array, inv_freq: tuple[float, ...], scaling: float) -> jax.Array:
  """Rotary embedding (rotate-half convention) on the leading 2*len(inv_freq) dims of
  x [batch, seq, heads, head_dim], positions 0..seq-1."""
  rot = 2 * len(inv_freq)
  pos = jnp.arange(x.shape[1], dtype=jnp.float32)
  freqs = pos[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
  emb = jnp.concatenate([freqs, freqs], -1)
  cos = (jnp.cos(emb) * scaling).astype(x.dtype)[None, :, None, :]
  sin = (jnp.sin(emb) * scaling).astype(x.dtype)[None, :, None, :]
  xr, xp = x[..., :rot], x[..., rot:]
  x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
  out = xr * cos + jnp.concatenate([-x2, x1], -1) * sin
  return jnp.concatenate([out, xp], -1) if xp.shape[-1] else out


class Attention(nnx.Module):
  """Grouped-query causal self-attention. `z` gives the per-head outputs concatenated,
  [batch, seq, n_heads * head_dim]; `o` projects them back to d_model."""

  def __init__(self, cfg: LMConfig, layer: int, dtype):
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.n_heads, self.n_kv_heads, self.head_dim = h, kv, hd
    self.scale, self.window = cfg.attn_scales[layer], cfg.windows[layer]
    self.softcap = cfg.attn_softcap
    self.rope = cfg.rope[layer] if cfg.rotary_dim else None
    self.q = Linear(d, h * hd, cfg.qkv_bias, dtype)
    self.k = Linear(d, kv * hd, cfg.qkv_bias, dtype)
    self.v = Linear(d, kv * hd, cfg.qkv_bias, dtype)
    self.o = Linear(h * hd, d, cfg.out_bias, dtype)
    if cfg.qk_norm:
      self.q_norm, self.k_norm = Norm(hd, cfg, dtype), Norm(hd, cfg, dtype)
    else:
      self.q_norm = self.k_norm = None

  def z(self, x: jax.Array) -> jax.Array:
    b, s, _ = x.shape
    kv, g, hd = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
    q = self.q(x).reshape(b, s, self.n_heads, hd)
    k = self.k(x).reshape(b, s, kv, hd)
    v = self.v(x).reshape(b, s, kv, hd)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rope is not None:
      q, k = rotate(q, *self.rope), rotate(k, *self.rope)
    q = q.reshape(b, s, kv, g, hd)  # query heads grouped by the key/value head they share
    scores = jnp.einsum("bqkgd,btkd->bkgqt", q, k, preferred_element_type=jnp.float32)
    scores = scores * self.scale
    if self.softcap is not None:
      scores = jnp.tanh(scores / self.softcap) * self.softcap
    qi, ti = jnp.arange(s)[:, None], jnp.arange(s)[None, :]
    allowed = ti <= qi
    if self.window is not None:
      allowed &= qi - ti < self.window
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs, v)
    return out.reshape(b, s, self.n_heads * hd)


class MLP(nnx.Module):
  """down(act(gate(x)) * up(x)) when gated, else down(act(up(x)))."""

  def __init__(self, cfg: LMConfig, dtype):
    if cfg.act not in ACTIVATIONS:
      raise ValueError(f"{cfg.model_id}: activation {cfg.act!r} not supported; "
                       f"supported: {sorted(ACTIVATIONS)}")
    self.act = cfg.act
    self.gate = Linear(cfg.d_model, cfg.d_mlp, cfg.mlp_bias, dtype) if cfg.gated_mlp else None
    self.up = Linear(cfg.d_model, cfg.d_mlp, cfg.mlp_bias, dtype)
    self.down = Linear(cfg.d_mlp, cfg.d_model, cfg.mlp_bias, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.act]
    h = act(self.gate(x)) * self.up(x) if self.gate is not None else act(self.up(x))
    return self.down(h)


class Block(nnx.Module):
  """Pre-norm block shared by all families; x [batch, seq, d_model] -> same."""

  def __init__(self, cfg: LMConfig, layer: int, dtype):
    self.parallel = cfg.parallel_residual
    self.attn_norm = Norm(cfg.d_model, cfg, dtype)
    self.attn = Attention(cfg, layer, dtype)
    self.mlp_norm = Norm(cfg.d_model, cfg, dtype)
    self.mlp = MLP(cfg, dtype)
    if cfg.post_norms:
      self.attn_post_norm, self.mlp_post_norm = Norm(cfg.d_model, cfg, dtype), Norm(cfg.d_model, cfg, dtype)
    else:
      self.attn_post_norm = self.mlp_post_norm = None

  def __call__(self, x: jax.Array, tap: Tap) -> jax.Array:
    x = tap("resid_pre", x)
    z = tap("attn_z", self.attn.z(self.attn_norm(x)))
    a = self.attn.o(z)
    if self.attn_post_norm is not None:
      a = self.attn_post_norm(a)
    a = tap("attn_out", a)
    if self.parallel:  # GPT-NeoX: both branches read the block input
      m = self.mlp(self.mlp_norm(x))
    else:
      x = x + a
      m = self.mlp(self.mlp_norm(x))
    if self.mlp_post_norm is not None:
      m = self.mlp_post_norm(m)
    m = tap("mlp_out", m)
    x = (x + a + m) if self.parallel else (x + m)
    return tap("resid_post", x)


class Transformer(nnx.Module):
  """Embedding -> blocks -> final norm -> unembedding (tied to the embedding when the checkpoint is)."""

  def __init__(self, cfg: LMConfig, dtype=jnp.float32):
    self.config = cfg
    self.embed = _zeros((cfg.vocab_size, cfg.d_model), dtype)
    self.pos_embed = _zeros((cfg.learned_positions, cfg.d_model), dtype) if cfg.learned_positions else None
    self.blocks = nnx.List([Block(cfg, i, dtype) for i in range(cfg.n_layers)])
    self.final_norm = Norm(cfg.d_model, cfg, dtype)
    self.unembed = None if cfg.tied_embeddings else _zeros((cfg.d_model, cfg.vocab_size), dtype)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """tokens [batch, seq] int -> residual stream before block 0, [batch, seq, d_model]."""
    emb = self.embed[...]
    x = jnp.take(emb, tokens, axis=0)
    if self.config.embed_scale is not None:  # Gemma casts sqrt(d_model) to the weight dtype first
      x = x * jnp.asarray(self.config.embed_scale, emb.dtype)
    if self.pos_embed is not None:
      x = x + self.pos_embed[...][: tokens.shape[1]][None]
    return x

  def run_blocks(self, x: jax.Array, tap: Tap, stop: int | None = None) -> jax.Array:
    """Blocks 0..stop (all when None); unrolled so per-layer windows/rotary stay static."""
    last = self.config.n_layers - 1 if stop is None else stop
    for layer in range(last + 1):
      x = self.blocks[layer](x, lambda kind, t, layer=layer: tap(f"blocks.{layer}.{kind}", t))
    return x

  def unembed_logits(self, x: jax.Array) -> jax.Array:
    """Final norm and unembedding: [batch, seq, d_model] -> float32 [batch, seq, vocab]."""
    x = self.final_norm(x)
    w = self.embed[...].T if self.unembed is None else self.unembed[...]
    logits = (x @ w).astype(jnp.float32)
    if self.config.final_softcap is not None:
      logits = jnp.tanh(logits / self.config.final_softcap) * self.config.final_softcap
    return logits

  def __call__(self, tokens: jax.Array, tap: Tap | None = None) -> jax.Array:
    tap = tap or (lambda name, t: t)
    return self.unembed_logits(self.run_blocks(self.embed_tokens(tokens), tap))
