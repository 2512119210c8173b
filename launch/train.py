r"""Trains an SAE from an ml_collections config.

  python -m launch.train --config=experiments/synthetic.py --workdir=/tmp/gsae \
      --config.sae.l1_coefficient=0.1

Prints progress and writes `metrics.jsonl` (one JSON object per log step) and `config.json` to
the workdir; the final parameters go to `params.npz`. Checkpoints go to `<workdir>/checkpoints`;
re-running the same command resumes from the latest one (bit-identical on CPU). SIGTERM or
SIGINT (preemption, Ctrl-C) saves a checkpoint at the current step and exits cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from gsae_jax import configs, distributed, plan, sharding
from gsae_jax.checkpoint import CheckpointError, Checkpointer
from gsae_jax.data import shards
from gsae_jax.data.sources import make_source
from gsae_jax.eval.metrics import mean_max_cosine
from gsae_jax.train.loop import train
from launch.common import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and outputs.")
_RESTORE_STEP = flags.DEFINE_integer(
    "restore_step", None, "Restore this checkpoint step instead of the latest (e.g. when the "
    "latest is damaged); later checkpoints are moved aside, not deleted.")
flags.mark_flags_as_required(["config", "workdir"])
_DIST = distributed.define_flags()  # --distributed, --coordinator_address, ..., --dry_run

_SHOWN = ("loss", "reconstruct", "sparsity", "aux", "l0", "fvu", "gamma", "dead_fraction")


def _fmt(value) -> str:
  if isinstance(value, list):  # one value per member of a lambda sweep
    return "[" + ",".join(f"{v:.3g}" for v in value) + "]"
  return f"{value:.4g}"


def _progress_line(step: int, total: int, m: dict) -> str:
  terms = " ".join(f"{k}={_fmt(m[k])}" for k in _SHOWN if k in m)
  return f"step {step}/{total} {m['tokens_per_s']:,.0f} tokens/s {terms}"


def source_description(config, source) -> dict:
  """What export needs to know about the activations: d_in, the normalisation constant, and for
  harvested shards the model, site and context facts from their manifest."""
  info = {"d_in": source.d_in, "normalisation_scale": source.scale, "source": config.data.source}
  if config.data.source == "shards":
    manifest = shards.read_manifest(config.data.path)
    info.update({k: manifest.get(k) for k in ("model_id", "revision", "site", "layer",
                                               "context_length", "exclude_bos", "bos_token_id")})
  return info


def run(config, workdir: str, restore_step: int | None = None):
  """Validates, trains (resuming from `<workdir>/checkpoints`) and writes the workdir files.

  Returns (state, source, stopped): `stopped` names the signal that ended the run early, or None.
  Raises ValueError for a bad config or bad data and CheckpointError for unusable checkpoints,
  before anything is trained.
  """
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  distributed.check_process_batch_slices(mesh)  # each process reads its 1/P of every batch
  configs.validate(config, dict(mesh.shape))
  source = make_source(config, mesh)  # opening shards verifies them: bad data stops here
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s)",
        flush=True)
  with open(os.path.join(workdir, "source.json"), "w") as f:
    json.dump(source_description(config, source), f, indent=2)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              save_every=config.checkpoint.save_every, keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
  if checkpointer.steps():
    print(f"resuming from {checkpointer.directory} (steps {checkpointer.steps()})", flush=True)
  stop = []
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))

  log_path = os.path.join(workdir, "metrics.jsonl") if distributed.is_primary() else os.devnull
  with open(log_path, "a") as log_file:
    def on_metrics(step, m):
      print(_progress_line(step, config.train.steps, m), flush=True)
      log_file.write(json.dumps({"step": step, **m}) + "\n")
      log_file.flush()

    try:
      state = train(config, mesh, source.batches, source.d_in, on_metrics, checkpointer,
                    restore_step, stop_requested=lambda: bool(stop))
    finally:
      checkpointer.close()
  if stop:
    step = int(np.asarray(state.step).flat[0])
    print(f"{stop[0]}: saved checkpoint at step {step} in {checkpointer.directory}; "
          "re-run the same command to resume", flush=True)
    return state, source, stop[0]

  # params.npz: our names; in a sweep every array has a leading member axis.
  params = {k: np.asarray(v) for k, v in distributed.to_host(state.params).items()}
  if distributed.is_primary():
    np.savez(os.path.join(workdir, "params.npz"), **params)
  if source.ground_truth is not None:
    w_dec = params["W_dec"].reshape((-1,) + params["W_dec"].shape[-2:])
    mmcs = [float(mean_max_cosine(w, source.ground_truth)) for w in w_dec]
    print(f"mean max cosine similarity to the true features: {_fmt(mmcs if len(mmcs) > 1 else mmcs[0])}",
          flush=True)
  return state, source, None


def main(argv):
  del argv
  quiet_library_logs()
  config = _CONFIG.value
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  if _DIST.dry_run.value:  # shapes only: no weights, no data, no cluster
    try:
      refused = plan.dry_run_sae(config, _DIST.dry_run_devices.value, _DIST.device_memory_gib.value)
    except ValueError as e:
      sys.exit(f"invalid config ({name}): {e}")
    sys.exit(f"dry run: {refused}" if refused else 0)
  distributed.initialize_from_flags(_DIST)
  try:
    run(config, _WORKDIR.value, _RESTORE_STEP.value)
  except CheckpointError as e:
    sys.exit(f"error: {e}")
  except ValueError as e:
    sys.exit(f"invalid config or data ({name}): {e}")


if __name__ == "__main__":
  app.run(main)
