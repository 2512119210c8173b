"""Multi-process (multi-host) start: whether and how to call `jax.distributed.initialize`.

`init_kwargs` is a pure function of the flags and the environment, so the decision is testable
without a cluster: explicit coordinator flags win, then the JAX_* variables, then SLURM's, then a
TPU pod's; a single process returns None. One JAX process runs per host (TPU VM worker, SLURM
task); every process runs the same program on its own slice of each global batch.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

MODES = ("auto", "on", "off")
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")


def _first_slurm_host(node_list: str) -> str:
  """First host of a SLURM node list: 'gpu[003-010,12],cpu1' -> 'gpu003'."""
  cut = next((i for i, ch in enumerate(node_list) if ch in ",["), len(node_list))
  if cut == len(node_list) or node_list[cut] == ",":
    return node_list[:cut]
  rest = node_list[cut + 1:]
  end = next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))
  return node_list[:cut] + rest[:end]


def slurm_port(job_id: str) -> int:
  """The coordinator port JAX's own SLURM detection uses: in [61440, 65535], fixed per job."""
  return int(job_id) % 2**12 + (65535 - 2**12 + 1)


def _tpu_pod(env: Mapping[str, str]) -> bool:
  """A multi-host TPU slice: the TPU VM runtime lists its workers in TPU_WORKER_HOSTNAMES."""
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def init_kwargs(mode: str = "auto", coordinator_address: str | None = None,
                num_processes: int | None = None, process_id: int | None = None,
                env: Mapping[str, str] | None = None) -> dict | None:
  """Keyword arguments for `jax.distributed.initialize`, or None to stay single-process.

  mode 'off': never. 'on': always (an empty dict lets JAX detect TPU pods, SLURM, MPI itself).
  'auto': initialise when the flags, JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID,
  SLURM_* (more than one task) or a multi-host TPU slice ask for it.
  """
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r}: expected one of {MODES}")
  if mode == "off":
    return None
  env = os.environ if env is None else env
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else _int_env(env, "JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else _int_env(env, "JAX_PROCESS_ID")
  if address or count is not None or index is not None:
    missing = [n for n, v in (("--coordinator_address", address), ("--num_processes", count),
                              ("--process_id", index)) if v is None]
    if missing:
      raise ValueError(f"multi-process flags: expected --coordinator_address, --num_processes and "
                       f"--process_id together, missing {missing}")
    if count < 1 or not 0 <= index < count:
      raise ValueError(f"--process_id={index}, --num_processes={count}: expected "
                       f"0 <= process_id < num_processes")
    if count == 1 and mode == "auto":
      return None
    return {"coordinator_address": address, "num_processes": count, "process_id": index}
  if all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
    return {"coordinator_address": f"{_first_slurm_host(env['SLURM_STEP_NODELIST'])}:"
                                   f"{slurm_port(env['SLURM_JOB_ID'])}",
            "num_processes": int(env["SLURM_NTASKS"]), "process_id": int(env["SLURM_PROCID"])}
  if _tpu_pod(env) or mode == "on":
    return {}  # JAX reads the TPU worker list (or other cluster) from the runtime itself
  return None


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment {name}: expected an integer, found {value!r}") from None


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """Calls `jax.distributed.initialize` when `init_kwargs` says so (before any other JAX use);
  returns whether it did. CPU processes exchange collectives through gloo."""
  kwargs = init_kwargs(mode, coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def check_process_batch_slices(mesh: Mesh, batch_axis: str | tuple | None = "data") -> None:
  """The data pipeline gives process p rows [p B/P, (p+1) B/P) of each global batch; that is
  only the slice its devices hold if processes split the mesh's batch axis in process order.

  Raises ValueError naming the mesh otherwise (e.g. processes along 'model', which would need
  every process to read the whole batch).
  """
  count = jax.process_count()
  if count == 1:
    return
  axes = () if batch_axis is None else (batch_axis,) if isinstance(batch_axis, str) else batch_axis
  names = list(mesh.axis_names)
  devices = np.moveaxis(mesh.devices, [names.index(a) for a in axes], range(len(axes)))
  groups = devices.reshape(int(np.prod([mesh.shape[a] for a in axes], dtype=int)), -1)
  owners = [sorted({d.process_index for d in row}) for row in groups]
  per = len(owners) // count
  expected = [[p] for p in range(count) for _ in range(per)]
  if len(owners) % count or owners != expected:
    raise ValueError(f"mesh {dict(mesh.shape)} over {count} processes: each process must hold a "
                     f"contiguous 1/{count} of the batch axis {batch_axis!r} in process order; "
                     f"found batch slices owned by processes {owners}. Make mesh.data a multiple "
                     f"of the process count and mesh.model divide the devices per process")


def is_primary() -> bool:
  """Process 0 writes the run's files (metrics, params); every process writes its checkpoint part."""
  return jax.process_index() == 0


def to_host(tree: Any) -> Any:
  """Full numpy values of a pytree of global arrays on every process (sharded arrays span
  processes in a multi-host run, so `jax.device_get` alone cannot read them)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


def define_flags(dry_run: bool = True):
  """The absl flags every launch/ entry point shares: multi-process start and (with `dry_run`)
  the dry run. Returns the flag holders as attributes (`.distributed`, `.coordinator_address`,
  ...)."""
  from types import SimpleNamespace
  from absl import flags
  from gsae_jax.plan import SLICES
  holders = SimpleNamespace(
      distributed=flags.DEFINE_enum(
          "distributed", "auto", list(MODES),
          "Multi-process start: 'auto' initialises jax.distributed when the flags below, "
          "JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, SLURM_* (>1 task) or a "
          "multi-host TPU slice ask for it; 'on' always (JAX detects the cluster); 'off' never."),
      coordinator_address=flags.DEFINE_string(
          "coordinator_address", None, "host:port of process 0's coordinator (GPU clusters, "
          "local multi-process runs)."),
      num_processes=flags.DEFINE_integer("num_processes", None, "Processes in the job."),
      process_id=flags.DEFINE_integer("process_id", None, "This process's index in [0, n)."),
  )
  if not dry_run:
    return holders
  holders.dry_run = flags.DEFINE_boolean(
      "dry_run", False, "Print the per-device memory and communication plan from abstract "
      "shapes (no weights, no data) and exit; refuses (exit 1) a plan that does not fit.")
  holders.dry_run_devices = flags.DEFINE_integer(
      "dry_run_devices", None, "Devices to plan for (default: the devices present).")
  holders.device_memory_gib = flags.DEFINE_float(
      "device_memory_gib", None, "Memory per device for the dry run's check (default: the "
      "accelerator's own limit; none on CPU).")
  holders.dry_run_slice = flags.DEFINE_enum(
      "dry_run_slice", None, list(SLICES), "Plan for this machine "
      "(gsae_jax.plan.SLICES: chips and HBM per chip); sets --dry_run_devices and "
      "--device_memory_gib unless they are given.")
  return holders


def initialize_from_flags(holders) -> bool:
  """`initialize` with the values of `define_flags()`'s holders."""
  return initialize(holders.distributed.value, holders.coordinator_address.value,
                    holders.num_processes.value, holders.process_id.value)
