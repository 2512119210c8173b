r"""Trains an SAE from an ml_collections config.

  python -m launch.train --config=experiments/synthetic.py --workdir=/tmp/gsae \
      --config.sae.architecture=gated --config.sae.gated.l1_coefficient=0.1

Prints progress and writes `metrics.jsonl` (one JSON object per log step) and `config.json` to
the workdir; the final parameters go to `params.npz`. Checkpoints go to `<workdir>/checkpoints`;
re-running the same command resumes from the latest one (bit-identical on CPU). SIGTERM or
SIGINT (preemption, Ctrl-C) saves a checkpoint at the current step and exits cleanly.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from gsae_jax import distributed, plan
from gsae_jax.checkpoint import CheckpointError
from gsae_jax.runs import training
from launch.common import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and outputs.")
_RESTORE_STEP = flags.DEFINE_integer(
    "restore_step", None, "Restore this checkpoint step instead of the latest (e.g. when the "
    "latest is damaged); later checkpoints are moved aside, not deleted.")
flags.mark_flags_as_required(["config", "workdir"])
_DIST = distributed.define_flags()  # --distributed, --coordinator_address, ..., --dry_run

def main(argv):
  del argv
  quiet_library_logs()
  config = _CONFIG.value
  name = config_flags.get_config_filename(flags.FLAGS["config"])
  if _DIST.dry_run.value:  # shapes only: no weights, no data, no cluster
    try:
      refused = plan.dry_run_sae(config, _DIST.dry_run_devices.value, _DIST.device_memory_gib.value)
    except ValueError as e:
      sys.exit(f"invalid config ({name}): {e}")
    sys.exit(f"dry run: {refused}" if refused else 0)
  distributed.initialize_from_flags(_DIST)
  try:
    training.run(config, _WORKDIR.value, _RESTORE_STEP.value)
  except CheckpointError as e:
    sys.exit(f"error: {e}")
  except ValueError as e:
    sys.exit(f"invalid config or data ({name}): {e}")


if __name__ == "__main__":
  app.run(main)
