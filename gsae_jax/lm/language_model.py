"""`LanguageModel`: jit-compiled hook-site reads and loss-with-replacement over our Flax LM.

Parameters are an `nnx.State` split once from the module; every method merges it back inside
`jax.jit`, so compiled functions are pure in (params, tokens). Batches are placed on the mesh's
`data` axis; parameters keep the sharding the converter gave them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gsae_jax import distributed
from gsae_jax.lm.config import LMConfig
from gsae_jax.lm.model import Transformer

SITE_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out", "attn_z")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")


def parse_site(site: str, n_layers: int) -> tuple[int, str]:
  """'blocks.{layer}.{kind}' -> (layer, kind), or a ValueError listing valid kinds and layers."""
  m = _SITE_RE.match(site) if isinstance(site, str) else None
  if m is None or m.group(2) not in SITE_KINDS or int(m.group(1)) >= n_layers:
    raise ValueError(f"hook site {site!r}: expected 'blocks.{{layer}}.{{kind}}' with layer in "
                     f"0..{n_layers - 1} and kind in {SITE_KINDS}")
  return int(m.group(1)), m.group(2)


# Float32 logits of one chunk of positions, [chunk, batch, vocab], stay under this (Gemma's 256k
# vocabulary: 8 rows x 32 positions); full logits of a 1024-token batch would be 8 GB.
LOGITS_CHUNK_BYTES = 256 * 2**20


class NextToken(NamedTuple):
  """What `replaced_nll` gives, for positions t = 0..seq-2 predicting tokens[:, t+1].

  hidden: the final residual stream [batch, seq, d_model] (before the final norm), enough to
    recompute any chunk's logits, e.g. as the clean side of a later KL.
  nll: -log p(target) [batch, seq-1]. kl: KL(clean || this run) [batch, seq-1] when clean
    hidden states were given, else None. mask: the scored targets (not BOS) [batch, seq-1].
  """
  hidden: jax.Array
  nll: jax.Array
  kl: jax.Array | None
  mask: jax.Array


def logits_chunk(batch: int, vocab: int, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
  """Positions per chunk so that float32 logits [chunk, batch, vocab] fit in chunk_bytes (>= 1)."""
  return max(1, chunk_bytes // (4 * batch * vocab))


def _next_token_terms(model, target, h, h_clean):
  """-log p(target) [rows] and, with h_clean, KL(clean || h) [rows] from final residuals
  [rows, d_model]: the only place logits exist, one chunk of positions at a time."""
  logp = jax.nn.log_softmax(model.unembed_logits(h), axis=-1)
  nll = -jnp.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
  if h_clean is None:
    return nll, None
  logp_clean = jax.nn.log_softmax(model.unembed_logits(h_clean), axis=-1)
  return nll, jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp), axis=-1)


def replaced_nll(model, tokens, bos: int | None, site: str | None, fn, fn_params,
                 with_params: bool, clean_hidden: jax.Array | None = None,
                 chunk_bytes: int = LOGITS_CHUNK_BYTES) -> NextToken:
  """Next-token NLL (and KL to `clean_hidden`'s distributions) of `model` with `site`'s
  activation replaced by fn (site None: clean). BOS activations are kept and targets equal to
  BOS are not scored (`LanguageModel.loss_with_replacement`). Traced in jit.

  Logits are formed chunk by chunk of positions (`logits_chunk` of chunk_bytes) inside a
  `lax.map`, so no [batch, seq, vocab] array exists; the clean side of the KL is recomputed
  per chunk from its final residual stream (one extra unembedding per position).
  """
  is_bos = (tokens == bos) if bos is not None else jnp.zeros(tokens.shape, bool)

  def tap(name, t):
    if name != site:
      return t
    new = fn(t, fn_params) if with_params else fn(t)
    if new.shape != t.shape:
      raise ValueError(f"loss_with_replacement: fn maps {site} {t.shape} to {new.shape}; "
                       "expected the same shape")
    return jnp.where(is_bos[..., None], t, new.astype(t.dtype))
  hidden = model.run_blocks(model.embed_tokens(tokens), tap)

  def by_position(h):  # [seq-1, batch, d]: lax.map's batch_size cuts the leading axis in chunks
    return None if h is None else jnp.swapaxes(h[:, :-1], 0, 1)
  chunk = logits_chunk(tokens.shape[0], model.config.vocab_size, chunk_bytes)
  nll, kl = jax.lax.map(lambda xs: _next_token_terms(model, *xs),
                        (tokens[:, 1:].T, by_position(hidden), by_position(clean_hidden)),
                        batch_size=chunk)
  return NextToken(hidden, nll.T, None if kl is None else kl.T, ~is_bos[:, 1:])


class LanguageModel:
  """A converted LM. tokens are int32 [batch, seq], one packed sequence per row, positions 0..seq-1."""

  def __init__(self, module: Transformer, mesh: jax.sharding.Mesh | None = None):
    self.config: LMConfig = module.config
    self.graphdef, self.params = nnx.split(module)
    self.mesh = mesh
    # A mesh over several processes (multi-host): every batch method takes this process's rows,
    # the global batch being the processes' rows in process order.
    self.spans_processes = mesh is not None and len(
        {d.process_index for d in mesh.devices.flat}) > 1
    if self.spans_processes:
      distributed.check_process_batch_slices(mesh)  # process p's rows on process p's devices
    self._compiled: dict[Any, Callable] = {}

  # ---- input checks and placement -------------------------------------------------------------
  def place_tokens(self, tokens: Any) -> jax.Array:
    """Checked int32 tokens on the mesh's data axis: on a mesh over several processes `tokens`
    are this process's rows of the global batch (the processes' rows in process order)."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens: expected integer [batch, seq], found {tokens.dtype} {tokens.shape}")
    lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
    if lo < 0 or hi >= self.config.vocab_size:
      raise ValueError(f"tokens: ids must lie in [0, {self.config.vocab_size}) (vocab_size of "
                       f"{self.config.model_id}), found min {lo} max {hi}")
    if self.config.learned_positions and tokens.shape[1] > self.config.learned_positions:
      raise ValueError(f"tokens: seq {tokens.shape[1]} exceeds the {self.config.learned_positions} "
                       f"learned positions of {self.config.model_id}")
    tokens = tokens.astype(jnp.int32)
    if self.mesh is None:
      return tokens
    n_data, batch = self.mesh.shape["data"], NamedSharding(self.mesh, P("data", None))
    if self.spans_processes:
      count = jax.process_count()
      if tokens.shape[0] % (n_data // count):
        raise ValueError(f"tokens: this process's batch {tokens.shape[0]} is not divisible by "
                         f"the {n_data // count} data slices it holds (mesh data={n_data} over "
                         f"{count} processes)")
      return jax.make_array_from_process_local_data(
          batch, np.asarray(tokens), (tokens.shape[0] * count, tokens.shape[1]))
    if tokens.shape[0] % n_data:
      raise ValueError(f"tokens: batch {tokens.shape[0]} is not divisible by mesh data={n_data}")
    return jax.device_put(tokens, batch)

  def _batch_sharding(self):
    return None if self.mesh is None else NamedSharding(self.mesh, P("data"))

  @staticmethod
  def _process_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array: one addressable shard per data slice
    it holds (the copies along 'model' dropped), in row order."""
    by_start = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(by_start[k]) for k in sorted(by_start)])

  def _jit(self, key: Any, build: Callable[[], Callable]) -> Callable:
    if key not in self._compiled:
      out = self._batch_sharding()
      self._compiled[key] = jax.jit(build(), out_shardings=out) if out is not None else jax.jit(build())
    return self._compiled[key]

  # ---- public API -----------------------------------------------------------------------------
  def site_dim(self, site: str) -> int:
    """Width d of a site's [batch, seq, d] tensor."""
    return self.config.site_dim(parse_site(site, self.config.n_layers)[1])

  def activations(self, tokens: Any, sites: Sequence[str] | str,
                  dtype: Any = None) -> dict[str, jax.Array | np.ndarray]:
    """{site: [batch, seq, d]}. Runs blocks up to the deepest requested layer only and never the
    unembedding. `dtype` casts on the device (e.g. to the storage dtype, so that a bf16 harvest
    moves bf16 to the host). On a mesh over several processes `tokens` and the returned arrays
    (numpy) are this process's rows."""
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    if not sites:
      raise ValueError("activations: expected at least one site")
    stop = max(parse_site(s, self.config.n_layers)[0] for s in sites)
    graphdef, wanted = self.graphdef, frozenset(sites)
    cast = None if dtype is None else jnp.dtype(dtype)

    def build():
      def run(params, tokens):
        model = nnx.merge(graphdef, params)
        out = {}

        def tap(name, t):
          if name in wanted:
            out[name] = t
          return t
        model.run_blocks(model.embed_tokens(tokens), tap, stop)
        return out if cast is None else {k: v.astype(cast) for k, v in out.items()}
      return run
    out = self._jit(("activations", tuple(sorted(wanted)), cast), build)(self.params,
                                                                         self.place_tokens(tokens))
    return {k: self._process_rows(v) for k, v in out.items()} if self.spans_processes else out

  def logits(self, tokens: Any) -> jax.Array:
    """float32 [batch, seq, vocab]; position t predicts token t+1."""
    graphdef = self.graphdef

    def build():
      return lambda params, tokens: nnx.merge(graphdef, params)(tokens)
    return self._jit(("logits",), build)(self.params, self.place_tokens(tokens))

  def loss(self, tokens: Any, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> jax.Array:
    """Clean next-token cross-entropy, same positions as `loss_with_replacement`."""
    return self._loss(tokens, None, None, None, chunk_bytes)

  def loss_with_replacement(self, tokens: Any, site: str, fn: Callable[..., jax.Array],
                            fn_params: Any = None,
                            chunk_bytes: int = LOGITS_CHUNK_BYTES) -> jax.Array:
    """Mean next-token cross-entropy with the site's activation replaced by fn(activation).

    Positions: logits at t = 0..seq-2 predict tokens[:, t+1]; a target equal to bos_token_id is
    excluded (the first position is never a target), so the mean is over targets that are not BOS.
    Replacement: fn maps [batch, seq, d] -> [batch, seq, d]; wherever tokens == bos_token_id the
    original activation is kept (BOS activations are outliers SAEs are not trained on).
    `fn` is traced inside jit and keyed by identity: reuse the same callable to reuse the
    compilation. Arrays closed over by fn become constants; pass them as `fn_params` instead
    (then fn(activation, fn_params)) to change them without recompiling. Logits are formed in
    chunks of positions of at most chunk_bytes (`replaced_nll`).
    """
    parse_site(site, self.config.n_layers)
    return self._loss(tokens, site, fn, fn_params, chunk_bytes)

  def _loss(self, tokens, site, fn, fn_params, chunk_bytes) -> jax.Array:
    graphdef, bos = self.graphdef, self.config.bos_token_id
    with_params = fn_params is not None

    def build():
      def run(params, tokens, fn_params):
        out = replaced_nll(nnx.merge(graphdef, params), tokens, bos, site, fn, fn_params,
                           with_params, chunk_bytes=chunk_bytes)
        return jnp.sum(jnp.where(out.mask, out.nll, 0.0)) / jnp.maximum(jnp.sum(out.mask), 1)
      return run
    key = ("loss", site, fn, with_params, chunk_bytes)
    if key not in self._compiled:  # scalar output: replicated, so no batch out_sharding
      self._compiled[key] = jax.jit(build())
    return self._compiled[key](self.params, self.place_tokens(tokens), fn_params)
