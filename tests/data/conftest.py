"""Fixtures for the data tests: a fake LM (a fixed function of token and position) and tiny
harvests written through the real harvest code."""

from __future__ import annotations

import numpy as np
import pytest

from gsae_jax.data import harvest

BOS = 0


def fake_activations(d_model: int):
  """tokens [B, T] -> [B, T, d]: column 0 is the token id (so a test can tell rows apart), the
  others a smooth fixed function of (token, position)."""
  def fn(tokens: np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    pos = np.arange(tokens.shape[1])[None, :, None]
    x = np.sin(0.37 * tokens[..., None] + 1.3 * np.arange(d_model) + 0.05 * pos)
    x[..., 0] = tokens
    return x.astype(np.float32)
  return fn


def unique_windows(n: int, context_length: int):
  """n windows [BOS, then ids no other window uses]: token id = 1 + window * (T-1) + position."""
  body = context_length - 1
  for w in range(n):
    yield np.concatenate([[BOS], 1 + w * body + np.arange(body)]).astype(np.int32)


def spec(**overrides) -> harvest.HarvestSpec:
  kw = dict(model_id="fake/lm", site="blocks.1.resid_post", layer=1, d_model=8,
            context_length=17, num_tokens=10**9, bos_token_id=BOS, windows_per_shard=8,
            batch_size=4, normalise_sample_tokens=512)
  kw.update(overrides)
  return harvest.HarvestSpec(**kw)


@pytest.fixture
def make_harvest(tmp_path):
  """(n_windows, **spec overrides) -> folder of a finished harvest of unique windows."""
  def make(n_windows: int, name: str = "shards", **overrides) -> str:
    s = spec(**overrides)
    folder = str(tmp_path / name)
    harvest.harvest(folder, unique_windows(n_windows, s.context_length),
                    fake_activations(s.d_model), s, {"test": True}, progress=False)
    return folder
  return make
