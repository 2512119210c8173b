r"""Harvests one site's activations from a language model into a shard folder.

  python -m launch.harvest --config=experiments/harvest_gemma3_270m.py \
      --config.layer=6 --config.output_dir=/tmp/harvest/gemma3-270m-l6

Re-running the same command after a stop continues after the last complete shard.
"""

from __future__ import annotations

import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from gsae_jax import distributed, plan
from gsae_jax.errors import ConfigError
from gsae_jax.runs import harvesting
from launch.common import load_config, parse_flags, run_guarded

_CONFIG = config_flags.DEFINE_config_file("config", None, "Harvest config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
_DIST = distributed.define_flags()  # --distributed, --coordinator_address, ..., --dry_run


def _dry_run() -> None:
  """The LM's plan from its config.json alone: no weights, no text, nothing written."""
  config = load_config(_CONFIG)
  harvesting.validate(config)
  refused = plan.dry_run_harvest(config, _DIST.dry_run_devices.value,
                                 _DIST.device_memory_gib.value)
  sys.exit(f"dry run: {refused}" if refused else 0)


def _harvest() -> None:
  config = load_config(_CONFIG)
  if distributed.initialize_from_flags(_DIST) and jax.process_count() > 1:
    raise ConfigError("--distributed: multi-process harvest is not supported yet: shards are "
                      "written by one process; run one harvest per host on disjoint text "
                      "(config.skip_windows) instead")
  m = harvesting.run(config)  # validates and checks the output folder before loading the LM
  if m["token_count"] < config.num_tokens:
    print(f"warning: the text ran out after {m['token_count']:,} of {config.num_tokens:,} tokens",
          flush=True)
  print(f"harvested {m['token_count']:,} tokens of {m['site']} (d={m['d_model']}, {m['dtype']}) "
        f"in {len(m['shards'])} shards to {config.output_dir}; "
        f"E||x||^2={m['normalisation']['mean_sq_norm']:.4g}, scale={m['normalisation']['scale']:.4g}",
        flush=True)


def main(argv):
  del argv
  run_guarded(_dry_run if _DIST.dry_run.value else _harvest)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
