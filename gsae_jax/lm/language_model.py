"""`LanguageModel`: jit-compiled hook-site reads and loss-with-replacement over our Flax LM.

Parameters are an `nnx.State` split once from the module; every method merges it back inside
`jax.jit`, so compiled functions are pure in (params, tokens). Batches are placed on the mesh's
`data` axis; parameters keep the sharding the converter gave them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

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


def replaced_nll(model, tokens, bos: int | None, site: str | None, fn, fn_params,
                 with_params: bool):
  """(log p [batch, seq-1, vocab], -log p(target) and the target mask [batch, seq-1]) of `model`
  with `site`'s activation replaced by fn (site None: clean). BOS activations are kept and
  targets equal to BOS are not scored (`LanguageModel.loss_with_replacement`). Traced in jit."""
  is_bos = (tokens == bos) if bos is not None else jnp.zeros(tokens.shape, bool)

  def tap(name, t):
    if name != site:
      return t
    new = fn(t, fn_params) if with_params else fn(t)
    if new.shape != t.shape:
      raise ValueError(f"loss_with_replacement: fn maps {site} {t.shape} to {new.shape}; "
                       "expected the same shape")
    return jnp.where(is_bos[..., None], t, new.astype(t.dtype))
  logp = jax.nn.log_softmax(model(tokens, tap)[:, :-1], axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return logp, nll, ~is_bos[:, 1:]


class LanguageModel:
  """A converted LM. tokens are int32 [batch, seq], one packed sequence per row, positions 0..seq-1."""

  def __init__(self, module: Transformer, mesh: jax.sharding.Mesh | None = None):
    self.config: LMConfig = module.config
    self.graphdef, self.params = nnx.split(module)
    self.mesh = mesh
    self._compiled: dict[Any, Callable] = {}

  # ---- input checks and placement -------------------------------------------------------------
  def _tokens(self, tokens: Any) -> jax.Array:
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
    if self.mesh is not None:
      n_data = self.mesh.shape["data"]
      if tokens.shape[0] % n_data:
        raise ValueError(f"tokens: batch {tokens.shape[0]} is not divisible by mesh data={n_data}")
      tokens = jax.device_put(tokens, NamedSharding(self.mesh, P("data", None)))
    return tokens

  def _batch_sharding(self):
    return None if self.mesh is None else NamedSharding(self.mesh, P("data"))

  def _jit(self, key: Any, build: Callable[[], Callable]) -> Callable:
    if key not in self._compiled:
      out = self._batch_sharding()
      self._compiled[key] = jax.jit(build(), out_shardings=out) if out is not None else jax.jit(build())
    return self._compiled[key]

  # ---- public API -----------------------------------------------------------------------------
  def site_dim(self, site: str) -> int:
    """Width d of a site's [batch, seq, d] tensor."""
    return self.config.site_dim(parse_site(site, self.config.n_layers)[1])

  def activations(self, tokens: Any, sites: Sequence[str] | str) -> dict[str, jax.Array]:
    """{site: [batch, seq, d]}. Runs blocks up to the deepest requested layer only and never the
    unembedding."""
    sites = (sites,) if isinstance(sites, str) else tuple(sites)
    if not sites:
      raise ValueError("activations: expected at least one site")
    stop = max(parse_site(s, self.config.n_layers)[0] for s in sites)
    graphdef, wanted = self.graphdef, frozenset(sites)

    def build():
      def run(params, tokens):
        model = nnx.merge(graphdef, params)
        out = {}

        def tap(name, t):
          if name in wanted:
            out[name] = t
          return t
        model.run_blocks(model.embed_tokens(tokens), tap, stop)
        return out
      return run
    return self._jit(("activations", tuple(sorted(wanted))), build)(self.params, self._tokens(tokens))

  def logits(self, tokens: Any) -> jax.Array:
    """float32 [batch, seq, vocab]; position t predicts token t+1."""
    graphdef = self.graphdef

    def build():
      return lambda params, tokens: nnx.merge(graphdef, params)(tokens)
    return self._jit(("logits",), build)(self.params, self._tokens(tokens))

  def loss(self, tokens: Any) -> jax.Array:
    """Clean next-token cross-entropy, same positions as `loss_with_replacement`."""
    return self._loss(tokens, None, None, None)

  def loss_with_replacement(self, tokens: Any, site: str, fn: Callable[..., jax.Array],
                            fn_params: Any = None) -> jax.Array:
    """Mean next-token cross-entropy with the site's activation replaced by fn(activation).

    Positions: logits at t = 0..seq-2 predict tokens[:, t+1]; a target equal to bos_token_id is
    excluded (the first position is never a target), so the mean is over targets that are not BOS.
    Replacement: fn maps [batch, seq, d] -> [batch, seq, d]; wherever tokens == bos_token_id the
    original activation is kept (BOS activations are outliers SAEs are not trained on).
    `fn` is traced inside jit and keyed by identity: reuse the same callable to reuse the
    compilation. Arrays closed over by fn become constants; pass them as `fn_params` instead
    (then fn(activation, fn_params)) to change them without recompiling.
    """
    parse_site(site, self.config.n_layers)
    return self._loss(tokens, site, fn, fn_params)

  def _loss(self, tokens, site, fn, fn_params) -> jax.Array:
    graphdef, bos = self.graphdef, self.config.bos_token_id
    with_params = fn_params is not None

    def build():
      def run(params, tokens, fn_params):
        _, nll, mask = replaced_nll(nnx.merge(graphdef, params), tokens, bos, site, fn,
                                    fn_params, with_params)
        return jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
      return run
    key = ("loss", site, fn, with_params)
    if key not in self._compiled:  # scalar output: replicated, so no batch out_sharding
      self._compiled[key] = jax.jit(build())
    return self._compiled[key](self.params, self._tokens(tokens), fn_params)
