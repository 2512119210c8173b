"""The main job: harvest -> sweep (train + evaluate) -> equal-L0 comparison -> export -> report."""

from __future__ import annotations

import json
import os
import time

from gsae_jax import export
from gsae_jax.eval import frontier, report
from gsae_jax.runs import evaluation, features, harvesting, sweep


COMPARED = ("ce_loss_score", "fvu", "relative_reconstruction_bias", "delta_lm_loss")


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

  matched = frontier.compare_at_equal_l0(runs, COMPARED)
  source = json.load(open(os.path.join(out, "sweep", runs[0]["architecture"], "source.json")))
  exported = {}
  for arch, entry in matched["architectures"].items():
    r = entry["nearest"]
    folder = os.path.join(out, "export", arch)
    meta = {**source, "coefficients": r["coefficients"], "config": r["train_config"]}
    export.save_npz(os.path.join(folder, "sae.npz"), r["params"], r["spec"], meta)
    if r["spec"].architecture.SAELENS_ARCHITECTURE:
      export.save_saelens(os.path.join(folder, "saelens"), r["params"], r["spec"],
                          scale=source["normalisation_scale"], metadata={
                              "model_name": source["model_id"],
                              "hook_name": export.saelens_hook_name(source["site"]),
                              "context_size": source["context_length"], "prepend_bos": True})
    report.density_histogram(r["log10_density"], os.path.join(out, f"density_{arch}.png"),
                             f"{arch} ({r['label']})")
    exported[arch] = folder
  t = _stage("export", t, timings)
  browsers = {}
  for arch in c.get("feature_browsers", ()):  # each one's matched SAE, browsable
    if arch not in matched["architectures"]:
      continue
    r = matched["architectures"][arch]["nearest"]
    index = features.write_browser(
        os.path.join(out, "features", arch), r["params"], r["spec"],
        source["normalisation_scale"], held_h.output_dir, lm_tok[0], lm_tok[1],
        title=f"{arch} ({r['label']}) on {source['model_id']} {source['site']}", site=source["site"])
    browsers[arch] = os.path.relpath(index, out)
  if browsers:
    t = _stage("feature browser", t, timings)
  timings["total"] = time.perf_counter() - t_start

  summary = {**{arch: evaluation.public(e["nearest"])
                for arch, e in matched["architectures"].items()},
             "matched": {"l0": matched["l0"], "anchor_l0": matched["anchor_l0"], "interpolated": {
                 arch: {k: e[k] for k in COMPARED} for arch, e in matched["architectures"].items()}},
             "exported": exported, "feature_browsers": browsers,
             "at_targets": frontier.compare_at_targets(
                 runs, tuple(s.target_l0.targets), COMPARED, tuple(s.target_l0.ratio) or None,
                 tolerance=s.target_l0.tolerance),
             "timings_s": timings, "train_tokens": manifest["token_count"],
             "heldout_tokens": held_manifest["token_count"], "site": manifest["site"],
             "model": manifest["model_id"], "train_steps": s.train.train.steps}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  targets = (report.target_l0_section(runs, tuple(s.target_l0.targets),
                                      tuple(s.target_l0.ratio) or None, s.target_l0.tolerance)
             if s.target_l0.targets else "")
  _write_report(out, summary, runs, targets)
  print(f"== done in {timings['total']:.0f} s; report: {out}/report.md", flush=True)
  return summary


def _write_report(out: str, summary: dict, runs: list[dict], at_targets: str) -> None:
  archs = list(summary["exported"])
  nearest = [summary[a] for a in archs]
  times = ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items())
  matched = summary["matched"]
  if matched["l0"]:
    rows = "\n".join(
        f"| {a} | " + " | ".join("-" if matched["interpolated"][a][k] is None
                                 else f"{matched['interpolated'][a][k]:.4f}" for k in COMPARED)
        + " |" for a in archs)
    at_l0 = (f"Each architecture's frontier interpolated (linear in log L0) at L0 "
             f"{matched['l0']:.1f}, the middle of the L0 range all of them cover:\n\n"
             f"| arch | {' | '.join(COMPARED)} |\n|{'---|' * (len(COMPARED) + 1)}\n{rows}")
  else:
    at_l0 = "The architectures' L0 ranges do not overlap: widen the grids to compare at equal L0."
  densities = " ".join(f"![density {a}](density_{a}.png)" for a in archs)
  browsers = "".join(f"\nFeature browser of the {a} SAE above (held-out activations, opens from "
                     f"disk): [{path}]({path})\n" for a, path in summary["feature_browsers"].items())
  text = f"""# {', '.join(archs)} SAEs on {summary['model']} `{summary['site']}`

Trained on {summary['train_tokens']:,} activations ({summary['train_steps']} steps), evaluated on
{summary['heldout_tokens']:,} held-out activations and on held-out text (loss recovered, BOS
excluded). Timings: {times}.

## At equal L0

{at_targets and "Each architecture trained at the coefficients the target-L0 search found "
 "(`sweep/target_l0/search.json`), its frontier interpolated in log L0 at each target:"}

{at_targets}

{at_l0}

Each architecture's run nearest that L0 (exported):

{report.markdown_table(nearest)}

{densities}

## All runs (sweep)

{report.markdown_table(runs)}

![L0 vs loss recovered](sweep/pareto_l0_loss_recovered.png)
![L0 vs FVU](sweep/pareto_l0_fvu.png)
![gamma](sweep/gamma.png)

Exports: {', '.join(f'`{v}`' for v in summary['exported'].values())} (`sae.npz` + `sae.json`, and
`saelens/` with the normalisation folded in, where SAELens has the architecture).
{browsers}
"""
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(text)
