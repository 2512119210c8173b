"""Shared bits of the absl entry points."""

import sys

from absl import flags, logging


def quiet_library_logs() -> None:
  """Library INFO logs (Orbax, JAX) drown the progress lines; keep WARNING and above unless
  the user asked for a --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run_guarded(fn, *args) -> None:
  """Runs a pipeline stage for a launcher: quiet library logs; a preemption is reported (re-run
  to resume), and bad configs, data or checkpoints end the process with a one-line error."""
  from gsae_jax.checkpoint import CheckpointError
  from gsae_jax.runs.sweep import Preempted

  quiet_library_logs()
  try:
    fn(*args)
  except Preempted as e:
    print(f"{e}; re-run the same command to resume", flush=True)
  except (CheckpointError, ValueError) as e:
    sys.exit(f"error: {e}")
