"""Coefficient sweeps: each architecture's grid in one data pass, then evaluation and a report."""

from __future__ import annotations

import json
import os
import time

from gsae_jax import configs, plan, sharding
from gsae_jax.errors import ConfigError
from gsae_jax.eval import report
from gsae_jax.runs import evaluation, harvesting, target_l0, training
from gsae_jax.runs.target_l0 import Preempted  # launch.common catches it as sweep.Preempted


def coefficient_label(coefficients: dict) -> str:
  """'l1=2' or 'k=32, aux_k=0.0312': a run's coefficients as shown in reports."""
  return ", ".join(f"{k}={v:.3g}" for k, v in coefficients.items())


def grid_configs(c) -> list[tuple[str, object]]:
  """(architecture, its training config) for every non-empty grid, all validated before any
  trains: a bad value in the last grid must not cost the first grid's training."""
  out = []
  for arch, grid in c.grids.items():
    if not grid:
      continue
    tc = plan.grid_config(c, arch, grid)
    mesh = sharding.make_mesh(tc.mesh.data, tc.mesh.model)
    try:
      configs.validate(tc, dict(mesh.shape))
    except ValueError as e:
      raise ConfigError(f"grids.{arch}: {e}") from None
    out.append((arch, tc))
  return out


def targeted(c, out_dir: str, grids: list[tuple[str, object]]) -> list[tuple[str, object]]:
  """With `c.target_l0.targets`, each grid's values replaced by the coefficients the target-L0
  search found (one member per target; the configured grid is the search's first round)."""
  block = c.get("target_l0")
  if not block or not block.targets:
    return grids
  configs.validate_target_l0(block)
  out, found = [], {}
  for arch, tc in grids:
    s = target_l0.search(tc, block.targets, block.tolerance, block.search_steps, block.rounds,
                         block.measure_tokens, os.path.join(out_dir, "target_l0", arch),
                         c.get("eval", {}).get("shards_path") or None)
    tc = tc.copy_and_resolve_references()
    tc.sweep.grid = s.chosen
    out.append((arch, tc))
    found[arch] = s.to_json()
  os.makedirs(os.path.join(out_dir, "target_l0"), exist_ok=True)  # k alone trains no round
  with open(os.path.join(out_dir, "target_l0", "search.json"), "w") as f:
    json.dump(found, f, indent=2)
  return out


def train_grids(c, out_dir: str) -> tuple[list[dict], object]:
  """Trains every architecture's grid (values of its first coefficient, or of
  `c.grid_coefficients.<arch>`, or those found for `c.target_l0.targets`); returns (runs with
  spec and params, the last training source)."""
  runs, source = [], None
  for arch, tc in targeted(c, out_dir, grid_configs(c)):
    print(f"== training {arch} over {tc.sweep.coefficient or 'its first coefficient'} "
          f"{tuple(tc.sweep.grid)}", flush=True)
    result = training.run(tc, os.path.join(out_dir, arch))
    if result.stopped:
      raise Preempted(f"{arch} training stopped by {result.stopped}")
    spec, source = result.spec, result.source
    for i, params in enumerate(evaluation.members(result.state.params, spec)):
      coefficients = spec.member_coefficients()[i]
      runs.append({"name": f"{arch}_{i}", "architecture": arch, "member": i,
                   "coefficients": coefficients, "label": coefficient_label(coefficients),
                   "spec": spec.member(i), "params": params, "train_config": tc.to_dict()})
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
  described = training.source_description(c.train, source)
  evaluation.evaluate_runs(runs, source.scale, c.eval.shards_path or None, c.eval.max_tokens,
                           lm, token_batches, described.get("site"), source=described)
  runs.sort(key=lambda r: (r["architecture"], r.get("l0", 0.0)))
  for r in runs:
    if "log10_density" in r:
      report.density_histogram(r["log10_density"],
                               os.path.join(out_dir, f"density_{r['name']}.png"), r["name"])
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump([evaluation.public(r) for r in runs], f, indent=2)
  timing = f"training {t_train:.0f} s, evaluation {time.perf_counter() - t1:.0f} s"
  block = c.get("target_l0")
  report.write_sweep_report(runs, out_dir, "Coefficient sweep",
                            f"Site `{described.get('site')}`; {timing}.",
                            tuple(block.targets) if block else (),
                            tuple(block.ratio) if block and block.ratio else None,
                            block.tolerance if block else 0.0)
  print(f"== sweep done: {timing}; report in {out_dir}/report.md", flush=True)
  return runs
