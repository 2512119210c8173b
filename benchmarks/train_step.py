r"""Train-step throughput versus the machine's measured dense fp32 matmul peak.

  python benchmarks/train_step.py --d_in=640 --d_sae=10240 --batch=4096
  python benchmarks/train_step.py --l0=32 --path=both --saelens   # dense vs sparse vs SAELens

FLOPs per token: each architecture declares its dense count (`FLOPS_PER_TOKEN_PER_NM` x n M;
14 n M for Gated: forward encoder, decoder, aux decoder, backward encoder dW, decoder dW and df,
aux decoder df, 2nM each; 10 n M for the baseline).
The peak is the best square fp32 matmul jitted on the same device; peak matmuls and train steps
are timed in interleaved rounds and the best of each counts (see main).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gsae_jax import host_memory  # noqa: E402

host_memory.keep_freed_memory()  # before JAX starts threads, as the launch/ entry points do

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import base  # noqa: E402
from gsae_jax import sharding  # noqa: E402
from gsae_jax.sae import registry  # noqa: E402
from gsae_jax.train import optim, paths  # noqa: E402
from gsae_jax.sae.spec import describe  # noqa: E402
from gsae_jax.train.state import create_train_state  # noqa: E402
from gsae_jax.train.step import compile_steps  # noqa: E402

_D_IN = flags.DEFINE_integer("d_in", 640, "Activation size n.")
_D_SAE = flags.DEFINE_integer("d_sae", 10240, "Dictionary size M.")
_BATCH = flags.DEFINE_integer("batch", 4096, "Tokens per step.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per round (the best one counts).")
_ARCH = flags.DEFINE_enum("architecture", registry.names()[0], registry.names(), "SAE architecture.")
_PEAK_SIZE = flags.DEFINE_integer("peak_size", 4096, "Square matmul size for the peak.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Interleaved rounds of (peak matmuls, train steps).")
_PATH = flags.DEFINE_enum("path", "dense", ["dense", "sparse", "auto", "both"],
                          "Train path; 'both' times dense and sparse interleaved.")
_L0 = flags.DEFINE_float("l0", None, "Set the state's L0 on the batch (support bias shifted, or "
                         "k for TopK-like SAEs); default: the initial state's.")
_CAPACITY = flags.DEFINE_integer("capacity", 0, "train.sparse_capacity (0: the default).")
_CHUNKS = flags.DEFINE_integer("batch_chunks", 0, "train.batch_chunks (0: auto, 1: none).")
_DTYPE = flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                           "train.compute_dtype; the peak matmul is timed in the same dtype.")
_SAELENS = flags.DEFINE_bool("saelens", False, "Also time SAELens' step (torch, CPU) interleaved.")
_KERNELS = flags.DEFINE_bool("cpu_row_kernels", True, "train.cpu_row_kernels for the sparse step.")
_XLA_GATHERS = flags.DEFINE_bool("compare_xla_gathers", False,
                                 "Also time the sparse step with XLA's gathers (no row kernels) "
                                 "interleaved, as 'sparse-xla'.")


def _best_seconds(fn, *args, repeats: int) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def matmul_peak_timer(size: int, dtype: str = "float32"):
  """A function returning the GFLOP/s of one jitted [size, size] @ [size, size] matmul."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  return lambda: 2 * size**3 / _best_seconds(matmul, a, b, repeats=1) / 1e9


def train_step_timer(architecture: str, d_in: int, d_sae: int, batch: int, path: str = "dense",
                     l0: float | None = None, kernels: bool = True):
  """A function timing one train step (seconds) on a fixed batch, compiled and warmed up, and
  the L0 that step measured."""
  c = base.get_config()
  c.sae.architecture, c.sae.d_sae, c.train.batch_size, c.train.steps = architecture, d_sae, batch, 1000
  c.train.path, c.train.sparse_capacity = path, _CAPACITY.value
  c.train.batch_chunks, c.train.compute_dtype = _CHUNKS.value, _DTYPE.value
  c.train.cpu_row_kernels = kernels
  cls = registry.get(architecture)
  integer = [coef for coef in cls.COEFFICIENTS if coef.integer]
  if l0 and integer:
    c.sae[architecture][integer[0].field] = int(round(l0))
  mesh = sharding.make_mesh(c.mesh.data, c.mesh.model)
  spec, rules = describe(c, d_in), tuple(map(tuple, c.mesh.rules))
  tx = optim.make_optimizer(c.optim, c.train.steps, spec.architecture.UNIT_NORM_DECODER)
  state, shardings = create_train_state(spec, mesh, rules, tx)
  choice = paths.choose(c.train, spec, mesh.shape["data"], mesh.size)
  step = compile_steps(spec, mesh, shardings, rules, tx, c.train.feature_window_tokens,
                       choice).train
  x = jax.device_put(jax.random.normal(jax.random.key(2), (batch, d_in)),
                     jax.sharding.NamedSharding(mesh, sharding.batch_spec()))
  if l0 and not integer:  # e.g. b_gate shifted: a trained SAE's sparsity on this batch
    params = paths.with_support_l0(spec, state.params, x, l0)
    state = state.replace(params=jax.device_put(params, shardings.params))
  holder = [state, {}]

  def one_step() -> float:
    t = time.perf_counter()
    holder[0], metrics = step(holder[0], x)
    jax.block_until_ready(metrics)
    holder[1] = metrics
    return time.perf_counter() - t

  one_step()  # compile and warm up
  return one_step, lambda: {k: float(holder[1][k]) for k in ("l0", "sparse_step")}


def main(argv):
  del argv
  n, m, batch, arch = _D_IN.value, _D_SAE.value, _BATCH.value, _ARCH.value
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  peak_once = matmul_peak_timer(_PEAK_SIZE.value, _DTYPE.value)
  path_names = ("dense", "sparse") if _PATH.value == "both" else (_PATH.value,)
  timers = {p: train_step_timer(arch, n, m, batch, p, _L0.value, _KERNELS.value)
            for p in path_names}
  if _XLA_GATHERS.value:
    timers["sparse-xla"] = train_step_timer(arch, n, m, batch, "sparse", _L0.value, False)
  if _SAELENS.value:
    from benchmarks.saelens_step import saelens_step_timer  # torch: only when asked
    timers["SAELens"] = (saelens_step_timer(arch, n, m, batch, _L0.value), lambda: {})
  # Interleaved, best of each: this shared machine's speed drifts by +-15% between seconds, so
  # all numbers are the machine at its best, measured over the same stretch of time.
  peak, best = 0.0, {p: float("inf") for p in timers}
  for r in range(_ROUNDS.value):
    peak = max(peak, *(peak_once() for _ in range(3)))
    for p, (step_once, _) in timers.items():
      best[p] = min(best[p], *(step_once() for _ in range(_STEPS.value)))
    print(f"round {r + 1}: peak so far {peak:.1f} GFLOP/s, best step "
          + ", ".join(f"{p} {t:.3f} s" for p, t in best.items()), flush=True)
  flops = registry.get(arch).FLOPS_PER_TOKEN_PER_NM * n * m
  for p, (_, stats) in timers.items():
    tps = batch / best[p]
    print(f"{p}: {tps:.0f} tokens/s, {flops * tps / 1e9:.1f} dense-equivalent GFLOP/s "
          f"({100 * flops * tps / 1e9 / peak:.1f}% of peak {peak:.1f} GFLOP/s) {stats()}")
  l0 = timers[path_names[-1]][1]()["l0"]
  line = f"{arch} {_DTYPE.value} n={n} M={m} batch={batch} l0={l0:.0f}: " + ", ".join(
      f"{p} {batch / t:.0f} tokens/s" for p, t in best.items())
  if len(path_names) == 2:
    line += f" ({best['dense'] / best['sparse']:.2f}x)"
  print(line)


if __name__ == "__main__":
  app.run(main)
