r"""Harvests hook-site activations of a language model into shard folders.

  python -m launch.harvest --config=experiments/harvest_gemma3_270m.py \
      --config.layer=6 --config.output_dir=/tmp/harvest/gemma3-270m-l6

Re-running the same command after a stop continues after the shards already written.
`--config.sites="('blocks.3.resid_post', 'blocks.6.mlp_out')"` feeds one folder per site
(output_dir/<site>) from one LM pass. The LM runs on `config.mesh` (data x model, strategy
fsdp | tp | fsdp_tp | replicated). Several processes (one per host; here:
launch/local_multiprocess.sh, or --coordinator_address/--num_processes/--process_id) share the
text: process p harvests shards p, p + P, ... into the same (shared) output folder, every LM call
taking batch_size / P windows from each process, and process 0 commits the one manifest when all
are done; a re-run after a stop, with any process count, resumes every process's part.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from gsae_jax import distributed, plan
from gsae_jax.runs import harvesting
from launch.common import load_config, parse_flags, run_guarded

_CONFIG = config_flags.DEFINE_config_file("config", None, "Harvest config file.", lock_config=True)
flags.mark_flags_as_required(["config"])
_DIST = distributed.define_flags()  # --distributed, --coordinator_address, ..., --dry_run


def _dry_run() -> None:
  """The LM's plan from its config.json alone (built in for the paper's models): no weights, no
  text, nothing written. A main-job config (experiments/paper_gemma7b.py) plans its harvest."""
  config = load_config(_CONFIG)
  if "harvest" in config:  # the main job sets the output folder under its --out
    harvest = config.harvest.copy_and_resolve_references()
    harvest.output_dir = harvest.output_dir or "<--out>/shards/train"
    harvesting.validate(harvest)
  else:
    harvesting.validate(config)
  refused = plan.dry_run_harvest(config, _DIST.dry_run_devices.value,
                                 _DIST.device_memory_gib.value, _DIST.dry_run_slice.value)
  sys.exit(f"dry run: {refused}" if refused else 0)


def _harvest() -> None:
  config = load_config(_CONFIG)
  distributed.initialize_from_flags(_DIST)
  # validates and checks the output folders before loading the LM
  manifests = harvesting.run_sites(config)
  if not distributed.is_primary():
    return
  for folder, m in manifests.items():
    if m["token_count"] < config.num_tokens:
      print(f"warning: the text ran out after {m['token_count']:,} of {config.num_tokens:,} "
            "tokens", flush=True)
    print(f"harvested {m['token_count']:,} tokens of {m['site']} (d={m['d_model']}, "
          f"{m['dtype']}) in {len(m['shards'])} shards to {folder}; "
          f"E||x||^2={m['normalisation']['mean_sq_norm']:.4g}, "
          f"scale={m['normalisation']['scale']:.4g}", flush=True)


def main(argv):
  del argv
  run_guarded(_dry_run if _DIST.dry_run.value else _harvest)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
