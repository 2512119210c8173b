r"""The main job: LM activations -> Gated and baseline SAEs -> evaluation -> export -> report.

  python -m launch.main_job --config=experiments/gemma3_270m.py --out=runs/gemma3-270m

Stages (re-running the same command resumes: finished harvests and training are skipped,
evaluation, export and report are recomputed):
  1. harvest `train_tokens` activations, then `heldout_tokens` from the text windows after them;
  2. train the Gated and baseline lambda grids (launch.sweep), one data pass per architecture;
  3. evaluate every SAE on the held-out activations and by loss recovered on held-out text;
  4. pick the Gated / baseline pair of closest L0, export both (.npz and SAELens);
  5. write `<out>/report.md` with tables and plots.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from gsae_jax.runs import main_job
from launch.common import run_guarded

_CONFIG = config_flags.DEFINE_config_file("config", None, "Main job config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv
  run_guarded(main_job.run_main, _CONFIG.value, _OUT.value)


if __name__ == "__main__":
  app.run(main)
