"""The main job on the embedded default LM (Gemma 3 270M, offline), sized for 2 CPU cores:
harvest layer-6 residual-stream activations of the embedded corpus, train Gated and baseline SAE
lambda grids, evaluate them (held-out activations + loss recovered), pick the Gated/baseline pair
of closest L0, export both, and write a report.

    python -m launch.main_job --config=experiments/gemma3_270m.py --out=runs/gemma3-270m
"""

import ml_collections

from experiments import harvest_gemma3_270m_cpu, sweep_gemma3_270m


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.harvest = harvest_gemma3_270m_cpu.get_config()   # model, site, layer 6, 128-token windows
  c.train_tokens = 300_000
  c.heldout_tokens = 32_768
  c.epochs = 2                        # passes over the training tokens (sets train.steps)
  c.sweep = sweep_gemma3_270m.get_config()
  return c
