r"""Shard loader throughput: shuffled [batch, d_model] batches from a shard folder to a sharded
jax.Array, as the training loop consumes them, for the global and the block shuffle, next to the
train step's demand.

  python benchmarks/loader.py --d_model=640 --tokens=262144 --batch=4096
  python benchmarks/loader.py --simulate_latency_ms=20 --simulate_mb_s=100   # a bucket

Writes a temporary harvest of random activations (through the real harvest code), opens it with
the checksum scan, then times `next()`. Without simulation the folder stays in the page cache, as
a harvest a few times smaller than RAM does during training. With `--simulate_latency_ms` /
`--simulate_mb_s` every read request costs latency + bytes / bandwidth (a sleep, so concurrent
requests overlap as they do on a bucket): the block shuffle's requests are its block reads; the
global shuffle's are its memory-map page faults, one per run of adjacent rows, one after another
within a thread (a fault blocks its thread). The global shuffle's rate does not depend on its
batch (it pays per row), so it is timed on `--slow_global_batch` rows to finish in seconds. Last
lines: `<shuffle> N rows/s = R x the step's demand`.
"""

from __future__ import annotations

import dataclasses
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
from gsae_jax.data import harvest, shards, storage  # noqa: E402
from gsae_jax.data.block_shuffle import READ_THREADS, BlockSpec  # noqa: E402
from gsae_jax.data.pipeline import ShardIterator  # noqa: E402

_D = flags.DEFINE_integer("d_model", 640, "Activation width.")
_TOKENS = flags.DEFINE_integer("tokens", 262_144, "Tokens in the benchmark harvest.")
_CONTEXT = flags.DEFINE_integer("context_length", 1024, "Window length (BOS excluded on disk).")
_BATCH = flags.DEFINE_integer("batch", 4096, "Global batch.")
_BATCHES = flags.DEFINE_integer("batches", 128, "Timed batches (at most; see --seconds).")
_SECONDS = flags.DEFINE_float("seconds", 30.0, "Stop timing a shuffle after this long.")
_THREADS = flags.DEFINE_integer("threads", 2, "Grain read threads.")
_PREFETCH = flags.DEFINE_integer("prefetch", 4, "Batches read ahead.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "On-disk dtype.")
_SHUFFLE = flags.DEFINE_enum("shuffle", "both", ["both", "global", "block"], "Shuffles timed.")
_BLOCK_ROWS = flags.DEFINE_integer("block_rows", 1024, "Block shuffle: rows per read.")
_BUFFER_BLOCKS = flags.DEFINE_integer("buffer_blocks", 16, "Block shuffle: blocks per group.")
_LANES = flags.DEFINE_integer("lanes", 8, "Block shuffle: lanes.")
_LATENCY = flags.DEFINE_float("simulate_latency_ms", 0.0, "Simulated latency per read request.")
_MB_S = flags.DEFINE_float("simulate_mb_s", 0.0, "Simulated bandwidth per request (0: no cost).")
_SLOW_GLOBAL_BATCH = flags.DEFINE_integer(
    "slow_global_batch", 256, "Global batch of the global shuffle under simulated latency.")
_DEMAND = flags.DEFINE_float(
    "demand_tokens_s", 4203.0, "The train step's tokens/s: the dense Gated step at n = 640, "
    "M = 10240, batch 4096 on the 2-core CPU (BUILD_NOTES, measured numbers).")


def _request_cost(requests: int, size: int) -> float:
  """Seconds that `requests` requests of `size` bytes in all cost on the simulated storage."""
  per_byte = 1 / (_MB_S.value * 1e6) if _MB_S.value else 0.0
  return requests * _LATENCY.value / 1e3 + size * per_byte


class SlowReader:
  """A `RangeReader` that costs every request latency + bytes / bandwidth."""

  def __init__(self, inner: storage.RangeReader):
    self.inner = inner

  def read(self, path: str, offset: int, size: int) -> bytes:
    time.sleep(_request_cost(1, size))
    return self.inner.read(path, offset, size)


@dataclasses.dataclass(frozen=True)
class SlowGathers(shards.ShardSet):
  """A `ShardSet` whose row gathers cost one request per run of adjacent rows, in series."""

  def gather(self, rows: np.ndarray) -> np.ndarray:
    ordered = np.sort(rows)
    runs = 1 + np.count_nonzero(np.diff(ordered) != 1)
    time.sleep(_request_cost(int(runs), len(rows) * self.row_bytes))
    return super().gather(rows)


def _random_windows(n: int, t: int):
  for w in range(n):
    yield np.concatenate([[0], 1 + (np.arange(t - 1) + w) % 1000]).astype(np.int32)


def _rate(it: ShardIterator, batch: int, warmup: int) -> tuple[float, int]:
  """(rows/s, batches timed) of `next(it)` over up to --batches batches or --seconds."""
  for _ in range(warmup):  # thread start, first groups, first compile of the device transfer
    jax.block_until_ready(next(it))
  t0, n = time.perf_counter(), 0
  while n < _BATCHES.value and (n == 0 or time.perf_counter() - t0 < _SECONDS.value):
    jax.block_until_ready(next(it))
    n += 1
  return n * batch / (time.perf_counter() - t0), n


def main(argv):
  del argv
  d, t = _D.value, _CONTEXT.value
  rng = np.random.default_rng(0)
  table = rng.standard_normal((1001, d), dtype=np.float32)
  act = lambda tokens: table[tokens] + rng.standard_normal((*tokens.shape, d), dtype=np.float32)
  n_windows = -(-_TOKENS.value // (t - 1))
  slow = bool(_LATENCY.value or _MB_S.value)
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
          f"{len(shard_set.paths())} shards): written in {t1 - t0:.1f}s, verified (sha256 + "
          f"finite) in {t2 - t1:.1f}s ({size / 1e6 / (t2 - t1):.0f} MB/s)", flush=True)
    mesh = sharding.make_mesh()
    out = NamedSharding(mesh, sharding.batch_spec())
    print(f"{jax.device_count()} {jax.devices()[0].platform} device(s), {_THREADS.value} Grain "
          f"threads, prefetch {_PREFETCH.value}; storage: " + (
              f"{_LATENCY.value:g} ms + bytes / {_MB_S.value:g} MB/s per request (simulated)"
              if slow else "local page cache"), flush=True)
    kw = dict(scale=0.5, seed=0, num_threads=_THREADS.value, prefetch=_PREFETCH.value)
    demand = _DEMAND.value
    if _SHUFFLE.value in ("both", "global"):
      batch = min(_BATCH.value, _SLOW_GLOBAL_BATCH.value) if slow else _BATCH.value
      fields = {f.name: getattr(shard_set, f.name) for f in dataclasses.fields(shard_set)}
      gathers = SlowGathers(**fields) if slow else shard_set
      rate, n = _rate(ShardIterator(gathers, batch, out, **kw), batch, 1 if slow else 4)
      print(f"global shuffle (batch {batch}, {n} batches timed): {rate:,.0f} rows/s = "
            f"{rate / demand:.2f}x the step's demand of {demand:,.0f} tokens/s", flush=True)
      if slow:
        ceiling = 64 / _request_cost(1, shard_set.row_bytes)
        print(f"  (its ceiling with 64 threads, one request per row: {ceiling:,.0f} rows/s = "
              f"{ceiling / demand:.2f}x)", flush=True)
    if _SHUFFLE.value in ("both", "block"):
      block = BlockSpec(_BLOCK_ROWS.value, _BUFFER_BLOCKS.value, _LANES.value)
      reader = SlowReader(storage.FileReader()) if slow else None
      it = ShardIterator(shard_set, _BATCH.value, out, block=block, reader=reader, **kw)
      rate, n = _rate(it, _BATCH.value, 4)
      print(f"block shuffle (batch {_BATCH.value}, {n} batches timed; blocks of "
            f"{block.block_rows} rows = {block.block_rows * shard_set.row_bytes / 1e6:.1f} MB, "
            f"{block.buffer_blocks} per group, {block.lanes} lanes, {READ_THREADS} concurrent "
            f"reads): {rate:,.0f} rows/s = {rate / demand:.2f}x the step's demand of "
            f"{demand:,.0f} tokens/s", flush=True)


if __name__ == "__main__":
  app.run(main)
