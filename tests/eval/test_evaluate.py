"""Evaluation: activation metrics equal the batch definitions; loss recovered of the identity
"SAE" is 1 and of the zero "SAE" is 0; the SAE splice equals a hand-written replacement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsae_jax import lm as lm_lib
from gsae_jax.eval import evaluate, metrics
from gsae_jax.sae.gated import GatedSAE


@pytest.fixture(scope="module")
def lm(tiny_lm):
  model, _ = lm_lib.load(tiny_lm)
  return model


def _tokens(lm, seed, batch=4, seq=24):
  """The random LM's own greedy continuations of random prompts: text it predicts well, so that
  ablating its residual stream has something to destroy."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, lm.config.vocab_size, size=(batch, seq)).astype(np.int32)
  tokens[:, 0] = lm.config.bos_token_id
  for t in range(2, seq):  # causal: positions < t are final, a fixed shape compiles once
    tokens[:, t] = np.asarray(jnp.argmax(lm.logits(tokens)[:, t - 1], axis=-1))
  return tokens


def _sae(d_in, d_sae=48, seed=0):
  graphdef, state = nnx.split(GatedSAE(d_in, d_sae, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  params["b_gate"] = params["b_gate"] + 0.3  # a mix of open and closed gates
  return graphdef, params


def test_identity_recovers_all_and_zero_recovers_nothing(lm):
  site = "blocks.0.resid_post"
  batches = [_tokens(lm, s) for s in range(2)]
  losses = evaluate.lm_losses(lm, batches, site, {
      "identity": (lambda a: a, None), "zeros": (jnp.zeros_like, None)})
  ident = evaluate.loss_recovered_metrics(losses, "identity")
  zero = evaluate.loss_recovered_metrics(losses, "zeros")
  assert losses["zero"] > losses["clean"] + 0.01  # ablating the residual stream hurts
  np.testing.assert_allclose(ident["ce_loss_score"], 1.0, atol=1e-5)
  np.testing.assert_allclose(ident["delta_lm_loss"], 0.0, atol=1e-5)
  np.testing.assert_allclose(zero["ce_loss_score"], 0.0, atol=1e-5)


def test_sae_splice_equals_hand_written_replacement(lm):
  site, scale = "blocks.1.resid_pre", 0.7
  tokens = _tokens(lm, 3)
  graphdef, params = _sae(lm.site_dim(site))
  sae = nnx.merge(graphdef, params)
  by_hand = lm.loss_with_replacement(
      tokens, site, lambda a: (sae.decode(sae.encode(a * scale)) / scale))
  spliced = lm.loss_with_replacement(tokens, site, evaluate.splice_fn(graphdef), (params, scale))
  np.testing.assert_allclose(spliced, by_hand, rtol=1e-5)
  clean = lm.loss(tokens)
  assert abs(float(spliced) - float(clean)) > 1e-4  # the splice changed something


def test_activation_metrics_accumulate_the_batch_definitions():
  graphdef, params = _sae(16)
  xs = [jax.random.normal(jax.random.key(i), (64, 16)) + 0.5 for i in range(3)]
  out, density = evaluate.activation_metrics(graphdef, params, xs)
  x = jnp.concatenate(xs)
  sae = nnx.merge(graphdef, params)
  f = sae.encode(x)
  whole = metrics.batch_metrics(x, sae.decode(f), f)
  np.testing.assert_allclose(out["l0"], whole["l0"], rtol=1e-6)
  np.testing.assert_allclose(out["fvu"], whole["fvu"], rtol=1e-4)
  np.testing.assert_allclose(out["relative_reconstruction_bias"], whole["gamma"], rtol=1e-4)
  assert out["tokens"] == 192 and density.shape == (48,)
  fired = np.asarray(jnp.sum(f > 0, axis=0))
  np.testing.assert_allclose(out["dead_fraction"], np.mean(fired == 0))
  np.testing.assert_allclose(density[fired > 0], np.log10(fired[fired > 0] / 192), rtol=1e-5)
