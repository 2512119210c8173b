"""The main job: harvest -> sweep (train + evaluate) -> matched pair -> export -> report."""

from __future__ import annotations

import json
import math
import os
import time

from gsae_jax import export
from gsae_jax.eval import report
from gsae_jax.runs import evaluation, harvesting, sweep


def matched_pair(runs: list[dict]) -> tuple[dict, dict]:
  """The (gated, baseline) runs whose L0 are closest (in log ratio)."""
  gated = [r for r in runs if r["architecture"] == "gated" and r.get("l0", 0) > 0]
  base = [r for r in runs if r["architecture"] == "baseline" and r.get("l0", 0) > 0]
  if not gated or not base:
    raise ValueError("the sweep produced no firing Gated or baseline SAE to compare")
  return min(((g, b) for g in gated for b in base),
             key=lambda p: abs(math.log(p[0]["l0"] / p[1]["l0"])))


def _stage(name: str, t0: float, timings: dict) -> float:
  now = time.perf_counter()
  timings[name] = now - t0
  print(f"== {name}: {timings[name]:.0f} s", flush=True)
  return now


def run_main(c, out: str) -> dict:
  """Runs every stage; returns the summary written to `<out>/summary.json`."""
  timings: dict[str, float] = {}
  t = t_start = time.perf_counter()
  lm_tok = harvesting.load_lm(c.harvest)
  t = _stage("load LM", t, timings)

  train_h = c.harvest.copy_and_resolve_references()
  train_h.output_dir, train_h.num_tokens = os.path.join(out, "shards", "train"), c.train_tokens
  manifest = harvesting.run(train_h, lm_and_tokenizer=lm_tok)
  held_h = train_h.copy_and_resolve_references()
  held_h.output_dir, held_h.num_tokens = os.path.join(out, "shards", "heldout"), c.heldout_tokens
  held_h.skip_windows = manifest["num_windows"]  # text the training shards never saw
  held_manifest = harvesting.run(held_h, lm_and_tokenizer=lm_tok)
  t = _stage("harvest", t, timings)

  s = c.sweep.copy_and_resolve_references()
  s.train.data.path, s.eval.shards_path = train_h.output_dir, held_h.output_dir
  s.train.data.d_in = manifest["d_model"]
  s.train.train.steps = max(1, c.epochs * manifest["token_count"] // s.train.train.batch_size)
  s.eval.text = held_h.copy_and_resolve_references()  # loss recovered on the held-out windows
  runs = sweep.run_sweep(s, os.path.join(out, "sweep"), lm_tok)
  t = _stage("train + evaluate", t, timings)

  gated, baseline = matched_pair(runs)
  source = json.load(open(os.path.join(out, "sweep", "gated", "source.json")))
  exported = {}
  for r in (gated, baseline):
    folder = os.path.join(out, "export", r["architecture"])
    meta = {**source, "architecture": r["architecture"], "l1_coefficient": r["l1_coefficient"],
            "config": s.train.to_dict()}
    export.save_npz(os.path.join(folder, "sae.npz"), r["params"], meta)
    export.save_saelens(os.path.join(folder, "saelens"), r["params"],
                        scale=source["normalisation_scale"], metadata={
                            "model_name": source["model_id"],
                            "hook_name": export.saelens_hook_name(source["site"]),
                            "context_size": source["context_length"], "prepend_bos": True})
    report.density_histogram(r["log10_density"], os.path.join(out, f"density_{r['architecture']}.png"),
                             f"{r['architecture']} (lambda {r['l1_coefficient']:g})")
    exported[r["architecture"]] = folder
  t = _stage("export", t, timings)
  timings["total"] = time.perf_counter() - t_start

  summary = {"gated": evaluation.public(gated),
             "baseline": evaluation.public(baseline), "exported": exported,
             "timings_s": timings, "train_tokens": manifest["token_count"],
             "heldout_tokens": held_manifest["token_count"], "site": manifest["site"],
             "model": manifest["model_id"], "train_steps": s.train.train.steps}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  _write_report(out, summary, runs)
  print(f"== done in {timings['total']:.0f} s; report: {out}/report.md", flush=True)
  return summary


def _write_report(out: str, summary: dict, runs: list[dict]) -> None:
  g, b = summary["gated"], summary["baseline"]
  times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
  text = f"""# Gated vs baseline SAE on {summary['model']} `{summary['site']}`

Trained on {summary['train_tokens']:,} activations ({summary['train_steps']} steps), evaluated on
{summary['heldout_tokens']:,} held-out activations and on held-out text (loss recovered, BOS
excluded). Timings: {times}.

## Matched pair (closest L0)

{report.markdown_table([g, b])}

Gated: L0 {g['l0']:.1f}, gamma {g['relative_reconstruction_bias']:.3f}, loss recovered
{g['ce_loss_score']:.3f}. Baseline: L0 {b['l0']:.1f}, gamma {b['relative_reconstruction_bias']:.3f},
loss recovered {b['ce_loss_score']:.3f}.

![density gated](density_gated.png) ![density baseline](density_baseline.png)

## All runs (sweep)

{report.markdown_table(runs)}

![L0 vs loss recovered](sweep/pareto_l0_loss_recovered.png)
![L0 vs FVU](sweep/pareto_l0_fvu.png)
![gamma](sweep/gamma.png)

Exports: {', '.join(f'`{v}`' for v in summary['exported'].values())} (`sae.npz` + `sae.json`, and
`saelens/` with the normalisation folded in).
"""
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(text)
