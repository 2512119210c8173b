"""launch/features.py end to end: shards of the tiny GPT-2, a tiny Gated SAE trained through the
CLI, the browser written from the workdir and from an export, then opened in a real headless
Chromium (the DOM after the page's JS ran, and a screenshot): what a person would see."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: fast start
ENV.setdefault("JAX_PLATFORMS", "cpu")
D_SAE = 32
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _cli(module: str, *args, ok: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", f"launch.{module}", *map(str, args)], cwd=ROOT,
                        env=ENV, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 or not ok, f"launch.{module}: {proc.stderr[-3000:]}"
  return proc


def _chromium(*args) -> str:
  proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                         "--no-first-run", *args], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return proc.stdout


@pytest.fixture(scope="module")
def run(tiny_lm, tmp_path_factory):
  """Shards harvested from the tiny GPT-2, a 32-feature Gated SAE trained on them, and the
  browser written by the CLI from the workdir."""
  from experiments import harvest_gemma3_270m
  from gsae_jax.runs import harvesting

  root = tmp_path_factory.mktemp("features")
  c = harvest_gemma3_270m.get_config()
  c.model, c.output_dir, c.layer, c.site = tiny_lm, str(root / "shards"), 1, "resid_post"
  c.context_length, c.num_tokens, c.windows_per_shard, c.batch_size = 32, 1500, 16, 8
  harvesting.run(c, progress=False)
  workdir = root / "W"
  _cli("train", "--config=experiments/shards.py", f"--workdir={workdir}",
       f"--config.data.path={c.output_dir}", "--config.data.d_in=32", f"--config.sae.d_sae={D_SAE}",
       "--config.train.steps=10", "--config.train.batch_size=64", "--config.optim.warmup_steps=2",
       "--config.optim.lr=0.001", "--config.train.log_every=5", "--config.checkpoint.save_every=10",
       "--config.train.feature_window_tokens=256", "--config.sae.gated.l1_coefficient=0.5")
  proc = _cli("features", f"--workdir={workdir}", f"--shards={c.output_dir}", "--top_k=5")
  assert f"({D_SAE} feature pages)" in proc.stdout
  return {"shards": c.output_dir, "workdir": str(workdir), "out": str(workdir / "features"),
          "lm": tiny_lm}


def _expected_top(run) -> tuple[int, int, float]:
  """Brute force over every row: (feature, row, activation) of the largest activation."""
  from gsae_jax.data import shards
  from gsae_jax.runs import exporting
  from flax import nnx

  trained = exporting.load_trained(run["workdir"])
  shard_set = shards.open_shards(run["shards"])
  x = shard_set.gather(np.arange(shard_set.num_tokens)) * trained.source["normalisation_scale"]
  codes = np.asarray(nnx.merge(trained.spec.graphdef, trained.params).encode(x))
  row, feature = np.unravel_index(np.argmax(codes), codes.shape)
  return int(feature), int(row), float(codes[row, feature])


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="needs chromium (.ci/run installs it; under CI=true a missing one fails)")
def test_browser_in_headless_chromium(run, tmp_path):
  from gsae_jax import lm as lm_lib
  from gsae_jax.data import shards

  out = run["out"]
  assert sorted(os.listdir(out)) == sorted(["index.html"] +
                                           [f"feature_{i}.html" for i in range(D_SAE)])
  for name in os.listdir(out):  # opens from disk: nothing fetched from the network
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", open(os.path.join(out, name)).read())

  # The index after its JS ran: one table row per feature, each linking to its page.
  dom = _chromium("--dump-dom", f"file://{out}/index.html")
  rows = re.findall(r'<tr class="feature"><td><a href="feature_(\d+)\.html">', dom)
  assert sorted(map(int, rows)) == list(range(D_SAE))
  assert f"{D_SAE} of {D_SAE} features" in dom
  feature, row, value = _expected_top(run)
  # Sorted by max activation (a link to a view: #sort=), then searched for one feature id.
  dom = _chromium("--dump-dom", f"file://{out}/index.html#sort=max")
  assert re.search(r'<tr class="feature"><td><a href="feature_(\d+)\.html">', dom).group(1) == (
      str(feature))
  dom = _chromium("--dump-dom", f"file://{out}/index.html#search={feature}")
  assert re.findall(r'<tr class="feature"><td><a href="feature_(\d+)\.html">', dom) == [
      str(feature)]
  assert f"1 of {D_SAE} features" in dom

  # The feature holding the largest activation of all rows: its page's first top context
  # highlights that row's token, decoded by the tokenizer, with that activation.
  _, tokenizer = lm_lib.load(run["lm"])
  ctx = np.concatenate([shards.read_ctx(run["shards"], e)
                        for e in shards.read_manifest(run["shards"])["shards"]])
  word = tokenizer.decode([int(ctx[row, 2])])
  page = _chromium("--dump-dom", f"file://{out}/feature_{feature}.html")
  top = page[page.index("<div id=\"top\">"):]
  first = re.search(r'<div class="ctx"><span class="act">([^<]+)</span>(.*?)</div>', top)
  assert float(first.group(1)) == pytest.approx(value, rel=1e-4)
  assert re.findall(r'<span class="tok max"[^>]*>([^<]*)</span>', first.group(2)) == [
      html.escape(word, quote=False)]
  assert "Activation histogram" in page and "<svg" in page and "promoted" in page

  shot = tmp_path / "feature.png"
  _chromium(f"--screenshot={shot}", "--window-size=1000,800",
            f"file://{out}/feature_{feature}.html")
  import matplotlib.image
  pixels = matplotlib.image.imread(str(shot))
  assert pixels.shape[:2] == (800, 1000)
  orange = (pixels[..., 0] > 0.9) & (pixels[..., 1] < 0.7) & (pixels[..., 2] < 0.5)
  assert orange.sum() > 50  # the shaded tokens and the histogram bars are visible


def test_browser_from_an_export(run, tmp_path):
  """An export folder as launch/export.py writes it (sae.npz + sae.json), read by --export."""
  from gsae_jax import export
  from gsae_jax.runs import exporting

  trained = exporting.load_trained(run["workdir"])
  export.save_npz(str(tmp_path / "sae.npz"), trained.params, trained.spec,
                  {"step": trained.step, "config": trained.config.to_dict(), **trained.source})
  _cli("features", f"--export={tmp_path}", f"--shards={run['shards']}", "--max_tokens=300",
       "--top_k=3")
  index = open(tmp_path / "features" / "index.html").read()
  data = json.loads(re.search(r"const FEATURES = (\[.*?\]);\n", index).group(1))
  assert [r[0] for r in data] == list(range(D_SAE))
  assert "; 300 tokens" in index
  pages = [n for n in os.listdir(tmp_path / "features") if n.startswith("feature_")]
  assert len(pages) == D_SAE


def test_workdir_and_export_together_is_a_one_line_error(run, tmp_path):
  proc = _cli("features", f"--workdir={run['workdir']}", f"--export={tmp_path}",
              f"--shards={run['shards']}", ok=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: pass exactly one of --workdir (a training workdir) and --export (a folder with "
      "sae.npz and sae.json)")
