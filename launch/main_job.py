r"""The main job: LM activations -> Gated and baseline SAEs -> evaluation -> export -> report.

  python -m launch.main_job --config=experiments/gemma3_270m.py --out=runs/gemma3-270m

Stages (each resumable: re-running the same command skips finished work):
  1. harvest `train_tokens` activations, then `heldout_tokens` from the text windows after them;
  2. train the Gated and baseline lambda grids (launch.sweep), one data pass per architecture;
  3. evaluate every SAE on the held-out activations and by loss recovered on held-out text;
  4. pick the Gated / baseline pair of closest L0, export both (.npz and SAELens);
  5. write `<out>/report.md` with tables and plots.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from gsae_jax.checkpoint import CheckpointError
from gsae_jax.runs import main_job, sweep
from launch.common import quiet_library_logs

_CONFIG = config_flags.DEFINE_config_file("config", None, "Main job config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv
  quiet_library_logs()
  try:
    main_job.run_main(_CONFIG.value, _OUT.value)
  except sweep.Preempted as e:
    print(f"{e}; re-run the same command to resume", flush=True)
  except (CheckpointError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
