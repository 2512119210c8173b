r"""The main job: LM activations -> SAEs of several architectures -> evaluation -> export -> report.

  python -m launch.main_job --config=experiments/gemma3_270m.py --out=runs/gemma3-270m

Stages (re-running the same command resumes: finished harvests and training are skipped,
evaluation, export and report are recomputed):
  1. harvest `train_tokens` activations, then `heldout_tokens` from the text windows after them;
  2. train each architecture's coefficient grid (`sweep.grids`, as launch.sweep), one data pass
     per architecture;
  3. evaluate every SAE on the held-out activations and by loss recovered on held-out text;
  4. compare the architectures at equal L0 (each frontier interpolated in log L0 at the middle
     of the L0 range all cover), export each architecture's run nearest that L0 (.npz, SAELens);
  5. write `<out>/report.md` with tables and plots.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from gsae_jax.runs import main_job
from launch.common import load_config, parse_flags, run_guarded

_CONFIG = config_flags.DEFINE_config_file("config", None, "Main job config.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv
  run_guarded(lambda: main_job.run_main(load_config(_CONFIG), _OUT.value))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
