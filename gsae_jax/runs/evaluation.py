"""Evaluating trained SAEs from workdirs: held-out activations, held-out text, loss recovered."""

from __future__ import annotations

import functools
import itertools
import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding

from gsae_jax import sharding
from gsae_jax.data import shards
from gsae_jax.data.pipeline import ShardIterator
from gsae_jax.errors import ConfigError, DataError
from gsae_jax.eval import evaluate
from gsae_jax.runs import harvesting
from gsae_jax.sae.spec import SAESpec

EVAL_BATCH = 4096


def members(params: dict, spec: SAESpec) -> list[dict]:
  """The SAE params of each sweep member of `spec` (a single SAE is one member)."""
  if spec.sweep is None:
    return [params]
  return [jax.tree.map(lambda a, i=i: a[i], params) for i in range(spec.members)]


def check_heldout(path: str, d_in: int, source: Mapping | None = None) -> None:
  """DataError unless the held-out shards at `path` fit the SAE: d_model equal to its d_in and,
  where both are known, the site and model_id of its training data (`source`, as in the training
  workdir's source.json). Reads only the manifest."""
  manifest = shards.read_manifest(path)
  mpath = os.path.join(path, shards.MANIFEST)
  if manifest["d_model"] != d_in:
    raise DataError(f"heldout shards {path}: d_model {manifest['d_model']} ({mpath}), but the SAE "
                    f"has d_in {d_in}; pass shards harvested where the SAE was trained")
  for key in ("site", "model_id"):
    heldout, trained = manifest.get(key), (source or {}).get(key)
    if heldout is not None and trained is not None and heldout != trained:
      raise DataError(f"heldout shards {path}: {key} {heldout} ({mpath}), but the SAE was "
                      f"trained on {trained} (source.json); pass shards harvested from {key} "
                      f"{trained}")


def heldout_activation_batches(path: str, scale: float, max_tokens: int):
  """Batches of held-out activations in the SAE's training units (`scale` of its training run),
  one pass, on this process's first device (with several processes each computes the same)."""
  shard_set = shards.open_shards(path)
  batch = min(EVAL_BATCH, shard_set.num_tokens)
  out = NamedSharding(sharding.make_mesh(1, 1, jax.local_devices()[:1]), sharding.batch_spec())
  it = ShardIterator(shard_set, batch, out, scale, seed=0, num_epochs=1, process_index=0,
                     process_count=1)  # whole batches: the device is this process's own
  return itertools.islice(it, max(1, min(max_tokens, shard_set.num_tokens) // batch))


def heldout_token_batches(text_config, tokenizer, bos: int, num_sequences: int, batch: int):
  """[batch, context] int32 arrays of held-out text windows. With several processes (an LM
  on a mesh over all of them), this process's contiguous 1/process_count of each batch's rows:
  `evaluate.lm_losses` reduces over the global batch."""
  windows = list(itertools.islice(harvesting.text_windows(text_config, tokenizer, bos),
                                  num_sequences))
  if not windows:
    raise ValueError(f"no held-out text windows after skipping {text_config.skip_windows}")
  count, index = jax.process_count(), jax.process_index()
  if count > 1 and (batch % count or len(windows) % batch):
    raise ConfigError(f"loss recovered over {count} processes: expected lm_batch_size a multiple "
                      f"of {count} and {len(windows)} held-out windows a multiple of it, found "
                      f"lm_batch_size {batch}")
  rows = batch // count
  return [np.stack(windows[i + index * rows:i + (index + 1) * rows])
          for i in range(0, len(windows), batch)]


@functools.lru_cache(maxsize=None)
def _splice(graphdef):
  return evaluate.splice_fn(graphdef)  # one callable per graphdef: one compilation per arch


def evaluate_runs(runs: list[dict], scale: float, eval_shards: str | None, max_tokens: int,
                  lm=None, token_batches=None, site: str | None = None,
                  source: Mapping | None = None) -> list[dict]:
  """Adds metrics to each run dict {name, spec, params, ...} (in place) and returns them.
  The clean and zero-ablated LM passes are run once for all runs; each run's spliced pass gives
  its loss recovered and its KL score (`evaluate.loss_recovered_metrics`). `source` describes the
  training data (source.json); held-out shards must match it (`check_heldout`)."""
  if eval_shards:
    for d_in in sorted({r["spec"].d_in for r in runs}):  # before any run is evaluated
      check_heldout(eval_shards, d_in, source)
  for r in runs:
    if eval_shards:
      metrics, r["log10_density"] = evaluate.activation_metrics(
          r["spec"].graphdef, r["params"], heldout_activation_batches(eval_shards, scale, max_tokens))
      r.update(metrics)
  if lm is not None:
    replacements = {r["name"]: (_splice(r["spec"].graphdef), (r["params"], scale)) for r in runs}
    passes = evaluate.lm_losses(lm, token_batches, site, replacements)
    for r in runs:
      r.update(evaluate.loss_recovered_metrics(passes, r["name"]))
  return runs


def public(run: dict) -> dict:
  """The JSON-able part of a run dict."""
  return {k: v for k, v in run.items()
          if k not in ("spec", "params", "log10_density", "train_config")}
