"""CPU row kernels for the sparse train step: C++ (`rows.cc`) called through the XLA FFI.

XLA:CPU runs a per-token gather of K table rows followed by a product (and the transposed
scatter-add) at about 1.5 dense matmuls each (BUILD_NOTES, "Where the time goes"): it writes the
[batch, K, n] rows to memory and reads them back. These kernels read (or accumulate) each row
once, in cache: 10-20x faster at batch 4096, K 96, n 640, M 10240. They replace the sparse
step's gathers on CPU when `train.cpu_row_kernels` is on and the mesh has one device
(`available`); the values are the same up to float summation order.

The library is compiled on first use with the system's C++ compiler (`$CXX`, default g++) into
`$GSAE_JAX_CACHE` (default ~/.cache/gsae_jax)/kernels, keyed by the source, the compiler
command, the JAX headers and the CPU; without a compiler the sparse step keeps XLA's gathers
(a warning says why).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import logging

SOURCE = Path(__file__).with_name("rows.cc")
TARGETS = {"bag": "GsaeRowsBag", "dot": "GsaeRowsDot", "scatter": "GsaeRowsScatter",
           "positive_slots": "GsaePositiveSlots"}
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cpu_model() -> str:
  try:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  return "\n".join(sorted({l for l in lines if l.startswith(("model name", "flags"))}))


def build(cache_dir: Path | None = None) -> Path:
  """The compiled library's path, compiling it if the cache has no build for this source,
  compiler, JAX and CPU. Raises OSError (compiler missing) or RuntimeError (compile failed)."""
  cache_dir = Path(cache_dir or os.environ.get("GSAE_JAX_CACHE", "~/.cache/gsae_jax")).expanduser()
  compiler = os.environ.get("CXX", "g++")
  command = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir()]
  key = hashlib.sha256("\0".join([SOURCE.read_text(), *command, jax.__version__,
                                  platform.machine(), _cpu_model()]).encode()).hexdigest()[:16]
  path = cache_dir / "kernels" / f"rows-{key}.so"
  if path.exists():
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
    out = Path(tmp) / path.name
    proc = subprocess.run([*command, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f"{compiler} {SOURCE} failed:\n{proc.stderr[-2000:]}")
    os.replace(out, path)  # atomic: concurrent builders leave one complete file
  return path


@functools.cache
def _load() -> bool:
  """Builds and registers the FFI targets once; False (with a warning) if that fails."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(build()))
  except (OSError, RuntimeError) as e:
    logging.warning("CPU row kernels unavailable (the sparse step uses XLA's gathers): %s", e)
    return False
  for name, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(f"gsae_{name}", jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform="cpu")
  return True


def available() -> bool:
  """Whether the kernels can run here: the default backend is CPU and the library loads."""
  return jax.default_backend() == "cpu" and _load()


def _call(name: str, out, *args):
  if not _load():
    raise RuntimeError("the CPU row kernels could not be built (see the warning above); use "
                       "train.cpu_row_kernels=False")
  return jax.ffi.ffi_call(f"gsae_{name}", out, vmap_method="sequential")(*args)


@jax.custom_vjp
def bag(v: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
  """sum_k v[b, k] * table[idx[b, k]]: v, idx [batch, K], table [M, n] -> [batch, n]."""
  return _call("bag", jax.ShapeDtypeStruct((v.shape[0], table.shape[1]), v.dtype), v, idx, table)


def _bag_fwd(v, idx, table):
  return bag(v, idx, table), (v, idx, table)


def _bag_bwd(residuals, g):
  v, idx, table = residuals
  return dot(g, idx, table), None, scatter(v, idx, g, table.shape[0])


bag.defvjp(_bag_fwd, _bag_bwd)


def dot(g: jax.Array, idx: jax.Array, table: jax.Array) -> jax.Array:
  """<g[b], table[idx[b, k]]>: g [batch, n], idx [batch, K], table [M, n] -> [batch, K]."""
  return _call("dot", jax.ShapeDtypeStruct(idx.shape, g.dtype), g, idx, table)


def scatter(v: jax.Array, idx: jax.Array, g: jax.Array, rows: int) -> jax.Array:
  """[rows, n] with row m = sum over slots (b, k) holding m of v[b, k] * g[b]."""
  return _call("scatter", jax.ShapeDtypeStruct((rows, g.shape[1]), v.dtype), v, idx, g)


def positive_slots(score: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
  """(idx [batch, slots], count [batch]): each token's features with score > 0 in index order,
  padded with a feature whose score is <= 0, and how many have score > 0 (may exceed slots).
  One pass over the scores, where `lax.top_k` sorts."""
  batch = score.shape[0]
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  return _call("positive_slots", (i32(batch, slots), i32(batch)), jax.lax.stop_gradient(score))
