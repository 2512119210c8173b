"""The paper's Pythia-2.8B setting (arXiv 2404.16014), for users with accelerators.

    python -m launch.main_job --config=experiments/paper_pythia2p8b.py --out=runs/paper-pythia \\
        --config.harvest.layer=16 --config.harvest.site=mlp_out

As experiments/paper_gemma7b.py (same sites, optimiser, learning rates and batch size from the
paper), with Pythia-2.8B (GPT-NeoX, d_model 2560, 32 layers; trained on the Pile, so the Pile is
the natural text source). Our choices where this config cannot be sure of the paper's exact value:
layer 16 of 32 by default, a dictionary of 2^15 = 32,768 features (12.8 x d_model), 2-billion
training tokens, 2048-token contexts, the lambda grids.
"""

from experiments import paper_gemma7b


def get_config():
  c = paper_gemma7b.get_config()
  c.harvest.model = "EleutherAI/pythia-2.8b"
  c.harvest.layer = 16
  c.harvest.context_length = 2048
  c.harvest.windows_per_shard = 8     # 8 x 2047 x 2560 x 4 B = 168 MB per shard
  c.sweep.train.data.d_in = 2560
  c.sweep.train.sae.d_sae = 2**15
  c.sweep.train.mesh.model = 4
  return c
