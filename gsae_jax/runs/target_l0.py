"""Target-L0 search: the coefficient at which an architecture's SAE has each target L0, found by
sweeps (the configured grid in one data pass, then one member per unmet target, secant steps in
log coefficient vs log L0), so that a sweep can then train every architecture at equal L0s.
Rounds run the full schedule by default: a compressed short schedule ends at other L0s.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from gsae_jax.eval import evaluate, frontier
from gsae_jax.runs import evaluation, training
from gsae_jax.sae import registry


class Preempted(Exception):
  """A training run stopped on a signal; re-running the same command resumes it. (Defined here,
  under the sweep that re-exports it, because the search is the first training a sweep runs.)"""


@dataclasses.dataclass(frozen=True)
class Search:
  """The coefficient chosen for each target, every (coefficient, L0) point measured, one tuple
  per round, and whether each target's chosen coefficient measured within
  tolerance (an integer coefficient such as k is the L0 itself: no runs, always met)."""
  coefficient: str
  targets: tuple[float, ...]
  chosen: tuple[float, ...]
  rounds: tuple[tuple[tuple[float, float], ...], ...]
  met: tuple[bool, ...]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def short_config(tc, steps: int):
  """`tc` with its schedule compressed to `steps`: the optimiser's and every coefficient's
  warm-up scaled alike, so a short run's end state resembles the full run's (a 1000-step
  warm-up left as is in a 300-step run would never reach the coefficient)."""
  c = tc.copy_and_resolve_references()
  frac = steps / tc.train.steps
  scale = lambda n: int(round(n * frac))
  c.train.steps = steps
  c.checkpoint.save_every = steps  # only the final state is needed (and makes re-runs resume)
  c.optim.warmup_steps = scale(tc.optim.warmup_steps)
  block = c.sae[c.sae.architecture]
  for coef in registry.get(c.sae.architecture).COEFFICIENTS:
    if coef.warmup_field:
      block[coef.warmup_field] = scale(block[coef.warmup_field])
  if tc.train.resample_every:
    c.train.resample_every = max(1, scale(tc.train.resample_every))
    c.train.resample_until = scale(tc.train.resample_until)
  return c


def measured_l0s(result: training.TrainingRun, tokens: int,
                 heldout: str | None = None) -> list[float]:
  """Each member's L0 on `tokens` activations: of the `heldout` shard folder, or else the next
  ones of the run's stream (fresh synthetic draws; the shuffle's next shard rows)."""
  if heldout:
    batches = list(evaluation.heldout_activation_batches(heldout, result.source.scale, tokens))
  else:
    batches = [next(result.source.batches)]
    batches += [next(result.source.batches)
                for _ in range(math.ceil(tokens / batches[0].shape[0]) - 1)]
  spec = result.spec
  return [evaluate.activation_metrics(spec.member(i).graphdef, params, batches)[0]["l0"]
          for i, params in enumerate(evaluation.members(result.state.params, spec))]


def search(tc, targets, tolerance: float, steps: int, rounds: int, tokens: int,
           workdir: str, heldout: str | None = None) -> Search:
  """Chooses `tc`'s swept coefficient for each target L0 (`tc`: a validated sweep config, its
  grid the first round's coefficients). Every round is a `steps`-step sweep (0: the full
  `tc.train.steps`) in `workdir/round_<r>`, so a re-run resumes finished rounds; it stops when
  every target has a measured L0 within `tolerance` (relative), or after `rounds` refinements,
  keeping then the secant estimate from every point. L0s are measured on `tokens` activations
  (`measured_l0s`, of the `heldout` shards if given). Writes `workdir/search.json`."""
  arch = registry.get(tc.sae.architecture)
  name = tc.sweep.coefficient or arch.COEFFICIENTS[0].name
  targets = tuple(float(t) for t in targets)
  if arch.coefficient(name).integer:  # k is the L0 (TopK exactly, BatchTopK on average)
    chosen = tuple(float(round(t)) for t in targets)
    return Search(name, targets, chosen, (), (True,) * len(targets))
  short = short_config(tc, steps if 0 < steps < tc.train.steps else tc.train.steps)
  grid, points, history = tuple(tc.sweep.grid), [], []
  for r in range(rounds + 1):
    short.sweep.grid = grid
    print(f"== target L0 search {arch.NAME} round {r}: {name} {tuple(f'{g:.4g}' for g in grid)}",
          flush=True)
    result = training.run(short, os.path.join(workdir, f"round_{r}"))
    if result.stopped:
      raise Preempted(f"{arch.NAME} target-L0 search stopped by {result.stopped}")
    measured = tuple(zip(grid, measured_l0s(result, tokens, heldout)))
    print("   L0s: " + ", ".join(f"{c:.4g} -> {l0:.3g}" for c, l0 in measured), flush=True)
    points += measured
    history.append(measured)
    unmet = [t for t in targets if _closest(points, t, tolerance) is None]
    if not unmet or r == rounds:
      break
    grid = tuple(sorted(set(frontier.next_coefficients(points, unmet))))  # two targets past
    # the same end both take its largest step: one member measures it
  chosen = [_closest(points, t, tolerance) for t in targets]
  met = tuple(c is not None for c in chosen)
  chosen = tuple(c if c is not None else frontier.next_coefficients(points, [t])[0]
                 for c, t in zip(chosen, targets))
  out = Search(name, targets, chosen, tuple(history), met)
  with open(os.path.join(workdir, "search.json"), "w") as f:
    json.dump(out.to_json(), f, indent=2)
  return out


def _closest(points, target: float, tolerance: float) -> float | None:
  """The measured coefficient whose L0 is nearest `target` (in ratio) if within tolerance."""
  near = [(abs(math.log(l0 / target)), c) for c, l0 in points
          if l0 > 0 and abs(l0 / target - 1) <= tolerance]
  return min(near)[1] if near else None
