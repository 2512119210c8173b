r"""Trains an SAE from an ml_collections config.

  python -m launch.train --config=experiments/synthetic.py --workdir=/tmp/gsae \
      --config.sae.l1_coefficient=0.1

Prints progress and writes `metrics.jsonl` (one JSON object per log step) and `config.json` to
the workdir; the final parameters go to `params.npz`.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from gsae_jax import configs, sharding
from gsae_jax.data.sources import make_source
from gsae_jax.eval.metrics import mean_max_cosine
from gsae_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and outputs.")
flags.mark_flags_as_required(["config", "workdir"])

_SHOWN = ("loss", "reconstruct", "sparsity", "aux", "l0", "fvu", "gamma", "dead_fraction")


def _progress_line(step: int, total: int, m: dict[str, float]) -> str:
  terms = " ".join(f"{k}={m[k]:.4g}" for k in _SHOWN if k in m)
  return f"step {step}/{total} {m['tokens_per_s']:,.0f} tokens/s {terms}"


def main(argv):
  del argv
  config = _CONFIG.value
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
    configs.validate(config, dict(mesh.shape))
  except ValueError as e:
    sys.exit(f"invalid config {config_flags.get_config_filename(flags.FLAGS['config'])}: {e}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  with open(os.path.join(_WORKDIR.value, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  logging.info("mesh %s on %s", dict(mesh.shape), jax.devices()[0].platform)
  source = make_source(config, mesh)
  metrics_path = os.path.join(_WORKDIR.value, "metrics.jsonl")

  with open(metrics_path, "a") as log_file:
    def on_metrics(step, m):
      print(_progress_line(step, config.train.steps, m), flush=True)
      log_file.write(json.dumps({"step": step, **m}) + "\n")
      log_file.flush()

    state = train(config, mesh, source.batches, source.d_in, on_metrics)

  params = {k: np.asarray(v) for k, v in jax.device_get(state.params).items()}
  np.savez(os.path.join(_WORKDIR.value, "params.npz"), **params)
  if source.ground_truth is not None:
    mmcs = float(mean_max_cosine(params["W_dec"], source.ground_truth))
    print(f"mean max cosine similarity to the true features: {mmcs:.4f}", flush=True)


if __name__ == "__main__":
  app.run(main)
