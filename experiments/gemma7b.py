"""Gated SAE at the paper's largest scale: Gemma 7B residual stream, 2^17 features.

The paper (arXiv 2404.16014) trains its Gemma-7B SAEs with M = 131,072 features on d_model = 3072
sites; batch size 4096 and LR 3e-4 are GATED_SAE.md's defaults. The shard folder comes from a
Gemma-7B harvest. Check the memory plan first, without any weights or devices:

    python -m launch.train --config=experiments/gemma7b.py --workdir=/tmp/g7 \\
        --dry_run --dry_run_devices=16 --device_memory_gib=16
"""

from experiments import shards


def get_config():
  c = shards.get_config()
  c.data.d_in = 3072                  # Gemma 7B d_model
  c.sae.d_sae = 2**17                 # 131,072 features, as in the paper
  c.train.batch_size = 4096
  c.train.steps = 120_000             # ~500M tokens at 4096 tokens per step
  c.mesh.data = -1                    # data parallel over the rest
  c.mesh.model = 8                    # dictionary split over 8 devices along the feature axis
  return c
