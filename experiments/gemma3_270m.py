"""The main job on the embedded default LM (Gemma 3 270M, offline), sized for 2 CPU cores:
harvest layer-6 residual-stream activations of the embedded corpus, train Gated, baseline,
JumpReLU and TopK grids on the same shards, evaluate them (held-out activations + loss
recovered), compare the architectures at equal L0, export each one's run nearest that L0, and
write a report.

    python -m launch.main_job --config=experiments/gemma3_270m.py --out=runs/gemma3-270m
"""

import ml_collections

from experiments import harvest_gemma3_270m_cpu, sweep_gemma3_270m


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.harvest = harvest_gemma3_270m_cpu.get_config()   # model, site, layer 6, 128-token windows
  c.train_tokens = 200_000            # four architectures' grids within 30 minutes
  c.heldout_tokens = 32_768
  c.epochs = 2                        # passes over the training tokens (sets train.steps)
  c.sweep = sweep_gemma3_270m.get_config()
  # Every architecture at the same four L0s (target-L0 search), inside all grids' L0 ranges.
  c.sweep.target_l0.targets = (8, 13, 20, 32)
  c.feature_browsers = ("gated",)     # architectures whose matched SAE gets a feature browser
  return c
