"""Comparing SAE architectures at equal L0: each architecture's sweep is a frontier of
(L0, metric) points, interpolated linearly in log L0 (the Gated paper's plots use a log L0 axis).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def interpolate_at_l0(points: Sequence[tuple[float, float]], l0: float,
                      tolerance: float = 0.0) -> float | None:
  """The metric at `l0` on the piecewise-linear curve through (L0, metric) points, in log L0.

  None when `l0` lies outside the points' L0 range (no extrapolation) or no point is usable.
  With `tolerance`, an `l0` within that relative distance beyond an end takes the end's value:
  a target-L0 search promises its runs only within tolerance of each target, so a frontier whose
  top run landed at 30.1 for target 32 still answers at 32.
  """
  pts = sorted((a, b) for a, b in points if a > 0 and b is not None and np.isfinite(b))
  if pts and pts[-1][0] < l0 <= pts[-1][0] * (1 + tolerance):
    l0 = pts[-1][0]
  if pts and pts[0][0] * (1 - tolerance) <= l0 < pts[0][0]:
    l0 = pts[0][0]
  if not pts or not pts[0][0] <= l0 <= pts[-1][0]:
    return None
  xs = np.log([a for a, _ in pts])
  return float(np.interp(math.log(l0), xs, [b for _, b in pts]))


def shared_l0(frontiers: Iterable[Sequence[float]]) -> float | None:
  """The L0 at which to compare architectures: the geometric middle of the L0 range every
  frontier covers; None when their ranges do not overlap."""
  ranges = [(min(ls), max(ls)) for ls in frontiers if ls]
  if not ranges:
    return None
  low, high = max(r[0] for r in ranges), min(r[1] for r in ranges)
  if low <= 0 or low > high:
    return None
  return math.sqrt(low * high)


def compare_at_equal_l0(runs: Sequence[dict], keys: Sequence[str]) -> dict:
  """{'l0': shared L0 or None, 'anchor_l0': the L0 runs are picked nearest to,
  'architectures': {arch: {'nearest': run, key: value, ...}}}.

  For each architecture: the metrics `keys` interpolated at the shared L0 (None outside its
  frontier), and its run nearest in log L0 (the one to export). Without an overlap, each
  architecture's nearest run to the geometric mean of all L0s is still given.
  """
  by_arch: dict[str, list[dict]] = {}
  for r in runs:
    if r.get("l0", 0) > 0:
      by_arch.setdefault(r["architecture"], []).append(r)
  if not by_arch:
    raise ValueError("no SAE of the sweep fired on the held-out data: nothing to compare")
  target = shared_l0([[r["l0"] for r in rs] for rs in by_arch.values()])
  anchor = target or math.exp(np.mean([math.log(r["l0"]) for rs in by_arch.values() for r in rs]))
  out = {}
  for arch, rs in by_arch.items():
    entry = {"nearest": min(rs, key=lambda r: abs(math.log(r["l0"] / anchor)))}
    for key in keys:
      entry[key] = (interpolate_at_l0([(r["l0"], r.get(key)) for r in rs], target)
                    if target else None)
    out[arch] = entry
  return {"l0": target, "anchor_l0": anchor, "architectures": out}


def l0_for_metric(points: Sequence[tuple[float, float]], value: float) -> float | None:
  """The smallest L0 at which the piecewise-linear curve (in log L0) through (L0, metric) points
  reaches `value`: the frontier inverted. None when no segment reaches it (no extrapolation)."""
  pts = sorted((a, b) for a, b in points if a > 0 and b is not None and np.isfinite(b))
  if len(pts) == 1:
    return pts[0][0] if pts[0][1] == value else None
  for (l0_a, m_a), (l0_b, m_b) in zip(pts, pts[1:]):
    if min(m_a, m_b) <= value <= max(m_a, m_b):
      if m_a == m_b:
        return l0_a
      t = (value - m_a) / (m_b - m_a)
      return math.exp(math.log(l0_a) + t * (math.log(l0_b) - math.log(l0_a)))
  return None


def compare_at_targets(runs: Sequence[dict], targets: Sequence[float], keys: Sequence[str],
                       ratio: tuple[str, str] | None = None,
                       ratio_key: str = "ce_loss_score", tolerance: float = 0.0) -> list[dict]:
  """At each target L0: {'l0': target, 'architectures': {arch: {key: value or None}},
  'baseline_l0': ..., 'baseline_l0_ratio': ...}.

  Each architecture's `keys` are interpolated on its frontier in log L0 (None outside it, beyond
  `tolerance`: see `interpolate_at_l0`). `ratio` = (reference, baseline) gives the Gated paper's headline ratio: the L0 at which the
  baseline's frontier reaches the reference's `ratio_key` at the target, and that L0 over the
  target; None when either is unknown (outside a frontier, or no such architectures).
  """
  reference, baseline = ratio or (None, None)
  by_arch: dict[str, list[dict]] = {}
  for r in runs:
    if r.get("l0", 0) > 0:
      by_arch.setdefault(r["architecture"], []).append(r)
  curve = lambda arch, key: [(r["l0"], r.get(key)) for r in by_arch.get(arch, ())]
  out = []
  for target in targets:
    values = {arch: {key: interpolate_at_l0(curve(arch, key), target, tolerance) for key in keys}
              for arch in by_arch}
    reached = interpolate_at_l0(curve(reference, ratio_key), target, tolerance)
    needed = l0_for_metric(curve(baseline, ratio_key), reached) if reached is not None else None
    out.append({"l0": target, "architectures": values, "baseline_l0": needed,
                "baseline_l0_ratio": needed / target if needed else None})
  return out


def next_coefficients(points: Sequence[tuple[float, float]], targets: Sequence[float],
                      max_step: float = 8.0) -> list[float]:
  """One search step for coefficients whose L0 falls as they grow (L1, L0 penalties): from
  measured (coefficient, L0) points, the coefficient expected to give each target L0.

  log L0 is taken piecewise-linear in log coefficient (secant on the bracketing pair of
  neighbours). A target outside the measured L0s is extrapolated along the end segment's slope,
  at most a factor `max_step` past the end point; a flat or rising end segment (noise, or every
  feature dead) steps by that factor in the direction that lowers or raises L0.
  """
  pts = sorted((c, l0) for c, l0 in points if c > 0)
  if not pts:
    raise ValueError("next_coefficients: no measured point with a coefficient > 0")
  logs = [(math.log(c), math.log(max(l0, 1e-3))) for c, l0 in pts]  # a dead SAE: L0 ~ 0
  out = []
  for target in targets:
    y = math.log(target)
    bracket = [(a, b) for a, b in zip(logs, logs[1:]) if min(a[1], b[1]) <= y <= max(a[1], b[1])]
    if bracket:
      (xa, ya), (xb, yb) = min(bracket, key=lambda ab: ab[1][0] - ab[0][0])
      out.append(math.exp(xa if ya == yb else xa + (y - ya) * (xb - xa) / (yb - ya)))
      continue
    # No bracket: a target above the L0s lies below the smallest coefficient, one below them
    # past the largest; extrapolate along that end's segment.
    low = y > logs[0][1]
    end, other = (logs[0], logs[1 % len(logs)]) if low else (logs[-1], logs[-2 % len(logs)])
    slope = (end[1] - other[1]) / (end[0] - other[0]) if end[0] != other[0] else 0.0
    step = (y - end[1]) / slope if slope < 0 else (-math.inf if low else math.inf)
    out.append(math.exp(end[0] + max(-math.log(max_step), min(math.log(max_step), step))))
  return out
