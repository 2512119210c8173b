"""launch/harvest.py end to end with a tiny GPT-2 and an offline tokenizer: the shards equal
`LanguageModel.activations()` of the same packed text, BOS rows excluded."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = 32


def _harvest(model, out, *extra):
  cmd = [sys.executable, "-m", "launch.harvest", "--config=experiments/harvest_gemma3_270m.py",
         f"--config.model={model}", f"--config.output_dir={out}", "--config.layer=1",
         "--config.site=resid_post", f"--config.context_length={T}", "--config.num_tokens=1500",
         "--config.windows_per_shard=16", "--config.batch_size=8", *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_harvest_cli_matches_lm_activations(tiny_lm, tmp_path):
  from gsae_jax import lm
  from gsae_jax.data import shards, text

  proc = _harvest(tiny_lm, tmp_path / "out")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "harvested 1,500 tokens of blocks.1.resid_post" in proc.stdout
  assert "tok/s" in proc.stderr  # tqdm progress: rate and ETA
  m = json.loads((tmp_path / "out" / "manifest.json").read_text())
  for field in ("model_id", "revision", "site", "layer", "d_model", "dtype", "token_count",
                "context_length", "normalisation", "shards", "creation_config"):
    assert field in m, field
  assert (m["model_id"], m["site"], m["layer"], m["d_model"], m["context_length"],
          m["token_count"], m["complete"]) == (tiny_lm, "blocks.1.resid_post", 1, 32, T, 1500,
                                               True)
  assert m["creation_config"]["text"]["source"] == "embedded"

  model, tok = lm.load(tiny_lm)
  bos = model.config.bos_token_id
  windows = text.pack_windows(text.tokenize_documents(text.embedded_corpus(),
                                                      text.hf_encoder(tok)), T, bos)
  batch = np.stack([next(windows) for _ in range(56)])  # 56 x 31 >= 1500 non-BOS tokens
  acts = np.asarray(model.activations(batch, ["blocks.1.resid_post"])["blocks.1.resid_post"])
  expected = acts[batch != bos][:1500]
  got = shards.open_shards(str(tmp_path / "out")).gather(np.arange(1500))
  # The harvest ran on the config's mesh (all 8 fake devices, 1 window each per call), the
  # reference on one device: other kernels, float32 rounding apart.
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=5e-5)
  ctx = np.concatenate([shards.read_ctx(str(tmp_path / "out"), e) for e in m["shards"]])
  np.testing.assert_array_equal(ctx[:, 2], batch[batch != bos][:1500])


def test_harvest_cli_rejects_bad_config(tmp_path):
  proc = _harvest("unused", tmp_path / "out", "--config.site=resid_mid")
  assert proc.returncode != 0
  assert "config.site: expected one of" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "out").exists()


def test_harvest_cli_refusals_are_one_line_before_loading_the_model(tmp_path):
  """The model 'unused' does not exist: each refusal below comes before loading it."""
  from experiments import harvest_gemma3_270m
  from gsae_jax.data import harvest
  from tests.data.conftest import fake_activations, spec, unique_windows

  (tmp_path / "file").write_text("x")
  proc = _harvest("unused", tmp_path / "file")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: config.output_dir: expected a folder, found a file at {tmp_path / 'file'}")

  # A harvest of layer 0 (the same config otherwise) in the output folder.
  c = harvest_gemma3_270m.get_config()
  c.model, c.output_dir, c.layer, c.site, c.context_length = "unused", "x", 0, "resid_post", T
  c.num_tokens, c.windows_per_shard, c.batch_size = 1500, 16, 8
  out = tmp_path / "out"
  harvest.harvest(str(out), unique_windows(2, 17), fake_activations(8), spec(), c.to_dict(),
                  progress=False)
  before = sorted(os.listdir(out))
  proc = _harvest("unused", out)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {out}/manifest.json: holds a harvest with another config"), last
  assert "creation_config.layer: 0 -> 1" in last
  assert sorted(os.listdir(out)) == before
