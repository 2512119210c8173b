r"""Coefficient sweeps of several SAE architectures on the same shards, with Pareto frontiers.

  python -m launch.sweep --config=experiments/sweep_gemma3_270m.py --out=DIR \
      --config.train.data.path=SHARDS --config.eval.shards_path=HELDOUT_SHARDS

Each architecture in `config.grids` trains its whole grid (values of its first named coefficient,
or of `config.grid_coefficients.<architecture>`) in one data pass (`config.train.sweep`, a
`jax.vmap` over the grid inside one jitted step), in `DIR/<architecture>/`. Every member is then
evaluated on held-out activations and, with `eval.loss_recovered`, in the LM. Writes
`DIR/results.json`, `DIR/report.md` and the PNG plots.

Equal-L0 mode, `--config.target_l0.targets=(8,16,32)`: each grid is first the start of a search
(`DIR/target_l0/<architecture>/round_<r>`, `search.json`) for the coefficient within
`target_l0.tolerance` of each target L0, and then trained at those coefficients; the report
states each architecture's loss recovered and FVU at every target, and the L0 the baseline needs
to reach Gated's loss recovered (`target_l0.ratio`).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from gsae_jax.runs import sweep
from launch.common import load_config, parse_flags, run_guarded

_CONFIG = config_flags.DEFINE_config_file("config", None, "Sweep config file.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  del argv
  run_guarded(lambda: sweep.run_sweep(load_config(_CONFIG), _OUT.value))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
