"""Harvest core: shards equal the activation function's output, manifest, atomic resume."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import shutil
import subprocess
import sys
import threading
import time
import types

import ml_dtypes
import numpy as np
import pytest

from gsae_jax import errors, locking
from gsae_jax.data import harvest, shards
from gsae_jax.runs import harvesting
from tests.data.conftest import BOS, fake_activations, spec, unique_windows

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MANIFEST_FIELDS = ("model_id", "revision", "site", "layer", "d_model", "dtype", "token_count",
                   "context_length", "normalisation", "shards", "creation_config", "complete")


def _windows_with_docs(n, T, seed=0):
  """Windows whose bodies contain BOS separators, as packed text gives."""
  rng = np.random.default_rng(seed)
  for _ in range(n):
    w = rng.integers(1, 50, T).astype(np.int32)
    w[0] = BOS
    w[rng.integers(1, T, 2)] = BOS
    yield w


def test_shards_equal_activations_without_bos(tmp_path):
  s = spec(windows_per_shard=3, batch_size=2, revision="abc123")
  windows = list(_windows_with_docs(7, s.context_length))
  act = fake_activations(s.d_model)
  m = harvest.harvest(str(tmp_path), iter(windows), act, s, {"cfg": 1}, progress=False)
  expected = np.concatenate([act(w[None])[0][w != BOS] for w in windows])
  got = shards.open_shards(str(tmp_path)).gather(np.arange(m["token_count"]))
  np.testing.assert_array_equal(got, expected)
  for field in MANIFEST_FIELDS:
    assert field in m, field
  assert (m["model_id"], m["revision"], m["site"], m["layer"], m["d_model"], m["dtype"],
          m["context_length"]) == ("fake/lm", "abc123", "blocks.1.resid_post", 1, 8, "float32", 17)
  assert m["complete"] and m["token_count"] == len(expected)
  assert [e["windows"] for e in m["shards"]] == [3, 3, 1]
  assert sum(e["tokens"] for e in m["shards"]) == len(expected)
  assert m["creation_config"] == {"cfg": 1}
  for e in m["shards"]:
    assert shards.sha256_file(tmp_path / e["file"]) == e["sha256"]
  norm = m["normalisation"]
  mean_sq = float(np.mean(np.sum(expected.astype(np.float64) ** 2, axis=1)))
  assert norm["sample_tokens"] == len(expected)  # sample covers all rows: exact
  np.testing.assert_allclose(norm["mean_sq_norm"], mean_sq, rtol=1e-9)
  np.testing.assert_allclose(norm["scale"], np.sqrt(8 / mean_sq), rtol=1e-9)
  ctx = np.concatenate([shards.read_ctx(str(tmp_path), e) for e in m["shards"]])
  assert (ctx[:, 2] != BOS).all()
  np.testing.assert_array_equal(ctx[:, 2], np.concatenate([w[w != BOS] for w in windows]))
  assert json.loads((tmp_path / "manifest.json").read_text()) == m


def test_keep_bos_bf16_and_exact_token_count(tmp_path):
  s = spec(exclude_bos=False, dtype="bfloat16", num_tokens=40)
  windows = list(unique_windows(5, s.context_length))
  act = fake_activations(s.d_model)
  m = harvest.harvest(str(tmp_path), iter(windows), act, s, progress=False)
  assert m["token_count"] == 40 and m["dtype"] == "bfloat16"
  expected = np.concatenate([act(w[None])[0] for w in windows])[:40].astype(ml_dtypes.bfloat16)
  ss = shards.open_shards(str(tmp_path))
  assert ss.acts[0].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(ss.gather(np.arange(40)), expected)
  assert os.path.getsize(tmp_path / m["shards"][0]["file"]) == 40 * 8 * 2


def test_nan_activations_refused(tmp_path):
  s = spec()
  def bad(tokens):
    x = fake_activations(8)(tokens)
    x[1, 3, 2] = np.nan
    return x
  with pytest.raises(ValueError, match="NaN or Inf for window 1"):
    harvest.harvest(str(tmp_path), unique_windows(4, s.context_length), bad, s, progress=False)
  assert not any(f.startswith("acts_") for f in os.listdir(tmp_path))


def test_resume_refuses_other_config(tmp_path):
  s = spec(num_tokens=30)
  harvest.harvest(str(tmp_path), unique_windows(4, 17), fake_activations(8), s, progress=False)
  with pytest.raises(ValueError, match=r"another config.*spec\.layer: 1 -> 2"):
    harvest.harvest(str(tmp_path), unique_windows(4, 17), fake_activations(8),
                    spec(num_tokens=30, layer=2), progress=False)


_SLOW_HARVEST = """
import sys, time
from gsae_jax.data import harvest
from tests.data.conftest import fake_activations, spec, unique_windows
act = fake_activations(8)
def slow(tokens):
  time.sleep(0.12)
  return act(tokens)
s = spec(windows_per_shard=6, batch_size=2)
harvest.harvest(sys.argv[1], unique_windows(40, s.context_length), slow, s, {"run": "kill"},
                progress=False)
"""


def test_killed_harvest_resumes_to_identical_shards(tmp_path):
  s = spec(windows_per_shard=6, batch_size=2)
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  harvest.harvest(str(whole), unique_windows(40, 17), fake_activations(8), s, {"run": "kill"},
                  progress=False)
  proc = subprocess.Popen([sys.executable, "-c", _SLOW_HARVEST, str(cut)], cwd=ROOT,
                          stderr=subprocess.PIPE)
  deadline = time.time() + 60
  try:
    while time.time() < deadline:  # kill once two shards are listed: mid-way through the third
      if len(_progress(cut)) >= 2:
        break
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait()
  partial = json.loads((cut / "manifest.json").read_text())
  assert not partial["complete"] and partial["shards"] == []  # the config, written first
  assert 2 <= len(_progress(cut)) < 7
  m = harvest.harvest(str(cut), unique_windows(40, 17), fake_activations(8), s, {"run": "kill"},
                      progress=False)
  assert m == json.loads((whole / "manifest.json").read_text())
  assert sorted(os.listdir(cut)) == sorted(os.listdir(whole))
  for name in os.listdir(whole):
    assert (cut / name).read_bytes() == (whole / name).read_bytes(), name


def _progress(folder, process: int = 0) -> dict:
  """{shard index: entry} that `process` lists as finished in `folder` so far."""
  path = folder / harvest.PROGRESS_DIR / f"process_{process}.json"
  try:
    return {int(k): e for k, e in json.loads(path.read_text())["shards"].items()}
  except (FileNotFoundError, json.JSONDecodeError):
    return {}


def _snapshot(folder) -> dict:
  """{relative path: bytes} of every file under `folder`, the folder's own path (a manifest's
  config.output_dir) masked."""
  return {str(p.relative_to(folder)): p.read_bytes().replace(str(folder).encode(), b"<out>")
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _partial_harvest(folder, s, windows, creation_config=None, shards_before_crash=2):
  """A harvest stopped by a crash after `shards_before_crash` shards."""
  calls = []
  def crashing(tokens):
    calls.append(1)
    if len(calls) > shards_before_crash * s.windows_per_shard // s.batch_size:
      raise RuntimeError("crash")
    return fake_activations(s.d_model)(tokens)
  with pytest.raises(RuntimeError, match="crash"):
    harvest.harvest(str(folder), iter(windows), crashing, s, creation_config, progress=False)
  assert sorted(_progress(folder)) == list(range(shards_before_crash))


def test_resume_refuses_changed_text_and_leaves_the_folder_as_it_was(tmp_path):
  s = spec(windows_per_shard=4, batch_size=2)
  windows = list(unique_windows(20, s.context_length))
  _partial_harvest(tmp_path, s, windows)
  (tmp_path / "acts_00002.bin.tmp").write_bytes(b"cut short")
  before = _snapshot(tmp_path)
  changed = [w.copy() for w in windows]
  changed[5][3] += 1  # one token of shard 1
  with pytest.raises(errors.RunMismatch, match=r"shard 1 was harvested from other text") as err:
    harvest.harvest(str(tmp_path), iter(changed), fake_activations(8), s, progress=False)
  assert "\n" not in str(err.value)
  with pytest.raises(errors.RunMismatch, match=r"the text ran out within the windows of shard 1"):
    harvest.harvest(str(tmp_path), iter(windows[:6]), fake_activations(8), s, progress=False)
  assert _snapshot(tmp_path) == before
  m = harvest.harvest(str(tmp_path), iter(windows), fake_activations(8), s, progress=False)
  assert m["complete"] and not any(f.endswith(".tmp") for f in os.listdir(tmp_path))
  assert m["shards"][0]["windows_sha256"] == harvest.windows_digest(windows[:4])


def test_write_error_surfaces_on_one_line_and_leaves_a_resumable_folder(tmp_path, monkeypatch):
  s = spec(windows_per_shard=3, batch_size=3)
  whole, cut = tmp_path / "whole", tmp_path / "cut"
  harvest.harvest(str(whole), unique_windows(10, 17), fake_activations(8), s, {"r": 1},
                  progress=False)
  write_atomic = shards.write_atomic

  def disk_full(path, data):
    if path.endswith("acts_00002.bin"):
      with open(path + ".tmp", "wb") as f:
        f.write(data[:7])  # the device filled up mid-write
      raise OSError(28, "No space left on device", path + ".tmp")
    write_atomic(path, data)
  monkeypatch.setattr(shards, "write_atomic", disk_full)
  with pytest.raises(OSError) as err:
    harvest.harvest(str(cut), unique_windows(10, 17), fake_activations(8), s, {"r": 1},
                    progress=False)
  message = str(err.value)
  assert err.value.errno == 28 and "\n" not in message
  assert "No space left on device while writing shard 2 into" in message
  assert "re-run the same command to resume" in message and "acts_00002.bin.tmp" in message
  monkeypatch.setattr(shards, "write_atomic", write_atomic)
  m = harvest.harvest(str(cut), unique_windows(10, 17), fake_activations(8), s, {"r": 1},
                      progress=False)
  assert m == json.loads((whole / "manifest.json").read_text())
  assert _snapshot(cut) == _snapshot(whole)


# ---------------------------------------------------------------- runs/harvesting (fake LM)

class _FakeTokenizer:
  bos_token_id = BOS

  def __call__(self, texts, add_special_tokens=False):
    return {"input_ids": [[1 + ord(ch) % 97 for ch in t[:200]] for t in texts]}


class _FakeLM:
  def __init__(self, on_call=None):
    self.config = types.SimpleNamespace(n_layers=2, model_id="fake/lm", revision=None,
                                        bos_token_id=BOS)
    self.on_call = on_call

  def site_dim(self, site):
    return 8

  def activations(self, tokens, sites, dtype=None):
    """Per site: the fake activations, column 1 shifted by the site (sites tell apart)."""
    if self.on_call:
      self.on_call()
    out = {}
    for site in sites:
      x = fake_activations(8)(np.asarray(tokens))
      x[..., 1] += hash(site) % 1000
      out[site] = x.astype(dtype or np.float32)
    return out


def _config(out, **overrides):
  from experiments import harvest_gemma3_270m
  c = harvest_gemma3_270m.get_config()
  c.model, c.output_dir, c.layer, c.context_length = "unused", str(out), 1, 17
  c.num_tokens, c.windows_per_shard, c.batch_size, c.normalise_sample_tokens = 200, 4, 2, 64
  c.mesh.data = 1  # the fake LM's batches need no split over the 8 fake devices
  for k, v in overrides.items():
    c[k] = v
  return c


def _no_lm(*args, **kwargs):
  raise AssertionError("the LM was loaded before the refusal")


def test_harvesting_run_holds_the_lock_and_releases_it(tmp_path):
  out = tmp_path / "out"
  seen = []

  def while_harvesting():
    if not seen:
      seen.append((out / ".lock").exists())
      with pytest.raises(errors.Locked, match="is in use by pid"):
        with locking.hold(str(out)):
          pass
  m = harvesting.run(_config(out), progress=False, lm_and_tokenizer=(_FakeLM(while_harvesting),
                                                                     _FakeTokenizer()))
  assert seen == [True] and m["complete"] and m["token_count"] == 200
  assert ".lock" not in os.listdir(out)


def test_harvesting_run_refuses_a_locked_folder_before_loading(tmp_path, monkeypatch):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  out = tmp_path / "out"
  with locking.hold(str(out)):
    with pytest.raises(errors.Locked, match=f"{out} is in use by pid {os.getpid()}"):
      harvesting.run(_config(out), progress=False)


@pytest.mark.parametrize("field, value, message", [
    ("num_tokens", 0, "config.num_tokens: expected an integer > 0, found 0"),
    ("context_length", 1, "config.context_length: expected an integer >= 2"),
    ("seed", -1, "config.seed: expected an integer in [0, 2**31), found -1"),
    ("skip_windows", -3, "config.skip_windows: expected an integer >= 0, found -3"),
    ("normalise_sample_tokens", 0, "config.normalise_sample_tokens: expected an integer > 0"),
    ("site", "resid_mid", "config.site: expected one of"),
    ("extra", float("inf"), "config.extra: expected a finite number, found inf"),
])
def test_harvest_config_is_checked_before_loading(tmp_path, monkeypatch, field, value, message):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  c = _config(tmp_path / "out")
  c[field] = value
  with pytest.raises(errors.ConfigError) as err:
    harvesting.run(c, progress=False)
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "out").exists()


def test_text_source_is_checked_before_loading(tmp_path, monkeypatch):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  c = _config(tmp_path / "out")
  c.text.source, c.text.paths = "files", (str(tmp_path / "*.txt"),)
  with pytest.raises(errors.ConfigError, match=r"config.text.paths: expected globs matching at "
                                               r"least one file"):
    harvesting.run(c, progress=False)
  c.text.source = "hf"
  with pytest.raises(errors.ConfigError, match="config.text.hf_name: expected a dataset name"):
    harvesting.run(c, progress=False)


def test_output_dir_problems_are_refused_before_loading(tmp_path, monkeypatch):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  (tmp_path / "file").write_text("not a folder")
  with pytest.raises(errors.ConfigError, match="config.output_dir: expected a folder, found a "
                                               f"file at {tmp_path / 'file'}"):
    harvesting.run(_config(tmp_path / "file"), progress=False)
  with pytest.raises(errors.ConfigError, match="config.output_dir: expected a folder path, found "
                                               f"a file at {tmp_path / 'file'}"):
    harvesting.run(_config(tmp_path / "file" / "sub"), progress=False)
  assert (tmp_path / "file").read_text() == "not a folder"


def test_other_harvest_in_output_dir_is_refused_before_loading(tmp_path, monkeypatch):
  out = tmp_path / "out"
  lm = (_FakeLM(), _FakeTokenizer())
  harvesting.run(_config(out), progress=False, lm_and_tokenizer=lm)
  before = _snapshot(out)
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  with pytest.raises(errors.RunMismatch, match=r"holds a harvest with another config.*"
                                               r"creation_config.layer: 1 -> 0") as err:
    harvesting.run(_config(out, layer=0), progress=False)
  assert "\n" not in str(err.value)
  with pytest.raises(errors.RunMismatch, match=r"creation_config.text.source: 'embedded' -> 'hf'"):
    c = _config(out)
    c.text.source, c.text.hf_name = "hf", "some/dataset"
    harvesting.run(c, progress=False)
  assert _snapshot(out) == before
  # Ignored fields may change; a finished harvest is returned as it is.
  m = harvesting.run(_config(out, batch_size=4), progress=False, lm_and_tokenizer=lm)
  assert m["complete"] and _snapshot(out) == before


def test_bad_layer_is_one_line_and_leaves_no_folder(tmp_path):
  out = tmp_path / "new" / "out"
  with pytest.raises(errors.ConfigError) as err:
    harvesting.run(_config(out, layer=5), progress=False,
                   lm_and_tokenizer=(_FakeLM(), _FakeTokenizer()))
  assert str(err.value) == "config.layer: expected < 2 (layers of fake/lm), found 5"
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- layout and several processes

def test_plan_cuts_shards_at_windows_and_num_tokens():
  s = spec(windows_per_shard=3, num_tokens=100)  # T = 17: 16 rows per window without BOS
  windows = list(_windows_with_docs(10, s.context_length))
  plan = list(harvest.plan_shards(iter(windows), s))
  kept = [int(np.sum(w != BOS)) for w in windows]
  assert [p.index for p in plan] == [0, 1, 2]
  assert [p.first_window for p in plan] == [0, 3, 6]
  assert [len(p.windows) for p in plan] == [3, 3, len(plan[2].rows)]
  rows = [r for p in plan for r in p.rows]
  assert sum(rows) == 100 and rows[:-1] == kept[:len(rows) - 1] and rows[-1] <= kept[len(rows) - 1]
  assert plan[1].windows_sha256 == harvest.windows_digest(windows[3:6])
  # The text runs out mid-shard: a short last shard, nothing after it.
  short = list(harvest.plan_shards(iter(windows[:4]), spec(windows_per_shard=3)))
  assert [len(p.windows) for p in short] == [3, 1]
  assert [harvest.shard_owner(k, 3) for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def _thread_processes(count: int) -> list[harvest.Processes]:
  """`count` Processes of threads in this process: allgather through a barrier."""
  barrier, codes = threading.Barrier(count, timeout=60), [None] * count

  def member(p: int) -> harvest.Processes:
    def allgather(code: int) -> list[int]:
      codes[p] = code
      barrier.wait()
      out = list(codes)
      barrier.wait()  # nobody overwrites its code before everyone has read them
      return out
    return harvest.Processes(p, count, allgather)
  return [member(p) for p in range(count)]


def _harvest_in_threads(folder, windows, s, count, creation_config=None):
  """Harvests as `count` processes (threads); returns (manifests, failures, the windows fed to
  each LM call) by process."""
  manifests, failures, fed = [None] * count, [None] * count, [[] for _ in range(count)]

  def run(processes: harvest.Processes) -> None:
    def act(tokens):
      fed[processes.index].append(tokens.copy())
      return fake_activations(s.d_model)(tokens)
    try:
      manifests[processes.index] = harvest.harvest(str(folder), iter(windows), act, s,
                                                   creation_config, False, processes)
    except Exception as e:  # noqa: BLE001 (the test inspects it)
      failures[processes.index] = e
  threads = [threading.Thread(target=run, args=(p,)) for p in _thread_processes(count)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return manifests, failures, fed


@pytest.mark.parametrize("count", [2, 3])
def test_processes_harvest_their_own_shards_into_the_folder_of_one(tmp_path, count):
  s = spec(windows_per_shard=3, batch_size=6, num_tokens=350)
  windows = list(_windows_with_docs(30, s.context_length))
  one, many = tmp_path / "one", tmp_path / "many"
  harvest.harvest(str(one), iter(windows), fake_activations(8), s, {"r": 1}, progress=False)
  manifests, failures, fed = _harvest_in_threads(many, windows, s, count, {"r": 1})
  assert failures == [None] * count
  assert all(m == json.loads((one / "manifest.json").read_text()) for m in manifests)
  assert _snapshot(many) == _snapshot(one)  # no progress or temp files left
  assert len({len(calls) for calls in fed}) == 1  # lockstep: as many LM calls everywhere
  digests = [harvest.windows_digest([w]) for w in windows]
  for p, calls in enumerate(fed):
    assert all(c.shape == (6 // count, s.context_length) for c in calls)
    for w in np.concatenate(calls):
      if (w != BOS).any():  # not padding: a window of a shard this process owns
        k = digests.index(harvest.windows_digest([w])) // 3
        assert harvest.shard_owner(k, count) == p


def test_a_failed_process_stops_the_others_and_any_process_count_resumes(tmp_path, monkeypatch):
  s = spec(windows_per_shard=2, batch_size=2, num_tokens=300)
  windows = list(_windows_with_docs(24, s.context_length))
  one, cut = tmp_path / "one", tmp_path / "cut"
  harvest.harvest(str(one), iter(windows), fake_activations(8), s, progress=False)
  write_atomic = shards.write_atomic

  def disk_full(path, data):
    if path.endswith(shards.acts_name(5)):  # shard 5: process 1's third shard
      raise OSError(28, "No space left on device", path)
    write_atomic(path, data)
  monkeypatch.setattr(shards, "write_atomic", disk_full)
  _, failures, _ = _harvest_in_threads(cut, windows, s, 2)
  assert isinstance(failures[1], OSError) and "writing shard 5 into" in str(failures[1])
  assert isinstance(failures[0], errors.DataError)
  assert "process 1 of 2 failed" in str(failures[0])
  assert sorted(_progress(cut, 1)) == [1, 3] and 0 in _progress(cut, 0)
  assert not json.loads((cut / "manifest.json").read_text())["complete"]
  monkeypatch.setattr(shards, "write_atomic", write_atomic)
  s3 = dataclasses.replace(s, batch_size=3)  # may change on resume (one window per process)
  manifests, failures, fed = _harvest_in_threads(cut, windows, s3, 3)
  assert failures == [None] * 3
  assert _snapshot(cut) == _snapshot(one)
  assert sum(len(c) for calls in fed for c in calls) < 2 * len(windows)  # finished shards skipped


def test_resumes_a_partial_manifest_of_earlier_versions(tmp_path):
  """Single-process harvests of earlier versions listed finished shards in a partial
  manifest.json; a re-run (here by 2 processes) continues from it."""
  s = spec(windows_per_shard=2, batch_size=2)
  windows = list(_windows_with_docs(9, s.context_length))
  one, old = tmp_path / "one", tmp_path / "old"
  harvest.harvest(str(one), iter(windows), fake_activations(8), s, {"r": 1}, progress=False)
  shutil.copytree(one, old)
  m = json.loads((old / "manifest.json").read_text())
  for e in m["shards"][2:]:
    os.remove(old / e["file"])
    os.remove(old / e["ctx_file"])
  m.update(shards=m["shards"][:2], complete=False, normalisation=None,
           token_count=sum(e["tokens"] for e in m["shards"][:2]), num_windows=4)
  (old / "manifest.json").write_text(json.dumps(m, indent=2))
  calls = []

  def act(tokens):
    calls.append(tokens)
    return fake_activations(8)(tokens)
  harvest.harvest(str(old), iter(windows), act, s, {"r": 1}, progress=False)
  assert _snapshot(old) == _snapshot(one)
  assert len(calls) == 3  # shards 2, 3, 4 only (a batch each)


def test_process_count_must_divide_the_batch(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"batch_size=4: expected a multiple of the 3 "
                                                   r"processes"):
    harvest.harvest(str(tmp_path / "x"), unique_windows(4, 17), fake_activations(8),
                    spec(batch_size=4), progress=False,
                    processes=harvest.Processes(0, 3, lambda code: [code] * 3))
  assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- several sites, mesh, refusals

SITES = ("blocks.0.resid_post", "blocks.1.mlp_out")


def test_one_pass_over_several_sites_equals_a_harvest_of_each(tmp_path):
  calls = []
  lm = (_FakeLM(lambda: calls.append(1)), _FakeTokenizer())
  out = tmp_path / "multi"
  manifests = harvesting.run_sites(_config(out, sites=SITES), progress=False, lm_and_tokenizer=lm)
  assert list(manifests) == [str(out / site) for site in SITES]
  assert sorted(os.listdir(out)) == sorted(SITES)
  one_pass = len(calls)
  for site in SITES:
    layer, kind = site.split(".")[1:]
    alone = tmp_path / "alone" / site
    calls.clear()
    m = harvesting.run(_config(alone, layer=int(layer), site=kind), progress=False,
                       lm_and_tokenizer=lm)
    assert len(calls) == one_pass  # the pass over both sites took the calls of one
    assert m["site"] == site and manifests[str(out / site)]["token_count"] == 200
    assert _snapshot(out / site) == _snapshot(alone)  # config.output_dir aside: the same bytes
  a, b = (shards.open_shards(str(out / site)).gather(np.arange(200)) for site in SITES)
  assert not np.array_equal(a, b)  # each folder holds its own site
  # A re-run with one folder finished and one stopped: resumes the second only.
  second = out / SITES[1]
  m = json.loads((second / "manifest.json").read_text())
  m.update(shards=m["shards"][:1], complete=False, normalisation=None,
           token_count=m["shards"][0]["tokens"], num_windows=m["shards"][0]["windows"])
  (second / "manifest.json").write_text(json.dumps(m, indent=2))
  calls.clear()
  harvesting.run_sites(_config(out, sites=SITES), progress=False, lm_and_tokenizer=lm)
  assert _snapshot(second) == _snapshot(tmp_path / "alone" / SITES[1])
  assert len(calls) == one_pass - 2  # every shard but the first (4 windows, 2 per call)


def test_bfloat16_activations_are_stored_without_a_float32_copy(tmp_path, monkeypatch):
  seen = []
  write_shard = harvest._write_shard

  def spy(folder, index, acts, *args):
    seen.append(acts.dtype)
    return write_shard(folder, index, acts, *args)
  monkeypatch.setattr(harvest, "_write_shard", spy)
  m = harvesting.run(_config(tmp_path / "out", dtype="bfloat16"), progress=False,
                     lm_and_tokenizer=(_FakeLM(), _FakeTokenizer()))
  assert m["dtype"] == "bfloat16" and set(seen) == {np.dtype(ml_dtypes.bfloat16)}


@pytest.mark.parametrize("overrides, message", [
    (dict(sites=("blocks.0.resid_post", "blocks.x.mlp_out")), "config.sites[1]: expected "
     "'blocks.{layer}.{kind}'"),
    (dict(sites=("blocks.0.resid_mid",)), "config.sites[0]: expected 'blocks.{layer}.{kind}' "
     "with kind in"),
    (dict(sites=("blocks.0.mlp_out", "blocks.0.mlp_out")), "config.sites: expected distinct"),
    (dict(batch_size=3, mesh={"data": 2, "model": 1, "strategy": "fsdp"}),
     "config.batch_size: expected a multiple of mesh data=2, found 3"),
    (dict(mesh={"data": 16, "model": 1, "strategy": "fsdp"}),
     "config.mesh: mesh data=16 x model=1 needs 16 devices, found 8"),
    (dict(mesh={"data": -1, "model": 3, "strategy": "fsdp"}),
     "config.mesh: mesh.model=3 does not divide the 8 devices"),
    (dict(mesh={"data": 1, "model": 1, "strategy": "zigzag"}), "config.mesh.strategy: expected "
     "one of"),
])
def test_sites_and_mesh_are_checked_before_loading(tmp_path, monkeypatch, overrides, message):
  monkeypatch.setattr(harvesting, "load_lm", _no_lm)
  c = _config(tmp_path / "out")
  for k, v in overrides.items():
    c[k] = v
  with pytest.raises(errors.ConfigError) as err:
    harvesting.run_sites(c, progress=False)
  assert message in str(err.value) and "\n" not in str(err.value)
  assert not (tmp_path / "out").exists()


def test_a_site_past_the_last_layer_is_refused_and_leaves_no_folder(tmp_path):
  with pytest.raises(errors.ConfigError, match=r"config.sites: expected layers < 2 \(layers of "
                                               r"fake/lm\), found 'blocks.2.mlp_out'"):
    harvesting.run_sites(_config(tmp_path / "out", sites=("blocks.0.mlp_out", "blocks.2.mlp_out")),
                         progress=False, lm_and_tokenizer=(_FakeLM(), _FakeTokenizer()))
  assert os.listdir(tmp_path) == []


def test_a_changed_mesh_or_batch_does_not_refuse_a_resume(tmp_path):
  lm = (_FakeLM(), _FakeTokenizer())
  harvesting.run(_config(tmp_path / "out"), progress=False, lm_and_tokenizer=lm)
  c = _config(tmp_path / "out", batch_size=4)
  c.mesh.model, c.mesh.strategy = 2, "tp"
  assert harvesting.run(c, progress=False, lm_and_tokenizer=lm)["complete"]


def test_a_harvest_into_an_object_store_equals_a_local_one(tmp_path, monkeypatch):
  """gs:// and friends go through etils.epath (no temp files, no flock, no empty folders): here
  the local disk through that code path, by making `storage.is_local` answer False for it."""
  from gsae_jax.data import storage
  bucket = str(tmp_path / "bucket")
  local_path, remote_calls = storage.is_local, []

  def is_local(path):
    if os.fspath(path).startswith(bucket):
      remote_calls.append(path)
      return False
    return local_path(path)
  monkeypatch.setattr(storage, "is_local", is_local)
  s = spec(windows_per_shard=4, num_tokens=300)
  windows = list(_windows_with_docs(30, s.context_length))
  one = tmp_path / "local"
  harvest.harvest(str(one), iter(windows), fake_activations(8), s, {"r": 1}, progress=False)
  remote = tmp_path / "bucket" / "acts"
  _partial_harvest(remote, s, windows, {"r": 1})  # stopped by a crash, then resumed
  manifests, failures, _ = _harvest_in_threads(remote, windows, s, 2, {"r": 1})
  assert failures == [None, None] and remote_calls
  assert _snapshot(remote) == _snapshot(one)
  assert manifests[0]["normalisation"] == json.loads((one / "manifest.json").read_text())[
      "normalisation"]  # the sample read through byte ranges, not memory maps
