"""Streaming from the LM (`data.source='lm'`): the stream's rows, their order, the iterator
state and the config; on a fake LM (rows named by their token) and on the tiny GPT-2."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments import stream_lm
from gsae_jax import configs, sharding
from gsae_jax.data import stream
from gsae_jax.data.permutation import permute
from gsae_jax.errors import ConfigError, RunMismatch
from gsae_jax.runs import harvesting
from tests.data.conftest import BOS, fake_activations, spec

T, D, G, N_WINDOWS, SEED = 9, 4, 5, 23, 7  # 4 full groups of 5 windows and a last one of 3
ONE_DEVICE = NamedSharding(sharding.make_mesh(1, 1), P())


def _windows():
  """N_WINDOWS windows of unique token ids, with a BOS separator inside every third window (as
  packed text has them)."""
  for w in range(N_WINDOWS):
    tokens = 1 + w * T + np.arange(T)
    tokens[0] = BOS
    if w % 3 == 1:
      tokens[4] = BOS
    yield tokens.astype(np.int32)


def _stream(batch: int, lm_batch: int = 2, scale: float = 1.0) -> stream.LMStream:
  s = spec(d_model=D, context_length=T, batch_size=lm_batch)
  groups = stream.LMGroups(_windows, fake_activations(D), s, G, SEED)
  return stream.LMStream(groups, batch, ONE_DEVICE, scale)


def _drain(it) -> list[np.ndarray]:
  out = []
  while True:
    try:
      out.append(np.asarray(next(it)))
    except StopIteration:
      return out


def _expected_groups() -> list[np.ndarray]:
  """Group g: the fake LM's rows of its windows, BOS rows left out, in window then position
  order, permuted by (SEED, g)."""
  windows = np.stack(list(_windows()))
  acts = fake_activations(D)(windows)
  out = []
  for g, lo in enumerate(range(0, N_WINDOWS, G)):
    rows = acts[lo:lo + G][windows[lo:lo + G] != BOS]
    out.append(rows[permute(np.arange(len(rows)), len(rows), SEED, g)])
  return out


def test_stream_is_every_kept_row_once_mixed_within_groups():
  batch = 6
  got = np.concatenate(_drain(_stream(batch)))
  groups = _expected_groups()
  expected = np.concatenate(groups)
  assert len(expected) == N_WINDOWS * (T - 1) - 8  # 8 windows hold a separator: left out too
  assert len(got) == len(expected) // batch * batch  # only the last partial batch is left out
  np.testing.assert_array_equal(got, expected[:len(got)])
  tokens = got[:, 0]  # column 0 of the fake LM's rows is the token id
  assert len(np.unique(tokens)) == len(tokens) and BOS not in tokens
  lo = 0
  for g, rows in enumerate(groups):
    seen = tokens[lo:lo + len(rows)]
    lo += len(rows)
    first, last = 1 + g * G * T, 1 + (g + 1) * G * T  # token ids of group g's windows
    assert ((seen >= first) & (seen < last)).all(), g  # no row leaves its group
    if len(seen) == len(rows):
      assert not (np.diff(seen) > 0).all(), g  # and the group is mixed


def test_lm_batches_and_scale_do_not_change_the_rows():
  a = np.concatenate(_drain(_stream(8, lm_batch=2)))
  b = np.concatenate(_drain(_stream(8, lm_batch=5, scale=0.5)))
  np.testing.assert_array_equal(b, a * np.float32(0.5))


def test_restore_mid_group_gives_the_same_next_batches():
  first = _stream(7)
  for _ in range(6):  # 42 rows: group 0 holds 38
    next(first)
  state = first.get_state()
  assert (state["group"], state["offset"], state["batches"]) == (1, 4, 6)
  following = [np.asarray(next(first)) for _ in range(6)]
  restored = _stream(7)  # a new process: re-reads the text, recomputes group 1, skips the offset
  restored.set_state(state)
  for want in following:
    np.testing.assert_array_equal(np.asarray(next(restored)), want)
  first.set_state(state)  # rewinding in place (the b_dec mean does it) gives them again
  np.testing.assert_array_equal(np.asarray(next(first)), following[0])


def test_end_of_text_stops_and_keeps_the_state():
  it = _stream(50)
  batches = _drain(it)
  assert len(batches) == (N_WINDOWS * (T - 1) - 8) // 50
  state = it.get_state()
  with pytest.raises(StopIteration):
    next(it)
  assert it.get_state() == state


def test_state_of_another_stream_is_refused():
  it = _stream(6)
  state = {**it.get_state(), "seed": SEED + 1, "buffer_windows": 4}
  with pytest.raises(RunMismatch, match=r"seed: 8 -> 7; buffer_windows: 4 -> 5"):
    it.set_state(state)


def test_state_inside_a_group_whose_text_changed_is_refused():
  it = _stream(6)
  for _ in range(8):  # 48 rows: inside group 1
    next(it)
  state = it.get_state()
  assert state["group"] == 1 and state["windows_sha256"]
  s = spec(d_model=D, context_length=T, batch_size=2)
  changed = lambda: (w + (i == 7) for i, w in enumerate(_windows()))  # window 7 (group 1) differs
  other = stream.LMStream(stream.LMGroups(changed, fake_activations(D), s, G, SEED), 6,
                          ONE_DEVICE)
  with pytest.raises(RunMismatch, match=r"\(text or tokenizer\) changed since the checkpoint: "
                                        r"window group 1"):
    other.set_state(state)
  resized = _stream(10)  # another batch size continues at the same row
  resized.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(resized))[:6], np.asarray(next(it)))


# ---- the config and the real LM ------------------------------------------------------------


def _config(tiny_lm, text_file, **data):
  c = stream_lm.get_config()
  c.data.lm.model = tiny_lm
  c.data.lm.layer = 1
  c.data.lm.context_length = 12
  c.data.lm.batch_size = 3
  c.data.lm.text.source = "files"
  c.data.lm.text.paths = (str(text_file),)
  c.data.d_in = 32
  c.data.buffer_windows = 4
  c.data.normalise_sample_tokens = 50
  c.sae.d_sae = 64
  c.train.batch_size = 16
  c.data.update(data)
  return c


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
  """Two documents' worth of words the tiny LM's tokenizer knows, as one .txt file."""
  from gsae_jax.data.text import embedded_corpus
  words = " ".join(doc for _, doc in zip(range(3), embedded_corpus())).split()[:400]
  path = tmp_path_factory.mktemp("stream_text") / "text.txt"
  path.write_text(" ".join(words))
  return path


@pytest.fixture(scope="module")
def lm(tiny_lm, text_file):
  return harvesting.load_lm(_config(tiny_lm, text_file).data.lm)


def test_lm_stream_rows_are_the_lms_activations(tiny_lm, text_file, lm):
  c = _config(tiny_lm, text_file)
  configs.validate(c, {"data": 1, "model": 1})
  source = stream.make_lm_source(c, ONE_DEVICE, lm)
  model, tokenizer = lm
  windows = np.stack(list(harvesting.text_windows(c.data.lm, tokenizer, model.config.bos_token_id)))
  acts = np.asarray(model.activations(windows, ["blocks.1.resid_post"])["blocks.1.resid_post"])
  groups = []
  for g, lo in enumerate(range(0, len(windows), 4)):
    rows = acts[lo:lo + 4][windows[lo:lo + 4] != model.config.bos_token_id]
    groups.append(rows[permute(np.arange(len(rows)), len(rows), c.data.seed, g)])
  expected = np.concatenate(groups)
  first = expected[:50].astype(np.float64)
  assert source.scale == pytest.approx((32 / np.mean(np.sum(first * first, axis=1))) ** 0.5,
                                       rel=1e-6)
  got = np.concatenate(_drain(source.batches))
  assert len(windows) >= 30 and len(got) == len(expected) // 16 * 16
  # LM calls of 3 windows here and of all of them above round differently, in the last bits.
  np.testing.assert_allclose(got, expected[:len(got)] * source.scale, rtol=1e-5, atol=1e-4)
  assert source.batches.description["site"] == "blocks.1.resid_post"
  assert source.batches.description["normalisation"]["sample_tokens"] == 50


def test_bf16_lm_feeds_a_bf16_step_bf16_rows(tiny_lm, text_file):
  c = _config(tiny_lm, text_file)
  c.data.lm.model_dtype, c.train.compute_dtype = "bfloat16", "bfloat16"
  model, tokenizer = harvesting.load_lm(c.data.lm)
  source = stream.make_lm_source(c, ONE_DEVICE, (model, tokenizer))
  x = next(source.batches)
  assert x.dtype == jnp.bfloat16 and x.shape == (16, 32)
  assert source.batches.groups.get(0).dtype == jnp.bfloat16  # no float32 copy on the host
  c.train.compute_dtype = "float32"  # a float32 step gets float32 rows
  assert next(stream.make_lm_source(c, ONE_DEVICE, (model, tokenizer)).batches).dtype == jnp.float32


def test_d_in_that_is_not_the_sites_width_is_refused(tiny_lm, text_file, lm):
  with pytest.raises(ConfigError, match=r"config\.data\.d_in: expected the width 32 of "
                                        r"blocks\.1\.resid_post .* found 31"):
    stream.make_lm_source(_config(tiny_lm, text_file, d_in=31), ONE_DEVICE, lm)


def test_several_processes_are_refused(tiny_lm, text_file, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ConfigError, match="one process, found 2.*launch/harvest.py"):
    stream.make_lm_source(_config(tiny_lm, text_file), ONE_DEVICE)


@pytest.mark.parametrize("field, value, message", [
    ("lm.site", "resid", r"config\.data\.lm\.site: expected one of"),
    ("lm.context_length", 1, r"config\.data\.lm\.context_length: expected an integer >= 2"),
    ("lm.text.paths", ("/nonexistent/*.txt",), r"config\.data\.lm\.text\.paths: expected globs"),
    ("buffer_windows", 0, r"config\.data\.buffer_windows: expected an integer > 0"),
    ("lm.model", "", r"config\.data\.lm\.model: expected a gsae_jax\.lm\.load id"),
])
def test_bad_fields_are_named(tiny_lm, text_file, field, value, message):
  c = _config(tiny_lm, text_file)
  *parents, name = field.split(".")
  block = c.data
  for parent in parents:
    block = block[parent]
  block[name] = value
  with pytest.raises(ConfigError, match=message):
    configs.validate(c, {"data": 1, "model": 1})
