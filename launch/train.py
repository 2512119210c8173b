r"""Trains an SAE from an ml_collections config.

  python -m launch.train --config=experiments/synthetic.py --workdir=/tmp/gsae \
      --config.sae.architecture=gated --config.sae.gated.l1_coefficient=0.1

Prints progress and writes `metrics.jsonl` (one JSON object per log step) and `config.json` to
the workdir; the final parameters go to `params.npz`. Checkpoints go to `<workdir>/checkpoints`;
re-running the same command resumes from the latest one (bit-identical on CPU). A workdir holds
one run (`run.json`): a re-run with a changed hyper-parameter or other data is refused unless
named in --allow_changes (recorded in `history.jsonl`), and a second process on a workdir in use is
refused. SIGTERM or SIGINT (preemption, Ctrl-C) saves a checkpoint at the current step and exits
cleanly; a second one exits at once. Bad input ends with one line `error: ...` and status 1.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from gsae_jax import distributed, plan
from gsae_jax.runs import training
from launch.common import load_config, parse_flags, run_guarded

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics and outputs.")
_RESTORE_STEP = flags.DEFINE_integer(
    "restore_step", None, "Restore this checkpoint step instead of the latest (e.g. when the "
    "latest is damaged); later checkpoints are moved aside, not deleted.")
_ALLOW_CHANGES = flags.DEFINE_list(
    "allow_changes", [], "Config fields (e.g. optim.lr,train.steps; a prefix such as source "
    "covers its fields) allowed to differ from the run recorded in the workdir: deliberate "
    "changes on resume, recorded in <workdir>/history.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])
_DIST = distributed.define_flags()  # --distributed, --coordinator_address, ..., --dry_run


def _dry_run(config) -> None:
  """Shapes only: no weights, no data, no cluster; a main-job config plans each grid."""
  refused = plan.dry_run_sae(config, _DIST.dry_run_devices.value, _DIST.device_memory_gib.value,
                             _DIST.dry_run_slice.value)
  sys.exit(f"dry run: {refused}" if refused else 0)


def _main() -> None:
  config = load_config(_CONFIG)
  if _DIST.dry_run.value:
    _dry_run(config)
  distributed.initialize_from_flags(_DIST)
  training.run(config, _WORKDIR.value, _RESTORE_STEP.value, tuple(_ALLOW_CHANGES.value))


def main(argv):
  del argv
  run_guarded(_main)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
