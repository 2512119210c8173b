"""Lambda sweeps: each architecture's grid in one data pass, then evaluation and a report."""

from __future__ import annotations

import json
import os
import time

from gsae_jax.eval import report
from gsae_jax.runs import evaluation, harvesting, training
from gsae_jax.train.state import sae_graph


class Preempted(Exception):
  """A training run stopped on a signal; re-running the same command resumes it."""


def train_grids(c, out_dir: str) -> tuple[list[dict], object]:
  """Trains every architecture's grid; returns (runs with params, the last training source)."""
  runs, source = [], None
  for arch, grid in c.grids.items():
    if not grid:
      continue
    tc = c.train.copy_and_resolve_references()
    tc.update(c.get("overrides", {}).get(arch, {}))  # e.g. the baseline's own learning rate
    tc.sae.architecture = arch
    tc.sweep.l1_coefficients = tuple(grid)
    print(f"== training {arch} over lambda {tuple(grid)}", flush=True)
    state, source, stopped = training.run(tc, os.path.join(out_dir, arch))
    if stopped:
      raise Preempted(f"{arch} training stopped by {stopped}")
    graphdef = sae_graph(tc, source.d_in)[0]
    for i, (lam, params) in enumerate(zip(grid, evaluation.members(state.params, tuple(grid)))):
      runs.append({"name": f"{arch}_{i}", "architecture": arch, "l1_coefficient": float(lam),
                   "member": i, "graphdef": graphdef, "params": params})
  return runs, source


def run_sweep(c, out_dir: str, lm_and_tokenizer=None) -> list[dict]:
  """Trains, evaluates and reports; returns the runs (with params) sorted by architecture, L0."""
  t0 = time.perf_counter()
  runs, source = train_grids(c, out_dir)
  t_train = time.perf_counter() - t0
  lm = token_batches = None
  if c.eval.loss_recovered:
    lm, tokenizer = lm_and_tokenizer or harvesting.load_lm(c.eval.text)
    token_batches = evaluation.heldout_token_batches(
        c.eval.text, tokenizer, lm.config.bos_token_id, c.eval.num_sequences, c.eval.lm_batch_size)
  print(f"== evaluating {len(runs)} SAEs", flush=True)
  t1 = time.perf_counter()
  site = training.source_description(c.train, source).get("site")
  evaluation.evaluate_runs(runs, source.scale, c.eval.shards_path or None, c.eval.max_tokens,
                             lm, token_batches, site)
  runs.sort(key=lambda r: (r["architecture"], r.get("l0", 0.0)))
  for r in runs:
    if "log10_density" in r:
      report.density_histogram(r["log10_density"],
                               os.path.join(out_dir, f"density_{r['name']}.png"), r["name"])
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump([evaluation.public(r) for r in runs], f, indent=2)
  timing = f"training {t_train:.0f} s, evaluation {time.perf_counter() - t1:.0f} s"
  report.write_sweep_report(runs, out_dir, "Lambda sweep", f"Site `{site}`; {timing}.")
  print(f"== sweep done: {timing}; report in {out_dir}/report.md", flush=True)
  return runs
