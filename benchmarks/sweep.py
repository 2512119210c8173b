r"""Cost of a vmapped lambda sweep (one data pass) versus separate runs, per training step.

  python benchmarks/sweep.py --d_in=640 --d_sae=2048 --batch=1024 --members=3

Times the jitted train step of a K-member sweep state against K single-SAE steps on the same
batch (best of --steps each, interleaved so that machine noise hits both alike). Data loading is
not included: a real sweep additionally saves K - 1 reads of every batch.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import base  # noqa: E402
from gsae_jax import sharding  # noqa: E402
from gsae_jax.train import optim  # noqa: E402
from gsae_jax.sae import registry  # noqa: E402
from gsae_jax.sae.spec import describe  # noqa: E402
from gsae_jax.train.state import create_train_state  # noqa: E402
from gsae_jax.train.step import compile_steps  # noqa: E402

_D_IN = flags.DEFINE_integer("d_in", 640, "Activation size n.")
_D_SAE = flags.DEFINE_integer("d_sae", 2048, "Dictionary size M.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Tokens per step.")
_MEMBERS = flags.DEFINE_integer("members", 3, "Lambdas in the grid.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (the best one counts).")
_ARCH = flags.DEFINE_enum("architecture", registry.names()[0], registry.names(), "SAE architecture.")


def _stepper(grid):
  c = base.get_config()
  c.sae.architecture, c.sae.d_sae, c.train.batch_size = _ARCH.value, _D_SAE.value, _BATCH.value
  c.sweep.grid = grid  # over the architecture's first coefficient
  mesh = sharding.make_mesh(1, 1)
  spec, rules = describe(c, _D_IN.value), tuple(map(tuple, c.mesh.rules))
  tx = optim.make_optimizer(c.optim, c.train.steps, spec.architecture.UNIT_NORM_DECODER)
  state, shardings = create_train_state(spec, mesh, rules, tx)
  step, _ = compile_steps(spec, mesh, shardings, rules, tx, c.train.feature_window_tokens)
  return [state, step]


def _time(holder, x) -> float:
  t = time.perf_counter()
  holder[0], metrics = holder[1](holder[0], x)
  jax.block_until_ready(metrics)
  return time.perf_counter() - t


def main(argv):
  del argv
  k = _MEMBERS.value
  x = jax.random.normal(jax.random.key(0), (_BATCH.value, _D_IN.value))
  sweep = _stepper(tuple(float(2**i) for i in range(k)))
  single = _stepper(())
  _time(sweep, x), _time(single, x)  # compile
  best_sweep = best_single = float("inf")
  for _ in range(_STEPS.value):
    best_sweep = min(best_sweep, _time(sweep, x))
    best_single = min(best_single, _time(single, x))
  print(f"{_ARCH.value} n={_D_IN.value} M={_D_SAE.value} batch={_BATCH.value}: sweep of {k} "
        f"{best_sweep:.3f} s/step, {k} separate steps {k * best_single:.3f} s: "
        f"{k * best_single / best_sweep:.2f}x")


if __name__ == "__main__":
  app.run(main)
