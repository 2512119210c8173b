"""Adam (b1=0, b2=0.999) with LR warm-up / optional decay, and the decoder
constraint wrapped around the optimiser (GATED_SAE.md section 2, "Optimiser")."""

from __future__ import annotations

import optax

from gsae_jax.sae.constraints import with_unit_norm_decoder


def piecewise_linear(value: float, total_steps: int, warmup_steps: int = 0,
                     decay_steps: int = 0) -> optax.Schedule:
  """0 -> value over warmup_steps, constant, then value -> 0 over the last decay_steps."""
  pieces, boundaries = [], []
  if warmup_steps > 0:
    pieces.append(optax.linear_schedule(0.0, value, warmup_steps))
    boundaries.append(warmup_steps)
  pieces.append(optax.constant_schedule(value))
  if decay_steps > 0:
    boundaries.append(max(total_steps - decay_steps, warmup_steps))
    pieces.append(optax.linear_schedule(value, 0.0, decay_steps))
  return optax.join_schedules(pieces, boundaries) if boundaries else pieces[0]


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
  decay_steps = int(round(optim_config.decay_fraction * total_steps))
  return piecewise_linear(optim_config.lr, total_steps, optim_config.warmup_steps, decay_steps)


def make_optimizer(optim_config, total_steps: int,
                   unit_norm_decoder: bool = True) -> optax.GradientTransformation:
  """Adam, inside the unit-norm decoder projection / renormalisation when the architecture
  constrains its decoder (`SAE.UNIT_NORM_DECODER`)."""
  adam = optax.adam(learning_rate_schedule(optim_config, total_steps), b1=optim_config.b1,
                    b2=optim_config.b2, eps=optim_config.eps)
  return with_unit_norm_decoder(adam) if unit_norm_decoder else adam
