"""Training in a workdir: validation, data, checkpoints, progress, metrics and outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any

import jax
import numpy as np

from gsae_jax import configs, distributed, sharding
from gsae_jax.checkpoint import Checkpointer
from gsae_jax.data import shards
from gsae_jax.data.sources import make_source
from gsae_jax.eval.metrics import mean_max_cosine
from gsae_jax.sae.spec import SAESpec, describe
from gsae_jax.train import paths
from gsae_jax.train.loop import train
from gsae_jax.train.state import TrainState

_SHOWN = ("loss", "reconstruct", "sparsity", "aux", "l0", "fvu", "gamma", "dead_fraction")


def _fmt(value) -> str:
  if isinstance(value, list):  # one value per member of a lambda sweep
    return "[" + ",".join(f"{v:.3g}" for v in value) + "]"
  return f"{value:.4g}"


def progress_line(step: int, total: int, m: dict, shown: tuple[str, ...] = _SHOWN) -> str:
  terms = " ".join(f"{k}={_fmt(m[k])}" for k in shown if k in m)
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


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """What `run` leaves behind: the final state, the data source, the SAE description, and the
  signal that stopped the run early (None when it finished)."""
  state: TrainState
  source: Any
  spec: SAESpec
  stopped: str | None


def run(config, workdir: str, restore_step: int | None = None) -> TrainingRun:
  """Validates, trains (resuming from `<workdir>/checkpoints`) and writes the workdir files.

  Raises ValueError for a bad config or bad data and CheckpointError for unusable checkpoints,
  before anything is trained.
  """
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  distributed.check_process_batch_slices(mesh)  # each process reads its 1/P of every batch
  configs.validate(config, dict(mesh.shape))
  source = make_source(config, mesh)  # opening shards verifies them: bad data stops here
  spec = describe(config, source.d_in)
  path = paths.choose(config.train, spec, mesh.shape["data"])  # refuses bad combinations
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"{paths.describe_choice(path)}", flush=True)
  shown = _SHOWN + ("sparse_step",) if path.sparse else _SHOWN
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
      print(progress_line(step, config.train.steps, m, shown), flush=True)
      log_file.write(json.dumps({"step": step, **m}) + "\n")
      log_file.flush()

    try:
      state = train(config, mesh, source.batches, spec, on_metrics, checkpointer,
                    restore_step, stop_requested=lambda: bool(stop))
    finally:
      checkpointer.close()
  if stop:
    step = int(np.asarray(state.step).flat[0])
    print(f"{stop[0]}: saved checkpoint at step {step} in {checkpointer.directory}; "
          "re-run the same command to resume", flush=True)
    return TrainingRun(state, source, spec, stop[0])

  # params.npz: our names; in a sweep every array has a leading member axis.
  params = {k: np.asarray(v) for k, v in distributed.to_host(state.params).items()}
  if distributed.is_primary():
    np.savez(os.path.join(workdir, "params.npz"), **params)
  if source.ground_truth is not None:
    w_dec = params["W_dec"].reshape((-1,) + params["W_dec"].shape[-2:])
    mmcs = [float(mean_max_cosine(w, source.ground_truth)) for w in w_dec]
    print(f"mean max cosine similarity to the true features: {_fmt(mmcs if len(mmcs) > 1 else mmcs[0])}",
          flush=True)
  return TrainingRun(state, source, spec, None)
