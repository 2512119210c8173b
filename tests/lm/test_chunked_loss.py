"""Chunked next-token losses (`replaced_nll`): NLL and KL equal the math over full logits on the
tiny GPT-2, and the chunked program holds no [batch, seq, vocab] float32 array."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsae_jax import lm as lm_lib
from gsae_jax.eval import evaluate
from gsae_jax.lm.language_model import logits_chunk, replaced_nll

SITE = "blocks.1.resid_pre"
BATCH, SEQ = 4, 40


@pytest.fixture(scope="module")
def lm(tiny_lm):
  model, _ = lm_lib.load(tiny_lm)
  return model


@pytest.fixture(scope="module")
def tokens(lm):
  t = np.random.default_rng(0).integers(2, lm.config.vocab_size, (BATCH, SEQ)).astype(np.int32)
  t[:, 0] = t[1, 9] = lm.config.bos_token_id
  return t


def _half(act):
  return 0.5 * act


def _chunk_bytes(lm, positions: int) -> int:
  return 4 * BATCH * lm.config.vocab_size * positions


def _chunked(lm, chunk_bytes):
  """jit(params, tokens) -> (clean nll, spliced nll, KL(clean || spliced)), chunked."""
  bos = lm.config.bos_token_id

  def run(params, tokens):
    model = nnx.merge(lm.graphdef, params)
    clean = replaced_nll(model, tokens, bos, None, None, None, False, chunk_bytes=chunk_bytes)
    spliced = replaced_nll(model, tokens, bos, SITE, _half, None, False, clean.hidden, chunk_bytes)
    return clean.nll, spliced.nll, spliced.kl, spliced.mask
  return jax.jit(run)


def _by_full_logits(lm):
  """jit(params, tokens) -> the same three arrays from full [batch, seq-1, vocab] log-probs."""
  bos = lm.config.bos_token_id

  def run(params, tokens):
    model = nnx.merge(lm.graphdef, params)
    keep = (tokens == bos)[..., None]
    clean = jax.nn.log_softmax(model(tokens)[:, :-1], axis=-1)
    spliced = jax.nn.log_softmax(model(tokens, lambda name, t: jnp.where(keep, t, 0.5 * t)
                                       if name == SITE else t)[:, :-1], axis=-1)
    nll = lambda logp: -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return nll(clean), nll(spliced), jnp.sum(jnp.exp(clean) * (clean - spliced), axis=-1)
  return jax.jit(run)


@pytest.mark.parametrize("positions", [1, 7, SEQ - 1, 1000], ids=["1", "7", "all", "more"])
def test_chunked_nll_and_kl_equal_the_full_logits_math(lm, tokens, positions):
  want = _by_full_logits(lm)(lm.params, tokens)
  clean, spliced, kl, mask = _chunked(lm, _chunk_bytes(lm, positions))(lm.params, tokens)
  for got, ref in zip((clean, spliced, kl), want):
    assert got.shape == (BATCH, SEQ - 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-6, atol=2e-6)
  assert float(jnp.max(kl)) > 1e-3  # the splice changed the distributions
  assert not mask[1, 8]  # the BOS target tokens[1, 9] is not scored
  assert int(mask.sum()) == BATCH * (SEQ - 1) - 1


def test_language_model_and_eval_passes_agree_across_chunk_sizes(lm, tokens):
  small = _chunk_bytes(lm, 3)
  np.testing.assert_allclose(lm.loss(tokens, small), lm.loss(tokens), rtol=1e-6)
  np.testing.assert_allclose(lm.loss_with_replacement(tokens, SITE, _half, chunk_bytes=small),
                             lm.loss_with_replacement(tokens, SITE, _half), rtol=1e-6)
  chunked = evaluate.lm_losses(lm, [tokens], SITE, {"half": (_half, None)}, small)
  whole = evaluate.lm_losses(lm, [tokens], SITE, {"half": (_half, None)})
  for name in ("zero", "half"):
    np.testing.assert_allclose(chunked.ce[name], whole.ce[name], rtol=1e-6)
    np.testing.assert_allclose(chunked.kl[name], whole.kl[name], rtol=1e-5)


def _avals(jaxpr):
  """Every intermediate value's abstract array in a jaxpr and its sub-jaxprs (scan bodies)."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _avals(inner)


def test_no_full_logits_in_the_chunked_program(lm, tokens):
  vocab, positions = lm.config.vocab_size, 3
  assert logits_chunk(BATCH, vocab, _chunk_bytes(lm, positions)) == positions
  run = _chunked(lm, _chunk_bytes(lm, positions))
  jaxpr = jax.make_jaxpr(run)(lm.params, tokens).jaxpr
  vocab_wide = [a.shape for a in _avals(jaxpr) if vocab in getattr(a, "shape", ())]
  assert (positions, BATCH, vocab) in vocab_wide  # one chunk's logits
  # Nothing larger than a chunk's logits or the (tied) unembedding matrix [d_model, vocab].
  largest = max(positions * BATCH, lm.config.d_model) * vocab
  assert max(np.prod(s) for s in vocab_wide) == largest < BATCH * (SEQ - 1) * vocab / 3
  # XLA's buffers: a few chunk-sized arrays (both runs' logits, log-probs, their difference),
  # against at least one full [batch, seq-1, vocab] float32 array without chunking.
  full_logits, chunk_logits = 4 * BATCH * (SEQ - 1) * vocab, 4 * positions * BATCH * vocab
  chunked_temp = run.lower(lm.params, tokens).compile().memory_analysis().temp_size_in_bytes
  unchunked = _by_full_logits(lm).lower(lm.params, tokens).compile().memory_analysis()
  assert chunked_temp < 5 * chunk_logits < full_logits / 1.5, (chunked_temp, chunk_logits)
  assert unchunked.temp_size_in_bytes > full_logits, (unchunked.temp_size_in_bytes, full_logits)
