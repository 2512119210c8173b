"""The feature browser's one-pass summaries (gsae_jax.eval.features) against brute force over
all rows: streaming top-k, the uniform sample, counts and histograms, and a feature's top
contexts read back from a real shard folder (gsae_jax.runs.features)."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from gsae_jax.data import harvest, shards
from gsae_jax.eval import features as F
from gsae_jax.runs import features as browser
from gsae_jax.sae.gated import GatedSAE
from tests.data.conftest import fake_activations, spec, unique_windows

N, M, K, S = 300, 16, 5, 7


def _stream(codes: np.ndarray, batch: int) -> F.FeatureStats:
  """The pass of `runs.features.collect` over precomputed codes [N, M], `batch` rows at a time."""
  n = codes.shape[0]
  stats = F.FeatureStats.empty(codes.shape[1], K, S)
  for lo in range(0, n, batch):
    rows = np.clip(np.arange(lo - F.BEFORE, lo + batch + F.AFTER), 0, n - 1)
    n_valid = min(batch, n - lo)
    stats = stats.update(F.summarise_codes(codes[rows], lo, n_valid, K, S), lo, n_valid)
  return stats


def _ranked(order_key: np.ndarray, active: np.ndarray, k: int) -> np.ndarray:
  """Rows of the k largest keys among active rows, ties to the lower row."""
  rows = np.flatnonzero(active)
  return rows[np.lexsort((rows, -order_key[rows]))][:k]


@pytest.fixture(scope="module")
def codes():
  """Sparse non-negative codes with many exact ties (values on a 0.25 grid)."""
  rng = np.random.default_rng(0)
  c = np.round(rng.exponential(1.0, (N, M)) * 4) / 4
  c[rng.random((N, M)) < 0.7] = 0.0
  c[:, 3] = 0.0  # a dead feature
  c[:2, 5] = 0.0
  c[2:, 5] = 0.0
  c[0, 5] = 9.0  # fires once, on the first row
  return c.astype(np.float32)


@pytest.mark.parametrize("batch", [64, 300, 1000])
def test_streaming_top_k_equals_a_full_sort(codes, batch):
  stats = _stream(codes, batch)
  padded = np.pad(codes, ((F.BEFORE, F.AFTER), (0, 0)))
  for i in range(M):
    want = _ranked(codes[:, i], codes[:, i] > 0, K)
    live = stats.top.value[i] > 0
    np.testing.assert_array_equal(stats.top.row[i][live], want, err_msg=f"feature {i}")
    np.testing.assert_array_equal(stats.top.value[i][live], codes[want, i])
    windows = want[:, None] + np.arange(F.WIDTH)  # padded index of row - BEFORE + j
    valid = F.context_valid(want, np.zeros_like(windows), N)
    np.testing.assert_array_equal(stats.top.context[i][live][valid], padded[windows, i][valid])
  assert stats.tokens == N
  np.testing.assert_array_equal(stats.fire_count, (codes > 0).sum(0))
  np.testing.assert_allclose(stats.act_sum, codes.sum(0), rtol=1e-6)
  np.testing.assert_allclose(stats.mean_active()[3], 0.0)
  np.testing.assert_allclose(stats.max_activation(), codes.max(0))
  for i in range(M):  # the last feature too: inactive entries must not land in its last bin
    a = codes[:, i][codes[:, i] > 0]
    want = np.histogram(np.clip(a, F.hist_edges()[0], F.hist_edges()[-1] * 0.999),
                        F.hist_edges())[0]
    np.testing.assert_array_equal(stats.hist[i], want)


def test_sample_is_the_same_uniform_reservoir_for_any_batching(codes):
  a, b = _stream(codes, 64), _stream(codes, 1000)
  np.testing.assert_array_equal(a.sample.row, b.sample.row)
  rows = np.arange(N)
  for i in range(M):
    keys = np.asarray(F.hash_key(rows, np.full(N, i)))
    want = _ranked(keys, codes[:, i] > 0, S)
    live = a.sample.key[i] >= 0
    np.testing.assert_array_equal(a.sample.row[i][live], want)
    np.testing.assert_array_equal(a.sample.value[i][live], codes[want, i])
  assert (a.sample.key[3] < 0).all()  # dead: nothing sampled


def test_quantile_groups_cover_the_sample_from_the_top():
  values = np.array([0.0, 5.0, 1.0, 3.0, 2.0, 4.0, 0.0, 6.0, 7.0, 8.0])
  groups = F.quantile_groups(values, groups=4, per_group=2)
  assert [(lo, hi) for lo, hi, _ in groups] == [(7.0, 8.0), (5.0, 6.0), (3.0, 4.0), (1.0, 2.0)]
  assert [sorted(values[p]) for _, _, p in groups] == [[7, 8], [5, 6], [3, 4], [1, 2]]
  assert F.quantile_groups(np.zeros(4)) == []


def test_logit_effects_rank_the_unembedded_direction():
  rng = np.random.default_rng(1)
  w_dec, w_u = rng.normal(size=(5, 8)), rng.normal(size=(8, 30))
  up_ids, up, down_ids, down = F.logit_effects(w_dec.astype(np.float32),
                                               w_u.astype(np.float32), 3, chunk=2)
  logits = (w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True)) @ w_u
  np.testing.assert_array_equal(up_ids, np.argsort(-logits, axis=1)[:, :3])
  np.testing.assert_array_equal(down_ids, np.argsort(logits, axis=1)[:, :3])
  np.testing.assert_allclose(up, np.sort(logits, axis=1)[:, ::-1][:, :3], rtol=1e-5)
  np.testing.assert_allclose(down, np.sort(logits, axis=1)[:, :3], rtol=1e-5)


def test_top_contexts_from_shards_equal_brute_force(tmp_path, monkeypatch):
  """collect() over a real shard folder (4 shards, small batches so contexts cross batch and
  shard edges) and the contexts read back from its ctx files, against encoding every row."""
  monkeypatch.setattr(browser, "BATCH", 50)
  s = spec(windows_per_shard=5, num_tokens=320)  # 20 windows of 16 tokens
  folder = str(tmp_path / "shards")
  harvest.harvest(folder, unique_windows(20, s.context_length), fake_activations(s.d_model), s,
                  {"test": True}, progress=False)
  shard_set = shards.open_shards(folder)
  graphdef, state = nnx.split(GatedSAE(8, 24, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(state)
  params["b_gate"] = params["b_gate"] + 0.2
  model = type("Spec", (), {"graphdef": graphdef, "d_sae": 24, "d_in": 8})
  scale = 0.5
  stats = browser.collect(params, model, scale, shard_set, K, None)

  x = shard_set.gather(np.arange(shard_set.num_tokens)) * np.float32(scale)
  codes = np.asarray(nnx.merge(graphdef, params).encode(x))
  ctx = np.concatenate([shards.read_ctx(folder, e) for e in shard_set.manifest["shards"]])
  contexts = browser._Contexts(shard_set)
  checked = 0
  for i in range(24):
    want_rows = _ranked(codes[:, i], codes[:, i] > 0, K)
    got = contexts.tokens(stats.top, i)
    assert len(got) == len(want_rows)
    for (tokens, acts, centre), row in zip(got, want_rows):
      around = np.arange(row - F.BEFORE, row + F.AFTER + 1)
      around = around[(around >= 0) & (around < len(ctx))]
      around = around[ctx[around, 0] == ctx[row, 0]]  # the same window only
      np.testing.assert_array_equal(tokens, ctx[around, 2])
      np.testing.assert_allclose(acts, codes[around, i], rtol=1e-5, atol=1e-6)
      assert tokens[centre].tolist() == [ctx[row, 2]]
      checked += 1
  assert checked > 24  # most features fire
