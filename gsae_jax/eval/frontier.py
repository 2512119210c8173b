"""Comparing SAE architectures at equal L0: each architecture's sweep is a frontier of
(L0, metric) points, interpolated linearly in log L0 (the Gated paper's plots use a log L0 axis).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np


def interpolate_at_l0(points: Sequence[tuple[float, float]], l0: float) -> float | None:
  """The metric at `l0` on the piecewise-linear curve through (L0, metric) points, in log L0.

  None when `l0` lies outside the points' L0 range (no extrapolation) or no point is usable.
  """
  pts = sorted((a, b) for a, b in points if a > 0 and b is not None and np.isfinite(b))
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
