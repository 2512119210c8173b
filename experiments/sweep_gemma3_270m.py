"""Gated, baseline, JumpReLU and TopK sweeps on Gemma 3 270M layer-6 residual-stream shards
(CPU-sized: a few hundred steps per architecture).

    python -m launch.sweep --config=experiments/sweep_gemma3_270m.py --out=runs/sweep \\
        --config.train.data.path=SHARDS --config.eval.shards_path=HELDOUT \\
        --config.eval.text.skip_windows=WINDOWS_USED_BY_THE_HARVEST
"""

import ml_collections

from experiments import harvest_gemma3_270m_cpu, shards


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  t = shards.get_config()
  t.sae.d_sae = 2048                  # 3.2 x d_model: CPU-sized
  t.sae.init_b_dec = "mean"           # Gemma's residual stream has a large mean component
  t.optim.lr = 1e-3                   # short runs: higher than the paper's 3e-4
  t.optim.warmup_steps = 50
  t.optim.decay_fraction = 0.2
  for block in (t.sae.gated, t.sae.baseline):
    block.l1_warmup_steps = 50
  t.sae.jumprelu.l0_warmup_steps = 50  # the paper's 10k steps are longer than these runs
  # A short run moves log(theta) by at most ~lr per step (Adam), so theta must start near the
  # pre-activations' scale: 0.04 (paper units, x sqrt(d_in) = 1.0 here) instead of 0.001.
  t.sae.jumprelu.init_threshold = 0.04
  t.train.batch_size = 1024
  t.train.steps = 600
  t.train.log_every = 50
  t.train.feature_window_tokens = 200_000
  t.checkpoint.save_every = 200
  c.train = t

  # architecture -> values of its first named coefficient (lambda for Gated and the baseline, the
  # L0 coefficient for JumpReLU, k for TopK), chosen so that the L0 ranges overlap
  c.grids = ml_collections.ConfigDict()
  c.grids.gated = (1.0, 2.0, 4.0)     # lambdas on normalised activations (E||x||^2 = d_model)
  c.grids.baseline = (0.5, 1.0, 2.0)
  c.grids.jumprelu = (0.03, 0.3, 3.0)
  c.grids.topk = (8, 20, 50)

  # Equal-L0 mode (gsae_jax/runs/target_l0.py): non-empty targets replace each grid by the
  # coefficients whose L0 is within `tolerance` of each target, searched from the grid above
  # (k is the L0 itself: no search); the report compares the architectures at these L0s.
  c.target_l0 = ml_collections.ConfigDict()
  c.target_l0.targets = ()            # e.g. (8, 16, 32): inside every grid's L0 range above
  c.target_l0.tolerance = 0.1         # relative
  c.target_l0.search_steps = 0        # 0: full-length runs (a shorter, compressed schedule
                                      # ends at other L0s: see BUILD_NOTES)
  c.target_l0.rounds = 3              # refinements after the grid: one member per unmet target
  c.target_l0.measure_tokens = 32_768  # L0 measured on the stream's next activations
  c.target_l0.ratio = ("gated", "baseline")  # headline: baseline L0 for Gated's loss recovered

  c.eval = ml_collections.ConfigDict()
  c.eval.shards_path = ""             # held-out activations ('' = skip activation metrics)
  c.eval.max_tokens = 65_536
  c.eval.loss_recovered = True
  c.eval.num_sequences = 16           # held-out text windows for loss recovered
  c.eval.lm_batch_size = 4
  c.eval.text = harvest_gemma3_270m_cpu.get_config()  # model + text + context + skip_windows
  return c
