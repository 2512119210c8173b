"""Training on activations streamed from the LM through the real CLI: it trains, and kill -9 after
a checkpoint then the same command again ends bit-identical to an uninterrupted run."""

import json
import os
import sys

from tests import resume

STEPS = 2000
# One CPU device: the bitwise comparison is about resuming, not about the mesh.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def _cmd(workdir, tiny_lm):
  return [sys.executable, "-m", "launch.train", f"--workdir={workdir}",
          "--config=experiments/stream_lm.py", f"--config.data.lm.model={tiny_lm}",
          "--config.data.lm.layer=1", "--config.data.lm.context_length=32",
          "--config.data.d_in=32", "--config.data.buffer_windows=8",
          "--config.data.normalise_sample_tokens=256", "--config.sae.d_sae=64",
          "--config.train.batch_size=64", f"--config.train.steps={STEPS}",
          "--config.train.log_every=500", "--config.checkpoint.save_every=100",
          "--config.optim.warmup_steps=10"]


def test_stream_trains_and_resumes_bit_identically_after_kill_9(tmp_path, tiny_lm):
  full = resume.assert_kill_9_then_rerun_equals_uninterrupted(
      lambda w: _cmd(w, tiny_lm), tmp_path, ENV, STEPS)
  assert f"step {STEPS}/{STEPS}" in full.stdout
  with open(tmp_path / "full" / "source.json") as f:
    source = json.load(f)
  assert (source["source"], source["site"], source["model_id"]) == (
      "lm", "blocks.1.resid_post", tiny_lm)
  assert source["normalisation"]["sample_tokens"] == 256
