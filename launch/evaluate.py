r"""Evaluates trained SAEs: metrics on held-out activations and loss recovered in the LM.

  python -m launch.evaluate --workdir=DIR --eval_shards=HELDOUT_SHARDS \
      [--model=gemma3-270m --skip_windows=N --num_sequences=32 --context_length=128]

Reads the latest checkpoint of DIR (a `launch.train` workdir; a lambda sweep evaluates every
member) and writes `DIR/eval.json`, `DIR/density[_<member>].png`, SAEBench's core-eval layout
`DIR/eval_saebench_core[_<member>].json`, and the results to TensorBoard (`DIR/tensorboard`, at
the checkpoint's step). Without --model only activation metrics are computed.

Several processes (`--distributed`, `--coordinator_address`, ...; one per host) run the LM on a
mesh over all of them, each passing its own rows of every LM batch (`--lm_batch_size` a multiple
of the process count); losses are reduced over the global batch and process 0 writes the files.
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags

from experiments import harvest_gemma3_270m
from gsae_jax import distributed
from gsae_jax.data.shards import write_atomic
from gsae_jax.eval import report, saebench
from gsae_jax.runs import evaluation, exporting, harvesting, live_metrics
from gsae_jax.runs.sweep import coefficient_label
from launch.common import parse_flags, run_guarded

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_EVAL_SHARDS = flags.DEFINE_string("eval_shards", None, "Held-out activation shard folder.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 262_144, "Held-out activations to use.")
_MODEL = flags.DEFINE_string("model", None, "LM for loss recovered (short id or folder).")
_SKIP = flags.DEFINE_integer("skip_windows", 0, "Text windows to skip (those used in training).")
_NUM_SEQ = flags.DEFINE_integer("num_sequences", 32, "Held-out sequences for loss recovered.")
_CONTEXT = flags.DEFINE_integer("context_length", 128, "Tokens per held-out sequence.")
_LM_BATCH = flags.DEFINE_integer("lm_batch_size", 8, "Sequences per LM call.")
flags.mark_flag_as_required("workdir")
_DIST = distributed.define_flags(dry_run=False)


def _main() -> None:
  distributed.initialize_from_flags(_DIST)
  trained = exporting.load_trained(_WORKDIR.value, _STEP.value)
  spec, source = trained.spec, trained.source
  runs = [{"name": f"{spec.name}_{i}", "architecture": spec.name,
           "coefficients": spec.member_coefficients()[i],
           "label": coefficient_label(spec.member_coefficients()[i]), "step": trained.step,
           "spec": spec.member(i), "params": p}
          for i, p in enumerate(evaluation.members(trained.params, spec))]
  lm = token_batches = None
  if _MODEL.value:
    text_config = harvest_gemma3_270m.get_config()
    text_config.model, text_config.context_length = _MODEL.value, _CONTEXT.value
    text_config.skip_windows = _SKIP.value
    lm, tokenizer = harvesting.load_lm(text_config)
    token_batches = evaluation.heldout_token_batches(text_config, tokenizer, lm.config.bos_token_id,
                                                     _NUM_SEQ.value, _LM_BATCH.value)
  evaluation.evaluate_runs(runs, source["normalisation_scale"], _EVAL_SHARDS.value,
                           _MAX_TOKENS.value, lm, token_batches, source.get("site"), source=source)
  bench_config = {"model_name": source.get("model_id") or ""}
  if lm is not None:
    bench_config.update(batch_size_prompts=_LM_BATCH.value, context_size=_CONTEXT.value,
                        n_eval_reconstruction_batches=len(token_batches),
                        dataset=text_config.text.source, llm_dtype=text_config.model_dtype)
  elif _EVAL_SHARDS.value:
    bench_config["dataset"] = _EVAL_SHARDS.value
  if not distributed.is_primary():
    return  # every process computed the same results; process 0 writes them
  with live_metrics.LiveMetrics(_WORKDIR.value) as board:
    for i, r in enumerate(runs):
      suffix = f"_{i}" if spec.sweep else ""
      if "log10_density" in r:
        report.density_histogram(r["log10_density"],
                                 os.path.join(_WORKDIR.value, f"density{suffix}.png"), r["name"])
      config = dict(bench_config)
      if "tokens" in r:
        config["n_eval_sparsity_variance_batches"] = math.ceil(r["tokens"] / evaluation.EVAL_BATCH)
      core = saebench.core_eval_output(r, r["spec"], source, source["normalisation_scale"], config)
      write_atomic(os.path.join(_WORKDIR.value, f"eval_saebench_core{suffix}.json"),
                   json.dumps(core, indent=2).encode())
      board.eval_results(trained.step, evaluation.public(r), r.get("log10_density"),
                         prefix=f"eval{suffix}")
  out = [evaluation.public(r) for r in runs]
  write_atomic(os.path.join(_WORKDIR.value, "eval.json"),
               json.dumps(out if spec.sweep else out[0], indent=2).encode())
  for r in out:
    print(json.dumps(r), flush=True)


def main(argv):
  del argv
  run_guarded(_main)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
