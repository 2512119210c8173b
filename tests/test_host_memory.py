"""`gsae_jax.host_memory`: with it, XLA:CPU's freed step outputs are reused, not re-faulted."""

import os
import subprocess
import sys

from gsae_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports the launch package (which applies the setting), then prints the median count of minor
# page faults per call, over the last 20 of 40 calls, of a jitted function whose 64 MB output is
# dropped after every call. The median: the heap still grows now and then (by 1-2 outputs, over
# a few calls) while the order in which outputs are freed shifts it, until it holds them all.
PROBE = """
import resource, statistics
import launch
import jax, jax.numpy as jnp
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
f = jax.jit(lambda x: (2 * x + 1, jnp.sin(x).sum()))
x = jnp.ones(16 << 20)
per_call = []
for _ in range(40):
  start = faults()
  jax.block_until_ready(f(x))
  per_call.append(faults() - start)
print(statistics.median(per_call[20:]))
"""


def _faults_per_call(**env) -> float:
  out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **env},
                       check=True)
  return float(out.stdout.split()[-1])


def test_launch_entry_points_reuse_freed_memory():
  """A 64 MB output is 16384 pages: without the setting each call faults them in again
  (~32k faults per call on this machine; fewer where transparent huge pages are always on)."""
  assert _faults_per_call() < 100


def test_opt_out(monkeypatch):
  monkeypatch.setenv(host_memory.OPT_OUT, "0")
  assert not host_memory.keep_freed_memory()
