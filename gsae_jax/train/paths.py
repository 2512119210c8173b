"""The loss gradient by the dense path or the exact sparse path, and the choice between them.

Dense: every architecture's loss over all d_sae features (`features.AllFeatures`).
Sparse: the encoder product is still dense (it decides which features fire), but everything
after it runs on each token's K highest-scoring features (`features.TokenSlots`): the decoder,
the auxiliary decoders and every gradient, so a step costs about 2 n M FLOPs per token plus a
top-k and O(K n) gathers and scatter-adds, instead of 10-16 n M. A step is two jitted calls:
`find_support` (encoder products, slots, and how many slots the support needs:
`SAE.slots_needed`), then, chosen on the host, the sparse step on the smallest compiled number
of slots that holds it (`slot_buckets`), or the dense step on the same products when K slots
do not (e.g. early in training, when many features fire): never a step with a feature
dropped. (A `lax.cond` between the two ran 5-10x slower on XLA:CPU than either branch alone.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gsae_jax.kernels import rows
from gsae_jax.sae import features
from gsae_jax.sae.spec import SAESpec

# `auto` takes the sparse path when K slots are at most this fraction of the dictionary, per
# backend (BUILD_NOTES, "Sparse step", "CPU row kernels" and "GPU timings"). On the 2-core CPU
# with XLA's gathers the sparse Gated step lost at d_sae / K = 80 (0.89x) and won at 512; with
# the row kernels it won 2.2-3.4x from d_sae / K = 16 (2048 features, 128 slots) up.
# On an H200 it lost up to d_sae / K = 1024 (Gated, JumpReLU, baseline: 0.26-0.51x) and won from
# 2048 (TopK: 1.27x at 65536 / 32, 1.41x at 131072 / 32); other accelerators (TPU: not
# measured) use the H200's rule.
AUTO_MAX_SLOT_FRACTION = {"cpu": 1 / 128, "cpu_row_kernels": 1 / 16, "accelerator": 1 / 2048}
# `train.batch_chunks=0` on CPU: the batch is processed in parts of about this many tokens per
# device, their gradients accumulated: the [tokens, d_sae] temporaries then stay small (1.19x
# faster dense Gated steps at d_sae 10240 and 1.37x at 65536 with batch 4096 on the 2-core CPU).
# On an H200 one part was faster (1.14x at 10240, 1.09x at 65536), so accelerators use one.
CHUNK_TOKENS = 1024
CALIBRATION_ROWS = 4096  # rows `with_support_l0` sets the L0 on
# A split step runs this fraction of the batch (the tokens with the largest supports) dense and
# the rest on the slots: real activations have rare outlier tokens (7.8x the median norm in the
# Gemma 3 270M layer-6 shards) that light up hundreds of features while the mean L0 is 10.
SPLIT_FRACTION = 1 / 32


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


@dataclasses.dataclass(frozen=True)
class PathChoice:
  """How train steps compute gradients: `sparse` with `capacity` slots per token (and up to
  `dead_capacity` dead latents for AuxK), else dense; matmuls in `compute_dtype` (None: the
  parameters' float32) with float32 results; the batch in `batch_chunks` parts
  (`loss_grads_in_chunks`)."""
  sparse: bool
  capacity: int = 0
  dead_capacity: int = 0
  compute_dtype: Any = None
  batch_chunks: int = 1
  kernels: bool = False  # the sparse step's gathers by `gsae_jax.kernels.rows`
  split_rows: int = 0  # tokens a split step runs dense (0: no split step)


def choose(train_config, spec: SAESpec, data_parallel: int = 1, devices: int = 1) -> PathChoice:
  """The path from `train.path` ('auto' | 'dense' | 'sparse'), the sparse capacities, the
  compute dtype, the batch chunks (`batch_chunks`; `data_parallel`: the mesh's data axis) and
  whether the sparse step uses the CPU row kernels (`train.cpu_row_kernels`, on a mesh of
  `devices` = 1 with float32 matmuls: the kernels have no sharding rule, so on a larger mesh
  XLA would gather their operands to every device).

  The default capacity (`train.sparse_capacity=0`) is the architecture's `sparse_capacity`
  (128 slots per token; TopK's k).
  """
  path = train_config.get("path", "dense")  # configs saved before the sparse path: dense
  has_sparse = spec.support_products() is not None
  if path == "sparse" and not has_sparse:
    raise ValueError(f"train.path='sparse': the {spec.architecture.NAME} SAE with this config "
                     f"has no sparse step (e.g. a straight-through gate backward); use 'auto' or "
                     f"'dense'")
  capacity = (int(train_config.get("sparse_capacity", 0))
              or spec.architecture.sparse_capacity(spec.largest_integer_coefficient()))
  if capacity < spec.largest_integer_coefficient():
    raise ValueError(f"train.sparse_capacity={capacity}: expected at least the largest k, "
                     f"{spec.largest_integer_coefficient()} (every step would run dense)")
  capacity = min(capacity, spec.d_sae - 1)
  dead_capacity = min(int(train_config.get("sparse_dead_capacity", 1024)), spec.d_sae)
  compute_dtype = {"float32": None, "bfloat16": jnp.bfloat16}[
      train_config.get("compute_dtype", "float32")]
  kernels = (has_sparse and path != "dense" and bool(train_config.get("cpu_row_kernels", False))
             and devices == 1 and compute_dtype is None and rows.available())
  if path == "auto":
    fraction = AUTO_MAX_SLOT_FRACTION[
        "cpu_row_kernels" if kernels else "cpu" if _on_cpu() else "accelerator"]
    sparse = has_sparse and capacity <= fraction * spec.d_sae
  else:
    sparse = path == "sparse"
  kernels = kernels and sparse
  chunks = batch_chunks(train_config, spec, data_parallel, sparse)
  arch = spec.architecture
  split = (sparse and chunks == 1 and arch.POSITIVE_SUPPORT and arch.TOKENWISE_LOSS
           and bool(train_config.get("split_step", False)))
  split_rows = int(train_config.batch_size * SPLIT_FRACTION) if split else 0
  return PathChoice(sparse, capacity, dead_capacity, compute_dtype, chunks, kernels, split_rows)


def describe_choice(choice: PathChoice) -> str:
  """One line for the run's log, e.g. 'sparse step (128 slots per token, CPU row kernels; the 32
  tokens with the largest supports dense when only they do not fit; dense when supports do not
  fit), batch in 1 part, float32 matmuls'."""
  kernels = ", CPU row kernels" if choice.kernels else ""
  split = (f"; the {choice.split_rows} tokens with the largest supports dense when only they do "
           f"not fit" if choice.split_rows else "")
  path = (f"sparse step ({choice.capacity} slots per token{kernels}{split}; dense when supports "
          f"do not fit)" if choice.sparse else "dense step")
  dtype = "bfloat16" if choice.compute_dtype is not None else "float32"
  parts = "part" if choice.batch_chunks == 1 else "parts"
  return f"{path}, batch in {choice.batch_chunks} {parts}, {dtype} matmuls"


def batch_chunks(train_config, spec: SAESpec, data_parallel: int, sparse: bool = False) -> int:
  """`train.batch_chunks`, or for 0 (auto) parts of about CHUNK_TOKENS tokens per device on the
  dense path on CPU (the sparse path's temporaries are small, and each part would add a pass
  over the dense gradient: 3.2 -> 4.3 s at d_sae 65536 with 4 parts; accelerators: one part);
  1 for architectures whose loss is not a mean over tokens (BatchTopK selects over the batch)."""
  chunks = int(train_config.get("batch_chunks", 1))
  local = int(train_config.batch_size) // max(data_parallel, 1)
  if not spec.architecture.TOKENWISE_LOSS:
    if chunks > 1:
      raise ValueError(f"train.batch_chunks={chunks}: the {spec.name} SAE's loss is not a mean "
                       f"over tokens (it selects over the whole batch); use 0 or 1")
    return 1
  if chunks == 0:
    chunks = 1 if sparse or not _on_cpu() else max(1, local // CHUNK_TOKENS)
    while local % chunks:
      chunks -= 1
  if local % chunks:
    raise ValueError(f"train.batch_chunks={chunks}: expected a divisor of the batch per data "
                     f"shard, {train_config.batch_size} / {data_parallel} = {local}")
  return chunks


def member_execution(sweep_config, choice: PathChoice) -> str:
  """How a sweep's members run (`sweep.execution`): 'vmap', 'sequential' or 'separate'.
  'auto': separate on CPU, where a vmapped sweep measured 0.78x the speed of separate steps
  and a sparse sweep over the stacked state paid for copying each member's new state into it
  (BUILD_NOTES "Sweeps"); sequential on an accelerator's sparse path (vmapped gathers and
  scatter-adds batch poorly); vmap otherwise."""
  execution = sweep_config.get("execution", "vmap")
  if execution == "auto":
    return "separate" if _on_cpu() else "sequential" if choice.sparse else "vmap"
  return execution


def find_support(params, x: jax.Array, coefficients: Mapping[str, jax.Array], dead: jax.Array,
                 *, graphdef, choice: PathChoice):
  """(products, idx, heavy, needed) for a sparse step on the batch x [batch, d_in]: the encoder
  products {weight name: [batch, d_sae]}; each token's K + 1 highest-scoring features
  idx [batch, K + 1] (K = `choice.capacity`), best first; the `choice.split_rows` tokens with
  the largest supports, heavy [split_rows]; and needed (int32 [2]): how many leading slots hold
  every token's support, and every support but the heavy tokens' (K + 1: K slots do not).

  With the row kernels and an architecture whose support is {score > 0}, idx holds that
  support in feature order instead, then features whose score is <= 0 (they add nothing to the
  loss or its gradient)."""
  sae = nnx.merge(graphdef, params)
  recorder = features.Recorder(compute_dtype=choice.compute_dtype)
  score = sae.support_score(x, coefficients, recorder)
  over = choice.capacity + 1
  if choice.kernels and sae.POSITIVE_SUPPORT:  # one pass over the scores instead of top_k's
    idx, count = rows.positive_slots(score, over)
  else:
    top, idx = features.slots(score, choice.capacity)
    if not (choice.split_rows and sae.POSITIVE_SUPPORT):  # no split step: all tokens only
      needed = sae.slots_needed(top, coefficients, dead, choice.dead_capacity)
      return recorder.products, idx, jnp.zeros((0,), jnp.int32), jnp.stack([needed, over])
    count = jnp.sum(score > 0, axis=-1)
  largest, heavy = jax.lax.top_k(count, choice.split_rows + 1)
  needed = jnp.minimum(largest[jnp.asarray([0, choice.split_rows])], over).astype(jnp.int32)
  if not choice.split_rows:
    needed = needed.at[1].set(over)
  return recorder.products, idx, heavy[:choice.split_rows], needed


def slot_buckets(capacity: int) -> tuple[int, ...]:
  """The slot counts a sparse step is compiled for (each on first use): 1/4, 3/8, 1/2, 3/4 and
  all of the capacity. A step uses the smallest that holds its support: with 128 slots and a
  largest support of 72, 96 slots instead of 128 (row gathers cost in proportion)."""
  return tuple(sorted({max(1, capacity * f // 8) for f in (2, 3, 4, 6)} | {capacity}))


def loss_grads(params, x: jax.Array, coefficients: Mapping[str, jax.Array], dead: jax.Array, *,
               graphdef, choice: PathChoice, products=None, idx=None):
  """(grads, terms, out): the loss gradient at params for the batch x [batch, d_in], dense, or
  with `idx` on each token's slots; `products` (from `find_support`) are reused, not recomputed.

  out holds 'x_hat' [batch, d_in], 'fire_count' [d_sae] and the architecture's other outputs.
  """
  if idx is not None:
    view = features.TokenSlots(idx, dead.shape[-1], products, choice.dead_capacity,
                               choice.compute_dtype, choice.kernels)
  else:
    view = features.AllFeatures(products, choice.compute_dtype)

  def loss_fn(p):
    terms, out = nnx.merge(graphdef, p).loss_terms(x, coefficients, dead, view)
    return sum(terms.values()), (terms, out)

  grads, (terms, out) = jax.grad(loss_fn, has_aux=True)(params)
  out = dict(out)
  out["fire_count"] = view.fire_count(out.pop("f"))
  return grads, terms, out


def loss_grads_split(params, x: jax.Array, coefficients: Mapping[str, jax.Array],
                     dead: jax.Array, *, graphdef, choice: PathChoice, products, idx,
                     heavy: jax.Array):
  """`loss_grads` with the tokens `heavy` [R] on the dense path and the others on their slots,
  the two parts' gradients and terms weighted by their token shares: the same values up to
  float summation order, for losses that are means over tokens (`TOKENWISE_LOSS`)."""
  batch, r = x.shape[0], heavy.shape[0]
  light = jnp.nonzero(jnp.ones((batch,), bool).at[heavy].set(False), size=batch - r)[0]
  rows_of = lambda tree, rows: jax.tree.map(lambda a: a[rows], tree)
  parts = [loss_grads(params, x[light], coefficients, dead, graphdef=graphdef, choice=choice,
                      products=rows_of(products, light), idx=idx[light]),
           loss_grads(params, x[heavy], coefficients, dead, graphdef=graphdef, choice=choice,
                      products=rows_of(products, heavy))]
  if any(set(out) != {"x_hat", "fire_count"} for _, _, out in parts):
    raise ValueError(f"a split step cannot combine the outputs {sorted(parts[0][2])}")
  share = ((batch - r) / batch, r / batch)
  grads, terms = (jax.tree.map(lambda a, b: share[0] * a + share[1] * b, parts[0][i], parts[1][i])
                  for i in (0, 1))
  x_hat = jnp.zeros(x.shape, parts[0][2]["x_hat"].dtype)
  x_hat = x_hat.at[light].set(parts[0][2]["x_hat"]).at[heavy].set(parts[1][2]["x_hat"])
  return grads, terms, {"x_hat": x_hat,
                        "fire_count": parts[0][2]["fire_count"] + parts[1][2]["fire_count"]}


def loss_grads_in_chunks(params, x: jax.Array, coefficients: Mapping[str, jax.Array],
                         dead: jax.Array, *, graphdef, choice: PathChoice, products=None,
                         idx=None, heavy=None):
  """`loss_grads` over `choice.batch_chunks` equal parts of the batch (a `lax.scan`), their
  gradients and terms averaged: the same values up to float summation order, for losses that
  are means over tokens. Part c holds rows c, c + chunks, ..., so that a batch sharded over
  devices gives every device a share of every part. With `heavy`, the split step
  (`loss_grads_split`; one part)."""
  if heavy is not None:
    return loss_grads_split(params, x, coefficients, dead, graphdef=graphdef, choice=choice,
                            products=products, idx=idx, heavy=heavy)
  chunks = choice.batch_chunks
  step = lambda x, products, idx: loss_grads(params, x, coefficients, dead, graphdef=graphdef,
                                             choice=choice, products=products, idx=idx)
  if chunks == 1:
    return step(x, products, idx)
  split = lambda a: jnp.swapaxes(a.reshape(a.shape[0] // chunks, chunks, *a.shape[1:]), 0, 1)
  parts = jax.tree.map(split, (x, products, idx))

  def body(acc, part):
    grads, terms, out = step(*part)
    if set(out) != {"x_hat", "fire_count"}:
      raise ValueError(f"batch chunks cannot combine the outputs {sorted(out)}")
    return jax.tree.map(jnp.add, acc, (grads, terms, out["fire_count"])), out["x_hat"]

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       jax.eval_shape(lambda: step(*jax.tree.map(lambda a: a[0], parts))))
  acc = (zeros[0], zeros[1], zeros[2]["fire_count"])
  (grads, terms, fire_count), x_hat = jax.lax.scan(body, acc, parts)
  mean = lambda tree: jax.tree.map(lambda a: a / chunks, tree)
  x_hat = jnp.swapaxes(x_hat, 0, 1).reshape(x.shape[0], -1)
  return mean(grads), mean(terms), {"x_hat": x_hat, "fire_count": fire_count}


def with_support_l0(spec: SAESpec, params, x: jax.Array, l0: float):
  """params with the architecture's `SUPPORT_BIAS` shifted by one constant so that on the batch
  x about l0 features per token have a positive support score (benchmarks and tests: a trained
  SAE's sparsity without training one). The constant comes from the first `CALIBRATION_ROWS`
  rows (a sort of batch x d_sae scores would pass 2^31 elements, XLA's limit, at 16384 x 2^17)."""
  name = spec.architecture.SUPPORT_BIAS
  if name is None:
    raise ValueError(f"the {spec.name} SAE sets its L0 by a coefficient, not a bias")
  sae = nnx.merge(spec.graphdef, params)
  coefficients = spec.coefficients_at(jnp.asarray(2**30))
  score = sae.support_score(x[:CALIBRATION_ROWS], coefficients, features.Recorder())
  flat = jnp.sort(score.reshape(-1))
  shift = -flat[int(flat.size * (1 - l0 / spec.d_sae))]
  return {**params, name: params[name] + shift.astype(params[name].dtype)}
