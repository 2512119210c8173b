r"""Shard loader throughput: globally shuffled [batch, d_model] batches from a shard folder to a
sharded jax.Array, as the training loop consumes them.

  python benchmarks/loader.py --d_model=640 --tokens=262144 --batch=4096

Writes a temporary harvest of random fp32 activations (through the real harvest code), opens it
with the checksum scan, then times `next()` over whole epochs; the folder stays in the page
cache, as a harvest a few times smaller than RAM does during training. Last line:
`loader N tokens/s`.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from gsae_jax import sharding  # noqa: E402
from gsae_jax.data import harvest, shards  # noqa: E402
from gsae_jax.data.pipeline import ShardIterator  # noqa: E402

_D = flags.DEFINE_integer("d_model", 640, "Activation width.")
_TOKENS = flags.DEFINE_integer("tokens", 262_144, "Tokens in the benchmark harvest.")
_CONTEXT = flags.DEFINE_integer("context_length", 1024, "Window length (BOS excluded on disk).")
_BATCH = flags.DEFINE_integer("batch", 4096, "Global batch.")
_BATCHES = flags.DEFINE_integer("batches", 128, "Timed batches.")
_THREADS = flags.DEFINE_integer("threads", 2, "Grain read threads.")
_PREFETCH = flags.DEFINE_integer("prefetch", 4, "Batches read ahead.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "On-disk dtype.")


def _random_windows(n: int, t: int):
  for w in range(n):
    yield np.concatenate([[0], 1 + (np.arange(t - 1) + w) % 1000]).astype(np.int32)


def main(argv):
  del argv
  d, t = _D.value, _CONTEXT.value
  rng = np.random.default_rng(0)
  table = rng.standard_normal((1001, d), dtype=np.float32)
  act = lambda tokens: table[tokens] + rng.standard_normal((*tokens.shape, d), dtype=np.float32)
  n_windows = -(-_TOKENS.value // (t - 1))
  with tempfile.TemporaryDirectory(prefix="loader_bench_") as folder:
    spec = harvest.HarvestSpec(model_id="benchmark/random", site="blocks.0.resid_post", layer=0,
                               d_model=d, context_length=t, num_tokens=_TOKENS.value,
                               bos_token_id=0, dtype=_DTYPE.value, windows_per_shard=64,
                               batch_size=8)
    t0 = time.perf_counter()
    harvest.harvest(folder, _random_windows(n_windows, t), act, spec, progress=False)
    t1 = time.perf_counter()
    shard_set = shards.open_shards(folder, verify=True)
    t2 = time.perf_counter()
    size = sum(os.path.getsize(p) for p in shard_set.paths())
    print(f"harvest of {shard_set.num_tokens:,} tokens x {d} {_DTYPE.value} ({size / 1e9:.2f} GB, "
          f"{len(shard_set.acts)} shards): written in {t1 - t0:.1f}s, verified (sha256 + "
          f"finite) in {t2 - t1:.1f}s ({size / 1e6 / (t2 - t1):.0f} MB/s)", flush=True)

    mesh = sharding.make_mesh()
    out = NamedSharding(mesh, sharding.batch_spec())
    it = ShardIterator(shard_set, _BATCH.value, out, scale=0.5, seed=0,
                       num_threads=_THREADS.value, prefetch=_PREFETCH.value)
    for _ in range(4):  # warm-up: thread start, first compile of the device transfer
      jax.block_until_ready(next(it))
    t0 = time.perf_counter()
    for _ in range(_BATCHES.value):
      jax.block_until_ready(next(it))
    rate = _BATCHES.value * _BATCH.value / (time.perf_counter() - t0)

    t0 = time.perf_counter()  # the gather alone, one thread, no Grain or device transfer
    for b in range(16):
      shard_set.gather(it.rows(b))
    gather_rate = 16 * _BATCH.value / (time.perf_counter() - t0)
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), batch {_BATCH.value}, "
          f"{_THREADS.value} threads, prefetch {_PREFETCH.value}; single-thread gather "
          f"{gather_rate:,.0f} rows/s", flush=True)
    print(f"loader {rate:,.0f} tokens/s".replace(",", ""), flush=True)


if __name__ == "__main__":
  app.run(main)
