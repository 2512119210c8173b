"""Training in a workdir: validation, data, checkpoints, progress, metrics and outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from gsae_jax import configs, distributed, locking, plan, sharding
from gsae_jax.checkpoint import Checkpointer
from gsae_jax.data import shards, storage
from gsae_jax.data.sources import make_source
from gsae_jax.eval.metrics import mean_max_cosine
from gsae_jax.runs import identity, live_metrics, stopping
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
  harvested shards the model, site and context facts from their manifest; for a stream from the
  LM the same facts plus its text config and normalisation sample (`LMStream.description`)."""
  info = {"d_in": source.d_in, "normalisation_scale": source.scale, "source": config.data.source}
  if config.data.source == "shards":
    manifest = shards.read_manifest(config.data.path)
    info.update({k: manifest.get(k) for k in ("model_id", "revision", "site", "layer",
                                               "context_length", "exclude_bos", "bos_token_id")})
  if config.data.source == "lm":
    info.update(source.batches.description)
  return info


@dataclasses.dataclass(frozen=True)
class TrainingRun:
  """What `run` leaves behind: the final state, the data source, the SAE description, and the
  signal that stopped the run early (None when it finished)."""
  state: TrainState
  source: Any
  spec: SAESpec
  stopped: str | None


def _write_json(path: str, obj: Any) -> None:
  shards.write_atomic(path, json.dumps(obj, indent=2).encode())


def _strict_json(metrics: dict) -> dict:
  """Non-finite floats as null: metrics.jsonl stays JSON (bare NaN is not)."""
  fix = lambda v: [fix(x) for x in v] if isinstance(v, list) else (
      None if isinstance(v, float) and not math.isfinite(v) else v)
  return {k: fix(v) for k, v in metrics.items()}


def run(config, workdir: str, restore_step: int | None = None,
        allow_changes: Sequence[str] = ()) -> TrainingRun:
  """Validates, trains (resuming from `<workdir>/checkpoints`) and writes the workdir files.

  Nothing is written to the workdir before the config, the data, the memory plan and the run's
  identity (`gsae_jax.runs.identity`; `allow_changes` names fields allowed to differ from the
  recorded run) are accepted. The workdir is locked while the run lasts. Raises ConfigError /
  ValueError, DataError, RunMismatch, Locked or CheckpointError before anything is trained, and
  Diverged (the last good checkpoint kept) when the loss or the parameters stop being finite.
  """
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  distributed.check_process_batch_slices(mesh)  # each process reads its 1/P of every batch
  configs.validate(config, dict(mesh.shape))
  plan.check_sae_fits(config, config.data.d_in, jax.local_devices())  # before any allocation
  source = make_source(config, mesh)  # opening shards verifies them: bad data stops here
  spec = describe(config, source.d_in)
  path = paths.choose(config.train, spec, mesh.shape["data"], mesh.size)  # refuses bad combinations
  described = source_description(config, source)
  run_id = identity.of(config, described)
  primary = distributed.is_primary()
  with locking.hold(workdir, enabled=primary):
    checkpointer = Checkpointer(storage.join(workdir, "checkpoints"),
                                save_every=config.checkpoint.save_every,
                                keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    try:
      changed = identity.changes(workdir, run_id, allow_changes,
                                 _earlier_identity(workdir, checkpointer))
      if primary:  # the run is accepted: from here on the workdir is this run's
        steps = checkpointer.steps()
        identity.record(workdir, run_id, changed, steps[-1] if steps else None)
        _write_json(storage.join(workdir, "config.json"), json.loads(config.to_json_best_effort()))
        _write_json(storage.join(workdir, "source.json"), described)
      return _train(config, workdir, mesh, source, spec, path, checkpointer, restore_step)
    finally:
      checkpointer.close()


def _earlier_identity(workdir: str, checkpointer: Checkpointer) -> dict | None:
  """The identity of a run an earlier version left in `workdir` (checkpoints but no run.json),
  rebuilt from its latest checkpoint's config and its source.json; None otherwise."""
  steps = checkpointer.steps()
  if not steps or storage.exists(storage.join(workdir, identity.RUN_FILE)):
    return None
  try:
    saved = checkpointer.restore_config(steps[-1])
  except Exception:  # a damaged checkpoint: its restore names it, with the way out
    return None
  saved = ml_collections.ConfigDict(configs.upgrade_legacy(saved))
  source_path = storage.join(workdir, "source.json")
  described = {}
  if storage.exists(source_path):
    described = json.loads(storage.read_bytes(source_path))
  return identity.of(saved, described, shard_checksums=False)


def _more_data(config) -> str:
  """How to go on after the data ran out."""
  if config.data.source == "lm":
    return ("the text (config.data.lm.text) gave no more windows: give more text and re-run with "
            "--allow_changes=data.lm.text,source.text to go on")
  return (f"after {config.data.num_epochs} epoch(s): raise config.data.num_epochs (0 = repeat) "
          "and re-run with --allow_changes=data.num_epochs to go on")


def _train(config, workdir: str, mesh, source, spec: SAESpec, path: paths.PathChoice,
           checkpointer: Checkpointer, restore_step: int | None) -> TrainingRun:
  print(f"mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"{paths.describe_choice(path)}", flush=True)
  shown = _SHOWN + ("sparse_step",) if path.sparse else _SHOWN
  if checkpointer.steps():
    print(f"resuming from {checkpointer.directory} (steps {checkpointer.steps()})", flush=True)
  primary = distributed.is_primary()
  log = storage.AppendFile(storage.join(workdir, "metrics.jsonl")) if primary else None
  with log or contextlib.nullcontext(), stopping.watch_signals(graceful=True) as requested, \
       live_metrics.LiveMetrics(workdir, enabled=primary) as board:
    def on_metrics(step, m):
      print(progress_line(step, config.train.steps, m, shown), flush=True)
      if log is not None:
        log.write(json.dumps({"step": step, **_strict_json(m)}, allow_nan=False) + "\n")
      board.train_metrics(step, m)

    state = train(config, mesh, source.batches, spec, on_metrics, checkpointer, restore_step,
                  stop_requested=lambda: requested() is not None)
    stopped = requested()
  step = int(np.asarray(state.step).flat[0])
  if stopped:
    print(f"{stopped}: saved checkpoint at step {step} in {checkpointer.directory}; "
          "re-run the same command to resume", flush=True)
    return TrainingRun(state, source, spec, stopped)
  if step < config.train.steps:
    print(f"the data ran out at step {step} of {config.train.steps}: saved checkpoint at step "
          f"{step}; {_more_data(config)}", flush=True)

  # params.npz: our names; in a sweep every array has a leading member axis.
  params = {k: np.asarray(v) for k, v in distributed.to_host(state.params).items()}
  if distributed.is_primary():
    with storage.open_atomic(storage.join(workdir, "params.npz")) as f:
      np.savez(f, **params)
  if source.ground_truth is not None:
    w_dec = params["W_dec"].reshape((-1,) + params["W_dec"].shape[-2:])
    mmcs = [float(mean_max_cosine(w, source.ground_truth)) for w in w_dec]
    print(f"mean max cosine similarity to the true features: {_fmt(mmcs if len(mmcs) > 1 else mmcs[0])}",
          flush=True)
  return TrainingRun(state, source, spec, None)
