r"""Harvest throughput: our jitted `activations` up to one layer vs transformers' full forward.

  python benchmarks/harvest.py --layer=6 --batch=8 --seq=128

Both read the same weights (Gemma 3 270M dequantised from the GGUF package by transformers), on
the same random batch, in the same process. transformers runs its full forward in torch.no_grad
with its default attention; ours runs blocks 0..layer and stops (no later blocks, no unembedding).
Times are the median of `--repeats` runs after one warm-up (compile) run.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402

from gsae_jax.lm import LanguageModel  # noqa: E402
from gsae_jax.lm.convert import from_hf, load_hf_model, resolve  # noqa: E402

_MODEL = flags.DEFINE_string("model", "gemma3-270m", "Short id, folder or hub id.")
_LAYER = flags.DEFINE_integer("layer", 6, "Deepest layer harvested (blocks.{layer}.resid_post).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per batch.")
_SEQ = flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per side (median counts).")


def _median_seconds(fn, repeats: int) -> float:
  fn()  # warm-up / compile
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main(_):
  where, gguf, revision = resolve(_MODEL.value, None, None)
  hf = load_hf_model(where, gguf, revision, attn_implementation="sdpa")  # its fast default
  ours = LanguageModel(from_hf(hf, model_id=_MODEL.value, revision=revision))
  tokens = np.random.default_rng(0).integers(3, ours.config.vocab_size, (_BATCH.value, _SEQ.value))
  tokens[:, 0] = ours.config.bos_token_id
  site = f"blocks.{_LAYER.value}.resid_post"
  n_tokens = tokens.size

  flax_s = _median_seconds(lambda: jax.block_until_ready(ours.activations(tokens, [site])),
                           _REPEATS.value)
  # Context, not the target: our full forward (all blocks + unembedding) on the same batch.
  full_s = _median_seconds(lambda: jax.block_until_ready(ours.logits(tokens)), _REPEATS.value)
  t_tokens = torch.as_tensor(tokens, dtype=torch.long)

  def torch_forward():
    with torch.no_grad():
      hf(t_tokens)
  torch_s = _median_seconds(torch_forward, _REPEATS.value)

  print(f"device {jax.devices()[0].platform} x{len(jax.devices())}, torch threads "
        f"{torch.get_num_threads()}, {_BATCH.value} x {_SEQ.value} tokens, site {site}, "
        f"attention: transformers {hf.config._attn_implementation}")
  print(f"flax full forward (logits) {n_tokens / full_s:.0f} tokens/s: {torch_s / full_s:.2f}x")
  print(f"flax {n_tokens / flax_s:.0f} tokens/s, transformers {n_tokens / torch_s:.0f} tokens/s: "
        f"{torch_s / flax_s:.2f}x")


if __name__ == "__main__":
  app.run(main)
