"""Sparse features in superposition with known ground truth: the first main job.

    python -m launch.train --config=experiments/synthetic.py --workdir=/tmp/gsae
"""

from experiments import base


def get_config():
  c = base.get_config()
  c.data.source = "synthetic"
  c.data.d_in = 64
  c.data.m_true = 256                 # true features
  c.data.fire_prob = 4 / 256          # expected true L0 = 4
  c.data.mag_low = 0.5
  c.data.mag_high = 1.5
  c.data.seed = 1234                  # ground-truth dictionary and batch stream

  c.sae.d_sae = 512
  c.sae.gated.l1_coefficient = 0.1
  c.sae.baseline.l1_coefficient = 0.1
  # Per-architecture settings for this data (true L0 = 4 of 256 features):
  c.sae.jumprelu.l0_coefficient = 1.2
  c.sae.jumprelu.l0_warmup_steps = 1000  # the paper's 10k steps are longer than this whole run
  c.sae.topk.k = 4
  c.sae.batchtopk.k = 4
  c.sae.batchtopk.aux_k_coefficient = 1.0  # the paper's 1/32 revives too few latents here:
                                           # mean max cosine 0.94 (1.0: 0.975)
  c.sae.matryoshka.k = 4
  c.sae.matryoshka.aux_k_coefficient = 1.0
  c.sae.matryoshka.prefix_fractions = (0.5, 1.0)  # no hierarchy here: the first 256 latents
                                                  # can hold all 256 true features
  c.optim.lr = 3e-3
  c.optim.warmup_steps = 100
  c.optim.decay_fraction = 0.2
  c.train.steps = 3000
  c.train.batch_size = 1024
  c.train.log_every = 250
  c.train.feature_window_tokens = 200_000
  return c
