"""Sweep reports: a markdown table, Pareto frontiers (L0 vs loss recovered, L0 vs FVU), gamma
per run and feature-density histograms, as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gsae_jax.eval import frontier  # noqa: E402
from gsae_jax.sae import registry  # noqa: E402

COLUMNS = (("architecture", "arch", "{}"), ("label", "coefficients", "{}"),
           ("l0", "L0", "{:.1f}"), ("fvu", "FVU", "{:.4f}"),
           ("relative_reconstruction_bias", "gamma", "{:.3f}"),
           ("ce_loss_score", "loss recovered", "{:.4f}"), ("delta_lm_loss", "delta LM loss", "{:.4f}"),
           ("dead_fraction", "dead", "{:.3f}"), ("dense_fraction", "dense", "{:.3f}"))


def colour(architecture: str) -> str:
  """A fixed colour per registered architecture (matplotlib's tab10, in registry order)."""
  names = registry.names()
  i = names.index(architecture) if architecture in names else len(names)
  return f"C{i % 10}"


def markdown_table(runs: Sequence[dict]) -> str:
  """One row per run; columns missing from a run are shown as '-'."""
  head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
  rule = "|" + "---|" * len(COLUMNS)
  rows = ["| " + " | ".join(fmt.format(r[key]) if r.get(key) is not None else "-"
                            for key, _, fmt in COLUMNS) + " |" for r in runs]
  return "\n".join([head, rule, *rows])


AT_TARGETS = (("ce_loss_score", "loss recovered"), ("fvu", "FVU"))


def target_l0_section(runs: Sequence[dict], targets: Sequence[float],
                      ratio: tuple[str, str] | None = None, tolerance: float = 0.0) -> str:
  """At each target L0, each architecture's loss recovered and FVU interpolated on its frontier
  (linear in log L0; '-' outside it); with `ratio` = (reference, baseline), the Gated paper's
  headline: the L0 the baseline needs to reach the reference's loss recovered there."""
  rows, needs = [], []
  for t in frontier.compare_at_targets(runs, targets, [k for k, _ in AT_TARGETS], ratio,
                                       tolerance=tolerance):
    for arch, values in t["architectures"].items():
      cells = ["-" if values[k] is None else f"{values[k]:.4f}" for k, _ in AT_TARGETS]
      rows.append(f"| {t['l0']:g} | {arch} | " + " | ".join(cells) + " |")
    needs.append(f"at L0 {t['l0']:g}: " + ("outside the frontiers" if t["baseline_l0"] is None
                 else f"{t['baseline_l0']:.1f} ({t['baseline_l0_ratio']:.2f}x)"))
  head = "| target L0 | arch | " + " | ".join(title for _, title in AT_TARGETS) + " |"
  text = "\n".join([head, "|" + "---|" * (2 + len(AT_TARGETS)), *rows])
  if ratio:
    text += (f"\n\nL0 {ratio[1]} needs to reach {ratio[0]}'s loss recovered (and its ratio to "
             f"the target): {'; '.join(needs)}.")
  return text


def _by_arch(runs):
  archs = sorted({r["architecture"] for r in runs})
  return {a: sorted((r for r in runs if r["architecture"] == a), key=lambda r: r["l0"]) for a in archs}


def pareto_plot(runs: Sequence[dict], y: str, ylabel: str, path: str, log_x: bool = True) -> None:
  """L0 (x) against metric `y`, one line per architecture."""
  fig, ax = plt.subplots(figsize=(5, 4))
  for arch, rs in _by_arch(runs).items():
    pts = [(r["l0"], r[y]) for r in rs if r.get(y) is not None]
    if pts:
      xs, ys = zip(*pts)
      ax.plot(xs, ys, "o-", label=arch, color=colour(arch))
  if log_x:
    ax.set_xscale("log")
  ax.set_xlabel("L0 (active features per token)")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def density_histogram(log10_density: np.ndarray, path: str, title: str) -> None:
  """Histogram of log10 feature firing frequency; dead features are counted in the title."""
  finite = log10_density[np.isfinite(log10_density)]
  dead = int(np.sum(~np.isfinite(log10_density)))
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.hist(finite, bins=50, color="tab:gray")
  ax.set_xlabel("log10 feature density")
  ax.set_ylabel("features")
  ax.set_title(f"{title} ({dead} dead of {log10_density.size})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_sweep_report(runs: Sequence[dict], out_dir: str, title: str,
                       preface: str = "", targets: Sequence[float] = (),
                       ratio: tuple[str, str] | None = None, tolerance: float = 0.0) -> list[str]:
  """report.md + pareto PNGs in `out_dir` (with `targets`, a section at those L0s: see
  `target_l0_section`); returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  plots = [("ce_loss_score", "loss recovered", "pareto_l0_loss_recovered.png"),
           ("fvu", "FVU", "pareto_l0_fvu.png"),
           ("relative_reconstruction_bias", "gamma (relative reconstruction bias)", "gamma.png")]
  for key, label, name in plots:
    if any(r.get(key) is not None for r in runs):
      pareto_plot(runs, key, label, os.path.join(out_dir, name))
      paths.append(os.path.join(out_dir, name))
  images = "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in paths)
  at_targets = (f"## At target L0s\n\n{target_l0_section(runs, targets, ratio, tolerance)}\n\n"
                if targets and any(r.get("l0") for r in runs) else "")
  report = (f"# {title}\n\n{preface}\n\n{at_targets}## Runs\n\n{markdown_table(runs)}\n\n"
            f"## Plots\n\n{images}\n")
  path = os.path.join(out_dir, "report.md")
  with open(path, "w") as f:
    f.write(report)
  return [path, *paths]
