"""Memory and communication plan of a run, from abstract shapes only (nothing is allocated).

The mesh is a `jax.sharding.AbstractMesh` of the requested size, so a 16-device (or 4096-device)
plan needs no such devices; every array's per-device shape comes from its NamedSharding under the
rules table, the same shardings the real run uses. `launch/train.py --dry_run` and
`launch/harvest.py --dry_run` print a plan and refuse one that does not fit; every training run
checks its plan against the device's memory before allocating (`check_sae_fits`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, NamedSharding

from gsae_jax import sharding
from gsae_jax.errors import ConfigError

# [batch, d_sae] buffers live at the peak of one SAE train step (forward + backward): each
# architecture declares its count (`SAE.ACTIVATION_BUFFERS`), fitted to XLA's memory_analysis
# (CPU, meshes (2,4), (4,2), (1,8)): temp bytes ~ k x [batch, d_sae] shard + the gradients.
# tests/distributed/test_plan.py keeps the whole plan within 15% of XLA's numbers.
GiB = 1024**3


class PlanError(ConfigError):
  """A configuration that cannot fit; the message names the overflowing term."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A machine a dry run can plan for without having it: one JAX device per chip."""
  chips: int
  hbm_gib: float  # per chip
  hosts: int
  chips_per_host: int
  source: str


# From the vendors' pages. TPU names count TensorCores for v4 (2 per chip, one megacore JAX
# device) and chips for v5e. HBM is the chip's capacity; XLA keeps a little for itself, so a plan
# within ~3% of it may still fail (pass --device_memory_gib to check a tighter limit).
SLICES: dict[str, Slice] = {
    "v5e-16": Slice(16, 16, 4, 4, "cloud.google.com/tpu/docs/v5e: 16 GB HBM2 per chip; "
                                  "v5litepod-16 = 4 hosts x 4 chips"),
    "v4-32": Slice(16, 32, 4, 4, "cloud.google.com/tpu/docs/v4: 32 GiB HBM2 per chip, 2 "
                                 "TensorCores per chip; v4-32 = 16 chips, 4 hosts x 4 chips"),
    "8xh100": Slice(8, 80, 1, 8, "NVIDIA H100 SXM: 80 GB HBM3; one HGX H100 host holds 8"),
}


def slice_target(name: str | None, num_devices: int | None,
                 memory_gib: float | None) -> tuple[int | None, float | None]:
  """(devices, GiB per device) for a dry run: --dry_run_slice's values, unless
  --dry_run_devices / --device_memory_gib give their own. Prints the slice it plans for."""
  if name is None:
    return num_devices, memory_gib
  if name not in SLICES:
    raise ConfigError(f"--dry_run_slice={name!r}: expected one of {sorted(SLICES)}")
  s = SLICES[name]
  print(f"slice {name}: {s.chips} chips, {s.hbm_gib:g} GiB HBM each, {s.hosts} host(s) x "
        f"{s.chips_per_host} chips ({s.source})", flush=True)
  return num_devices or s.chips, memory_gib or s.hbm_gib


@dataclasses.dataclass(frozen=True)
class Term:
  """One per-device memory term."""
  name: str
  bytes: int
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective per step: `bytes` is the per-device payload (the buffer being reduced or
  gathered); `wire_bytes` what a ring algorithm sends per device."""
  name: str
  op: str  # 'all-reduce' | 'all-gather'
  axis: str
  group: int  # devices per group along `axis`
  bytes: int
  count: int = 1  # times per step

  @property
  def wire_bytes(self) -> int:
    if self.group <= 1:
      return 0
    factor = 2 * (self.group - 1) / self.group if self.op == "all-reduce" else (self.group - 1)
    return int(round(factor * self.bytes * self.count))


@dataclasses.dataclass(frozen=True)
class Plan:
  title: str
  mesh: dict[str, int]
  memory: tuple[Term, ...]
  collectives: tuple[Collective, ...]

  @property
  def total_bytes(self) -> int:
    return sum(t.bytes for t in self.memory)

  def term(self, name: str) -> Term:
    return next(t for t in self.memory if t.name == name)

  def check(self, limit_bytes: int | None) -> None:
    """Raises PlanError naming the term at which the running per-device sum passes the limit."""
    if limit_bytes is None:
      return
    running = 0
    for t in self.memory:
      running += t.bytes
      if running > limit_bytes:
        largest = max(self.memory, key=lambda t: t.bytes)
        raise PlanError(
            f"{self.title}: does not fit in {_fmt(limit_bytes)} per device on mesh {self.mesh}: "
            f"'{t.name}' ({_fmt(t.bytes)}) overflows it (running total {_fmt(running)}, "
            f"all terms {_fmt(self.total_bytes)}; largest term '{largest.name}' "
            f"{_fmt(largest.bytes)})")

  def format(self, limit_bytes: int | None = None) -> str:
    lines = [self.title, f"mesh {self.mesh} ({math.prod(self.mesh.values())} devices)",
             "per-device memory:"]
    for t in self.memory:
      lines.append(f"  {t.name:12s} {t.bytes:>16,d} B  {_fmt(t.bytes):>10s}  {t.note}")
    lines.append(f"  {'total':12s} {self.total_bytes:>16,d} B  {_fmt(self.total_bytes):>10s}")
    lines.append("collectives per step (per device):")
    for c in self.collectives:
      times = f" x{c.count}" if c.count != 1 else ""
      lines.append(f"  {c.name}: {c.op} over '{c.axis}' ({c.group} devices){times}, "
                   f"payload {c.bytes:,d} B, ring traffic {c.wire_bytes:,d} B")
    if not self.collectives:
      lines.append("  none")
    if limit_bytes is not None:
      lines.append(f"device memory {_fmt(limit_bytes)}: {100 * self.total_bytes / limit_bytes:.1f}% "
                   "used by these terms")
    return "\n".join(lines)


def _fmt(n: float) -> str:
  for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def mesh_shape(data: int, model: int, num_devices: int) -> dict[str, int]:
  """The ('data', 'model') sizes `sharding.make_mesh` would build on `num_devices` devices."""
  if model < 1 or num_devices % model:
    raise PlanError(f"mesh.model={model}: expected a divisor of the {num_devices} devices")
  data = num_devices // model if data == -1 else data
  if data < 1 or data * model > num_devices:
    raise PlanError(f"mesh data={data} x model={model} needs {data * model} devices, "
                    f"found {num_devices}")
  return {"data": data, "model": model}


def abstract_mesh(shape: Mapping[str, int]) -> AbstractMesh:
  return AbstractMesh(tuple(shape.values()), tuple(shape),
                      axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def device_bytes(x: jax.ShapeDtypeStruct) -> int:
  """Bytes of one device's shard of an abstract array carrying a NamedSharding."""
  return math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize


def tree_device_bytes(tree: Any) -> int:
  return sum(device_bytes(x) for x in jax.tree.leaves(tree))


def _spec_note(params: Mapping[str, jax.ShapeDtypeStruct], top: int = 2) -> str:
  big = sorted(params.items(), key=lambda kv: -math.prod(kv[1].shape))[:top]
  return ", ".join(f"{k} {list(v.shape)} {v.sharding.spec}" for k, v in big)


def sae_plan(config, d_in: int, num_devices: int) -> Plan:
  """Per-device plan of one SAE train step of `config` on `num_devices` devices."""
  from gsae_jax.sae.spec import describe
  from gsae_jax.train import optim
  from gsae_jax.train.state import abstract_train_state

  shape = mesh_shape(config.mesh.data, config.mesh.model, num_devices)
  mesh = abstract_mesh(shape)
  if config.sae.d_sae % shape["model"] or config.train.batch_size % shape["data"]:
    raise PlanError(f"sae.d_sae={config.sae.d_sae}, train.batch_size={config.train.batch_size}: "
                    f"expected multiples of mesh model={shape['model']} and data={shape['data']}")
  rules = tuple(map(tuple, config.mesh.rules))
  spec = describe(config, d_in)
  tx = optim.make_optimizer(config.optim, config.train.steps, spec.architecture.UNIT_NORM_DECODER)
  state, _, _ = abstract_train_state(spec, mesh, rules, tx)
  members = spec.members
  batch = config.train.batch_size
  x = jax.ShapeDtypeStruct((batch, d_in), jnp.float32,
                           sharding=NamedSharding(mesh, sharding.batch_spec(rules)))
  act_dtype = jnp.result_type(jnp.dtype(config.sae.param_dtype), jnp.float32)
  f = jax.ShapeDtypeStruct((batch, config.sae.d_sae), act_dtype, sharding=NamedSharding(
      mesh, sharding.logical_spec(("batch", "features"), rules)))
  params = tree_device_bytes(state.params)
  stats = tree_device_bytes((state.step, state.rng, state.tokens_since_fired,
                             state.window_fire_count, state.window_tokens))
  buffers = spec.architecture.ACTIVATION_BUFFERS
  acts = members * buffers * device_bytes(f)
  memory = (
      Term("params", params, _spec_note(state.params)),
      Term("opt_state", tree_device_bytes(state.opt_state), "Adam mu and nu (+ counts)"),
      Term("gradients", params, "one gradient per parameter, same shardings"),
      Term("batch", device_bytes(x), f"x {list(x.shape)} {x.sharding.spec}"),
      Term("activations", acts, f"{members * buffers} x [batch, d_sae] "
                                f"{f.sharding.spec} (forward + backward)"),
      Term("stats", stats, "step, rng, feature firing counters"),
  )
  local_rows = batch // shape["data"]
  n_decoder = spec.architecture.DECODER_PRODUCTS
  collectives = []
  if shape["data"] > 1:
    collectives.append(Collective("gradients", "all-reduce", "data", shape["data"], params))
  if shape["model"] > 1:
    collectives.append(Collective(
        "decoder partial sums f @ W_dec [batch/data, d_in]", "all-reduce", "model",
        shape["model"], local_rows * d_in * jnp.dtype(act_dtype).itemsize, members * n_decoder))
  title = (f"{spec.name} SAE d_in={d_in} d_sae={config.sae.d_sae} batch={batch}"
           + (f" x {members} sweep members" if members > 1 else ""))
  return Plan(title, shape, memory, tuple(collectives))


# ----------------------------------------------------------------------------- LM (harvest)

def lm_param_shapes(lm_config) -> dict[str, tuple[int, ...]]:
  """Dotted parameter path -> shape of our Flax LM for an `LMConfig`, without allocating."""
  from flax import nnx
  from gsae_jax.lm.model import Transformer
  abstract = nnx.eval_shape(lambda: Transformer(lm_config))
  flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  return {".".join(map(str, path)): tuple(v.get_value().shape) for path, v in flat}


def lm_plan(lm_config, shape: Mapping[str, int], *, batch: int, seq: int, stop_layer: int,
            strategy: str = "fsdp_tp", dtype: Any = jnp.float32, sites: int = 1) -> Plan:
  """Per-device plan of one LM forward pass over [batch, seq] tokens up to block `stop_layer`
  (harvest stops at its deepest site), parameters laid out by `gsae_jax.lm.partition` under
  `strategy`, keeping `sites` [batch, seq, d_model] outputs."""
  from gsae_jax.lm import partition
  mesh = abstract_mesh(shape)
  itemsize = jnp.dtype(dtype).itemsize
  shapes = lm_param_shapes(lm_config)
  specs = {p: partition.spec_for(p, s, mesh, strategy) for p, s in shapes.items()}
  per_device = {p: math.prod(NamedSharding(mesh, specs[p]).shard_shape(s)) * itemsize
                for p, s in shapes.items()}
  full = {p: math.prod(s) * itemsize for p, s in shapes.items()}
  params = sum(per_device.values())
  data, model = shape["data"], shape["model"]
  if batch % data:
    raise PlanError(f"batch_size={batch}: expected a multiple of mesh data={data}")
  rows = batch // data
  c = lm_config
  heads_local = c.n_heads // model if c.n_heads % model == 0 and "tp" in strategy else c.n_heads
  mlp_local = c.d_mlp // model if c.d_mlp % model == 0 and "tp" in strategy else c.d_mlp
  # Peak of one block: residual in/out and the normed input [rows, seq, d_model], q/k/v/z
  # [rows, seq, heads * head_dim], float32 scores and probabilities [rows, heads, seq, seq],
  # MLP gate/up/hidden [rows, seq, d_mlp].
  acts = (3 * rows * seq * c.d_model * itemsize
          + 4 * rows * seq * heads_local * c.head_dim * itemsize
          + 2 * rows * heads_local * seq * seq * 4
          + 3 * rows * seq * mlp_local * itemsize)
  memory = (
      Term("params", params, f"{len(shapes)} arrays, strategy {strategy} (gsae_jax.lm.partition"
                             f"): " + ", ".join(f"{p} {list(shapes[p])} {specs[p]}" for p in sorted(
                                 shapes, key=lambda p: -math.prod(shapes[p]))[:2])),
      Term("tokens", rows * seq * 4, f"int32 [{batch}, {seq}] P('data')"),
      Term("activations", acts, "peak of one block (residual, q/k/v/z, scores, MLP hidden)"),
      Term("site output", sites * rows * seq * c.d_model * 4,
           f"{sites} x float32 [batch, seq, d] (one per hook site)"),
  )
  layers = stop_layer + 1
  block = [p for p in shapes if p.startswith("blocks.0.")]
  gathered = sum(full[p] for p in block) - sum(per_device[p] for p in block)
  collectives = []
  if data > 1 and "fsdp" in strategy and gathered:
    collectives.append(Collective("FSDP weight gather per block", "all-gather", "data", data,
                                  sum(per_device[p] for p in block), layers))
  if model > 1 and "tp" in strategy:
    collectives.append(Collective("tensor-parallel attention/MLP outputs [rows, seq, d_model]",
                                  "all-reduce", "model", model, rows * seq * c.d_model * itemsize,
                                  2 * layers))
  return Plan(f"LM forward {c.model_id or c.family} to block {stop_layer}, batch {batch} x {seq}",
              dict(shape), memory, tuple(collectives))


def lm_config_from_hf_config(hf_config, model_id: str = ""):
  """An `LMConfig` from a transformers config alone (no weights; rotary tables left out, which
  the plan does not need)."""
  from gsae_jax.lm.config import FAMILIES, LMConfig, _common, check_supported
  family = check_supported(hf_config, model_id or "config")
  facts = dict(_common(hf_config), **FAMILIES[hf_config.model_type][1](hf_config))
  return LMConfig(family=family, model_id=model_id, **facts)


def parse_memory_limit(gib: float | None, devices: Sequence[Any] | None = None) -> int | None:
  """Bytes per device: the flag, else the local accelerator's own limit, else None (unknown)."""
  if gib is not None:
    return int(gib * GiB)
  for d in devices or ():
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
      return int(stats["bytes_limit"])
  return None


def host_available_bytes() -> int | None:
  """The host memory the kernel can still hand out (MemAvailable), else free pages; None when
  neither is known."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def memory_limit(devices: Sequence[Any]) -> tuple[int, str] | None:
  """(bytes per device, where the number comes from) for this process's `devices`: an
  accelerator's own `bytes_limit`, or on CPU the host's available memory shared by its local CPU
  devices (they all allocate from it); None when unknown."""
  limit = parse_memory_limit(None, devices)
  if limit is not None:
    return limit, "the device's bytes_limit"
  cpus = [d for d in devices if d.platform == "cpu"
          and d.process_index == jax.process_index()]
  host = host_available_bytes()
  if not cpus or host is None:
    return None
  return host // len(cpus), f"{_fmt(host)} of available host memory / {len(cpus)} CPU devices"


def check_sae_fits(config, d_in: int, devices: Sequence[Any]) -> None:
  """Refuses, before anything is allocated, an SAE train step whose per-device plan (on the
  run's mesh over all `jax.devices()`) exceeds the memory of this process's `devices`: PlanError
  naming the overflowing term. Shapes only: a 2**34-latent dictionary costs nothing to plan."""
  known = memory_limit(list(getattr(devices, "flat", devices)))  # a list or mesh.devices
  if known is None:
    return
  limit, source = known
  p = sae_plan(config, d_in, jax.device_count())
  try:
    p.check(limit)
  except PlanError as e:
    raise PlanError(f"{e}; limit: {source}; reduce config.sae.d_sae or config.train.batch_size, "
                    "or shard over more devices (config.mesh); --dry_run prints the full plan"
                    ) from None


def report(p: Plan, limit_bytes: int | None) -> str | None:
  """Prints the plan; returns the refusal message when it does not fit, else None."""
  print(p.format(limit_bytes), flush=True)
  try:
    p.check(limit_bytes)
  except PlanError as e:
    return str(e)
  if limit_bytes is None:
    print("no device memory limit known (CPU): pass --device_memory_gib to check the fit",
          flush=True)
  return None


def grid_config(sweep_config, arch: str, grid: Sequence[float]):
  """The training config of one architecture's grid in a sweep block (`sweep.train` with the
  architecture's overrides), unvalidated: what `runs.sweep.grid_configs` trains."""
  tc = sweep_config.train.copy_and_resolve_references()
  tc.update(sweep_config.get("overrides", {}).get(arch, {}))  # e.g. the baseline's own LR
  tc.sae.architecture = arch
  tc.sweep.coefficient = (sweep_config.get("grid_coefficients") or {}).get(arch, "")
  tc.sweep.grid = tuple(grid)
  return tc


def _is_main_job(config) -> bool:
  """A `launch/main_job.py` config (harvest + sweep blocks) rather than one stage's config."""
  return "harvest" in config and "sweep" in config


def dry_run_sae(config, num_devices: int | None, memory_gib: float | None,
                slice_name: str | None = None) -> str | None:
  """`launch/train.py --dry_run`: prints the plan (of every architecture's grid, for a main-job
  config, with the LM it holds for loss recovered); returns the first refusal or None."""
  num_devices, memory_gib = slice_target(slice_name, num_devices, memory_gib)
  devices = jax.devices() if num_devices is None else None
  num_devices = num_devices or len(devices)
  limit = parse_memory_limit(memory_gib, devices)
  if not _is_main_job(config):
    return report(sae_plan(config, config.data.d_in, num_devices), limit)
  lm_params = harvest_plan(config.harvest, num_devices).term("params")
  refusals = []
  for arch, grid in config.sweep.grids.items():
    if not grid:
      continue
    p = sae_plan(grid_config(config.sweep, arch, grid), config.sweep.train.data.d_in, num_devices)
    p = dataclasses.replace(p, title=f"sweep grid {arch}: {p.title}", memory=p.memory + (Term(
        "LM params", lm_params.bytes, f"held by the main job for loss recovered; {lm_params.note}"),))
    refusals.append(report(p, limit))
  return next((r for r in refusals if r), None)


def _known_hf_configs() -> dict[str, Any]:
  """transformers configs of the paper's models with the values of their config.json on the
  Hugging Face hub (rotary settings left out: plans need shapes only; Gemma's legacy "gelu" is
  written as the tanh form transformers reads it as), so that their dry runs need no network."""
  from transformers import GemmaConfig, GPTNeoXConfig
  return {
      "google/gemma-7b": GemmaConfig(
          vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
          num_attention_heads=16, num_key_value_heads=16, head_dim=256,
          hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, rms_norm_eps=1e-6,
          bos_token_id=2, eos_token_id=1, pad_token_id=0),
      "EleutherAI/pythia-2.8b": GPTNeoXConfig(
          vocab_size=50304, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
          num_attention_heads=32, hidden_act="gelu", max_position_embeddings=2048,
          layer_norm_eps=1e-5, use_parallel_residual=True, attention_bias=True,
          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0),
  }


def harvest_hf_config(c):
  """The transformers config of the harvest's model, read without its weights: built in for the
  paper's models (`_known_hf_configs`), else config.json (or a GGUF's metadata)."""
  from transformers import AutoConfig
  from gsae_jax.lm.convert import resolve
  known = _known_hf_configs()
  if c.model in known:
    return known[c.model]
  where, gguf, revision = resolve(c.model, c.gguf_file or None, c.revision or None)
  if gguf is not None:
    return AutoConfig.from_pretrained(where, gguf_file=gguf)
  return AutoConfig.from_pretrained(where, revision=revision)


def harvest_plan(c, num_devices: int) -> Plan:
  """The harvest's LM forward plan up to its site's block on `num_devices` devices, with the
  harvest config's `mesh` (data, model, strategy; default: all devices on 'data', FSDP)."""
  from gsae_jax.lm.language_model import parse_site
  mesh_config = c.get("mesh") or {}
  shape = mesh_shape(mesh_config.get("data", -1), mesh_config.get("model", 1), num_devices)
  lm_config = lm_config_from_hf_config(harvest_hf_config(c), c.model)
  sites = c.get("sites") or ()
  try:  # the deepest of config.sites, else config.layer
    layers = [parse_site(s, lm_config.n_layers)[0] for s in sites] or [
        parse_site(f"blocks.{c.layer}.{c.site}", lm_config.n_layers)[0]]
  except ValueError as e:
    raise PlanError(f"config.{'sites' if sites else 'layer'}: {e}") from None
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[c.model_dtype]
  return lm_plan(lm_config, shape, batch=c.batch_size, seq=c.context_length,
                 stop_layer=max(layers), strategy=mesh_config.get("strategy", "fsdp"),
                 dtype=dtype, sites=max(1, len(sites)))


def dry_run_harvest(c, num_devices: int | None, memory_gib: float | None,
                    slice_name: str | None = None) -> str | None:
  """`launch/harvest.py --dry_run` (of a harvest config, or a main-job config's harvest block):
  prints the LM's plan; returns the refusal message or None."""
  num_devices, memory_gib = slice_target(slice_name, num_devices, memory_gib)
  devices = jax.devices() if num_devices is None else None
  p = harvest_plan(c.harvest if _is_main_job(c) else c, num_devices or len(devices))
  return report(p, parse_memory_limit(memory_gib, devices))
