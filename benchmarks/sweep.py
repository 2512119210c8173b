r"""Cost of a sweep (one data pass) versus separate runs, per training step.

  python benchmarks/sweep.py --d_in=640 --d_sae=2048 --batch=1024 --members=3
  python benchmarks/sweep.py --d_sae=10240 --batch=4096 --path=sparse --l0=32

Times the jitted train step of a K-member sweep state, its members vmapped, run one after
another in one program, or held as separate states (`sweep.execution`), against one single-SAE
step on the same batch (best of --steps each, interleaved so that machine noise hits all alike). Data loading is not
included: a real sweep additionally saves K - 1 reads of every batch.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gsae_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # before JAX starts threads, as the launch/ entry points do

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import base  # noqa: E402
from gsae_jax import sharding  # noqa: E402
from gsae_jax.train import optim, paths  # noqa: E402
from gsae_jax.sae import registry  # noqa: E402
from gsae_jax.sae.spec import describe  # noqa: E402
from gsae_jax.train.state import create_train_state  # noqa: E402
from gsae_jax.train.step import compile_steps  # noqa: E402

_D_IN = flags.DEFINE_integer("d_in", 640, "Activation size n.")
_D_SAE = flags.DEFINE_integer("d_sae", 2048, "Dictionary size M.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Tokens per step.")
_MEMBERS = flags.DEFINE_integer("members", 3, "Lambdas in the grid.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per variant (the best one counts).")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                           "train.compute_dtype.")
_ARCH = flags.DEFINE_enum("architecture", registry.names()[0], registry.names(), "SAE architecture.")
_PATH = flags.DEFINE_enum("path", "dense", ["dense", "sparse"], "train.path.")
_L0 = flags.DEFINE_float("l0", None, "Each member's L0 on the batch (its support bias shifted, "
                         "as in train_step.py); default: the initial state's.")
EXECUTIONS = ("vmap", "sequential", "separate")


def _stepper(grid, x, execution="vmap"):
  c = base.get_config()
  c.sae.architecture, c.sae.d_sae, c.train.batch_size = _ARCH.value, _D_SAE.value, _BATCH.value
  c.train.compute_dtype, c.train.path, c.train.batch_chunks = _DTYPE.value, _PATH.value, 1
  single = describe(c, _D_IN.value)
  c.sweep.grid = grid  # over the architecture's first coefficient
  mesh = sharding.make_mesh(1, 1)
  spec, rules = describe(c, _D_IN.value), tuple(map(tuple, c.mesh.rules))
  tx = optim.make_optimizer(c.optim, c.train.steps, spec.architecture.UNIT_NORM_DECODER)
  state, shardings = create_train_state(spec, mesh, rules, tx)
  if _L0.value:
    shift = lambda p: paths.with_support_l0(single, p, x, _L0.value)
    params = jax.vmap(shift)(state.params) if grid else shift(state.params)
    state = state.replace(params=jax.device_put(params, shardings.params))
  compiled = compile_steps(spec, mesh, shardings, rules, tx, c.train.feature_window_tokens,
                           paths.choose(c.train, spec), execution)
  return [compiled.hold(state), compiled.train]


def _time(holder, x) -> float:
  t = time.perf_counter()
  holder[0], metrics = holder[1](holder[0], x)
  jax.block_until_ready(metrics)
  return time.perf_counter() - t


def main(argv):
  del argv
  k = _MEMBERS.value
  x = jax.random.normal(jax.random.key(0), (_BATCH.value, _D_IN.value))
  grid = tuple(float(2**i) for i in range(k))
  steppers = {e: _stepper(grid, x, e) for e in EXECUTIONS}
  steppers["single"] = _stepper((), x)
  best = {name: float("inf") for name in steppers}
  for holder in steppers.values():
    _time(holder, x)  # compile
  for _ in range(_STEPS.value):
    for name, holder in steppers.items():
      best[name] = min(best[name], _time(holder, x))
  print(f"{_ARCH.value} {_PATH.value} n={_D_IN.value} M={_D_SAE.value} batch={_BATCH.value}, "
        f"{k} members: "
        + ", ".join(f"{name} sweep {best[name]:.3f} s/step ({best[name] / best['single']:.2f}x "
                    f"one member's step)" for name in EXECUTIONS)
        + f"; {k} separate steps {k * best['single']:.3f} s")


if __name__ == "__main__":
  app.run(main)
