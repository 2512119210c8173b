r"""SAELens' own training step on CPU torch, to set beside ours (benchmarks/train_step.py).

  python benchmarks/saelens_step.py --architecture=gated --d_in=640 --d_sae=10240 \
      --batch=4096 --l0=32

One step is what SAELens' SAETrainer does per batch, minus its bookkeeping, grad-norm clipping
and schedulers: `TrainingSAE.training_forward_pass` (the loss exactly as SAELens trains it), then
`loss.backward()`, a `torch.optim.Adam` step (lr 3e-4, betas (0.0, 0.999)) and `zero_grad`, on a
fixed random [batch, d_in] float32 batch, with torch using every CPU core. With --l0 the gate (or
encoder) bias is shifted by a constant so that about l0 features fire per token on that batch
(TopK: k = round(l0)), since a sparse step's cost can depend on its sparsity.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch
from sae_lens import registry as saelens_registry
from sae_lens.saes.sae import TrainCoefficientConfig, TrainingSAE, TrainStepInput

from gsae_jax.sae import registry


def training_classes(architecture: str):
  """(SAELens training SAE class, its config class) for our `architecture`, from its
  `SAELENS_TRAINING_ARCHITECTURE`."""
  name = registry.get(architecture).SAELENS_TRAINING_ARCHITECTURE
  if name not in saelens_registry.SAE_TRAINING_CLASS_REGISTRY:
    raise ValueError(f"SAELens has no training SAE for our {architecture!r} (found {name!r})")
  return saelens_registry.get_sae_training_class(name)


def _setup(architecture: str, d_in: int, d_sae: int, batch: int,
           l0: float | None) -> tuple[TrainingSAE, torch.Tensor]:
  """A fresh SAELens training SAE and a fixed random batch, calibrated to `l0` as ours is
  (benchmarks/train_step.py): our `SUPPORT_BIAS` (SAELens names it alike) shifted, or the
  integer coefficient (k) set."""
  cls = registry.get(architecture)
  sae_cls, cfg_cls = training_classes(architecture)
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  integer = [c.field for c in cls.COEFFICIENTS if c.integer]
  extra = {integer[0]: round(l0)} if integer and l0 is not None else {}
  sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, dtype="float32", device="cpu", **extra))
  x = torch.randn(batch, d_in, dtype=torch.float32)
  if l0 is not None and cls.SUPPORT_BIAS:
    bias = getattr(sae, cls.SUPPORT_BIAS)
    with torch.no_grad():
      pre = sae.process_sae_in(x) @ sae.W_enc + bias  # the gate's pre-activation
      if hasattr(sae, "threshold"):
        pre -= sae.threshold  # a JumpReLU fires above its threshold, not above 0
      flat = pre.flatten()
      k = min(max(flat.numel() - round(l0 * batch), 1), flat.numel())
      bias -= torch.kthvalue(flat, k).values  # the (1 - l0 / d_sae) quantile moves to 0
  return sae, x


def _step_input(sae: TrainingSAE, x: torch.Tensor) -> TrainStepInput:
  """What SAETrainer passes at its first step: final coefficients, no dead features."""
  coefficients = {name: c.value if isinstance(c, TrainCoefficientConfig) else c
                  for name, c in sae.get_coefficients().items()}
  return TrainStepInput(sae_in=x, coefficients=coefficients, n_training_steps=0,
                        dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
                        is_logging_step=False)


def measured_l0(sae: TrainingSAE, x: torch.Tensor) -> float:
  """Mean number of nonzero features per token of `sae` on `x`."""
  with torch.no_grad():
    return (sae.encode(x) != 0).sum(-1).float().mean().item()


def _timer(sae: TrainingSAE, x: torch.Tensor) -> Callable[[], float]:
  """A function running one training step of `sae` on `x` and returning its seconds."""
  sae.train()
  opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.0, 0.999))
  step_input = _step_input(sae, x)

  def one_step() -> float:
    t = time.perf_counter()
    sae.training_forward_pass(step_input).loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t

  one_step()  # warm up (allocations, Adam state)
  return one_step


def saelens_step_timer(architecture: str, d_in: int, d_sae: int, batch: int,
                       l0: float | None) -> Callable[[], float]:
  """A function timing one SAELens training step (seconds) on a fixed batch, warmed up."""
  return _timer(*_setup(architecture, d_in, d_sae, batch, l0))


def main() -> None:
  """Calibrate, then print the measured L0 and the best of --steps step times."""
  # argparse, not absl flags: importing this next to train_step.py must not redefine its flags.
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--architecture", default=registry.names()[0], choices=registry.names())
  p.add_argument("--d_in", type=int, default=640, help="Activation size n.")
  p.add_argument("--d_sae", type=int, default=10240, help="Dictionary size M.")
  p.add_argument("--batch", type=int, default=4096, help="Tokens per step.")
  p.add_argument("--l0", type=float, default=None, help="Target active features per token.")
  p.add_argument("--steps", type=int, default=3, help="Timed steps (the best one counts).")
  a = p.parse_args()
  sae, x = _setup(a.architecture, a.d_in, a.d_sae, a.batch, a.l0)
  print(f"{type(sae).__name__}, torch {torch.__version__} on {torch.get_num_threads()} threads: "
        f"L0 {measured_l0(sae, x):.1f} (target {a.l0})", flush=True)
  step_once = _timer(sae, x)
  best = min(step_once() for _ in range(a.steps))
  print(f"saelens {a.architecture} n={a.d_in} M={a.d_sae} batch={a.batch}: best step {best:.3f} s, "
        f"{a.batch / best:.0f} tokens/s")


if __name__ == "__main__":
  main()
