"""Evaluation: activation metrics equal the batch definitions; loss recovered and KL score of
the identity "SAE" are 1 and of the zero "SAE" 0; the passes' CE equals the LM's losses and
their KL a hand-written one; the SAE splice equals a hand-written replacement; held-out shards
that do not fit the SAE are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gsae_jax import lm as lm_lib
from gsae_jax.data import harvest
from gsae_jax.errors import ConfigError, DataError
from gsae_jax.eval import evaluate, metrics
from gsae_jax.runs import evaluation
from gsae_jax.sae.gated import GatedSAE
from gsae_jax.sae.spec import from_metadata


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
  passes = evaluate.lm_losses(lm, batches, site, {
      "identity": (lambda a: a, None), "zeros": (jnp.zeros_like, None)})
  ident = evaluate.loss_recovered_metrics(passes, "identity")
  zero = evaluate.loss_recovered_metrics(passes, "zeros")
  assert passes.ce["zero"] > passes.ce["clean"] + 0.01  # ablating the residual stream hurts
  np.testing.assert_allclose(ident["ce_loss_score"], 1.0, atol=1e-5)
  np.testing.assert_allclose(ident["delta_lm_loss"], 0.0, atol=1e-5)
  np.testing.assert_allclose(zero["ce_loss_score"], 0.0, atol=1e-5)
  assert zero["kl_div_with_ablation"] > 0.01
  np.testing.assert_allclose(ident["kl_div_with_sae"], 0.0, atol=1e-6)
  np.testing.assert_allclose(ident["kl_div_score"], 1.0, atol=1e-5)
  np.testing.assert_allclose(zero["kl_div_score"], 0.0, atol=1e-5)
  assert ident["lm_tokens"] == 2 * 4 * 23  # no BOS among the generated targets


def test_lm_passes_equal_the_lm_losses_and_a_hand_written_kl(lm):
  """CE equals LanguageModel.loss(_with_replacement); KL is the mean over non-BOS targets of
  sum_v p_clean (log p_clean - log p_spliced), BOS targets excluded as in the losses."""
  site = "blocks.1.resid_pre"
  tokens = _tokens(lm, 5)
  tokens[1, 7] = lm.config.bos_token_id  # a BOS inside a window: neither replaced nor scored
  half = lambda a: 0.5 * a
  passes = evaluate.lm_losses(lm, [tokens], site, {"half": (half, None)})
  np.testing.assert_allclose(passes.ce["clean"], lm.loss(tokens), rtol=1e-5)
  np.testing.assert_allclose(passes.ce["half"], lm.loss_with_replacement(tokens, site, half),
                             rtol=1e-5)
  clean = jax.nn.log_softmax(lm.logits(tokens)[:, :-1], axis=-1)
  is_bos = np.asarray(tokens == lm.config.bos_token_id)
  acts = lm.activations(tokens, site)[site]
  kept = jnp.where(is_bos[..., None], acts, 0.5 * acts)

  def spliced_logits(params, toks):
    model = nnx.merge(lm.graphdef, params)
    return model(toks, lambda name, t: kept if name == site else t)
  spliced = jax.nn.log_softmax(jax.jit(spliced_logits)(lm.params, tokens)[:, :-1], axis=-1)
  kl = np.asarray(jnp.sum(jnp.exp(clean) * (clean - spliced), axis=-1))
  mask = ~is_bos[:, 1:]
  assert passes.tokens == mask.sum() == 4 * 23 - 1
  np.testing.assert_allclose(passes.kl["half"], kl[mask].mean(), rtol=1e-4)
  assert passes.kl["half"] > 1e-4


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


def _heldout(folder, d_model=8, **overrides) -> str:
  """A finished tiny harvest (64 rows) of a fake LM, as launch/harvest.py writes it."""
  kw = dict(model_id="fake/lm", site="blocks.1.resid_post", layer=1, d_model=d_model,
            context_length=9, num_tokens=64, bos_token_id=0, windows_per_shard=4, batch_size=4,
            normalise_sample_tokens=64)
  windows = (np.r_[0, 1 + 8 * w + np.arange(8)].astype(np.int32) for w in range(8))
  acts = lambda t: np.sin(0.1 * t[..., None] * np.arange(1, d_model + 1)).astype(np.float32)
  harvest.harvest(str(folder), windows, acts, harvest.HarvestSpec(**{**kw, **overrides}),
                  progress=False)
  return str(folder)


SOURCE = {"model_id": "fake/lm", "site": "blocks.1.resid_post", "d_in": 8}


@pytest.mark.parametrize("d_model, overrides, said", [
    (12, {}, "d_model 12 ({manifest}), but the SAE has d_in 8"),
    (8, {"site": "blocks.2.resid_post", "layer": 2},
     "site blocks.2.resid_post ({manifest}), but the SAE was trained on blocks.1.resid_post "
     "(source.json)"),
    (8, {"model_id": "fake/other"},
     "model_id fake/other ({manifest}), but the SAE was trained on fake/lm (source.json)"),
], ids=["d_model", "site", "model_id"])
def test_heldout_shards_must_match_the_sae(tmp_path, d_model, overrides, said):
  folder = _heldout(tmp_path / "heldout", d_model, **overrides)
  with pytest.raises(DataError) as err:
    evaluation.check_heldout(folder, 8, SOURCE)
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"heldout shards {folder}: "
                            + said.format(manifest=f"{folder}/manifest.json")), message


def test_heldout_shards_that_match_or_are_not_described(tmp_path):
  folder = _heldout(tmp_path / "heldout")
  evaluation.check_heldout(folder, 8, SOURCE)
  evaluation.check_heldout(folder, 8, {"source": "synthetic"})  # no site or model known
  evaluation.check_heldout(folder, 8, None)
  with pytest.raises(DataError, match="does not exist"):
    evaluation.check_heldout(str(tmp_path / "nowhere"), 8, SOURCE)


def test_evaluate_runs_checks_heldout_shards_before_evaluating(tmp_path):
  folder = _heldout(tmp_path / "heldout")
  spec = from_metadata({"architecture": "gated", "d_in": 8, "d_sae": 16})
  runs = [{"name": "gated_0", "spec": spec, "params": spec.init_params()}]
  with pytest.raises(DataError, match="site blocks.1.resid_post .* trained on blocks.6"):
    evaluation.evaluate_runs(runs, 1.0, folder, 64,
                             source={**SOURCE, "site": "blocks.6.resid_post"})
  assert "l0" not in runs[0]
  wide = [{"name": "wide", "spec": from_metadata({"architecture": "gated", "d_in": 12,
                                                  "d_sae": 16})}]
  with pytest.raises(DataError, match="the SAE has d_in 12"):
    evaluation.evaluate_runs(wide, 1.0, folder, 64)  # d_in is checked without a source
  evaluation.evaluate_runs(runs, 1.0, folder, 64, source=SOURCE)
  assert runs[0]["tokens"] == 64 and np.isfinite(runs[0]["fvu"])


@pytest.mark.parametrize("index, count", [(0, 1), (0, 2), (1, 2)])
def test_heldout_token_batches_give_each_process_its_rows(monkeypatch, index, count):
  from gsae_jax.runs import harvesting
  windows = [np.full(5, i, np.int32) for i in range(12)]
  monkeypatch.setattr(harvesting, "text_windows", lambda *a: iter(windows))
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)
  batches = evaluation.heldout_token_batches(None, None, 0, num_sequences=12, batch=4)
  rows = 4 // count
  assert [b[:, 0].tolist() for b in batches] == [
      list(range(start + index * rows, start + (index + 1) * rows)) for start in (0, 4, 8)]
  if count > 1:
    with pytest.raises(ConfigError, match="lm_batch_size a multiple of 2 .* found lm_batch_size 3"):
      evaluation.heldout_token_batches(None, None, 0, num_sequences=12, batch=3)
