"""The paper's Gemma-7B setting (arXiv 2404.16014), for users with accelerators.

    python -m launch.main_job --config=experiments/paper_gemma7b.py --out=runs/paper-gemma7b \\
        --config.harvest.layer=20 --config.harvest.site=resid_post

What the paper specifies and we follow: Gemma-7B; sites = residual stream (post-block),
MLP output and attention output before the output projection (our `resid_post`, `mlp_out`,
`attn_z`); dictionary of 2^17 = 131,072 features; Adam with b1 = 0, b2 = 0.999; LR 3e-4 for every
Gated SAE; the baselines used LR 1e-3 (7.5e-4 for attention output) with the L2 term divided by
E||x||_2 (our activation normalisation to E||x||^2 = d_model plays that role; GATED_SAE.md
section 4); batch 4096; resampling of dead features for the baseline.

Plan it on a slice before renting one (no weights, no network; exit 1 names what does not fit):

    python -m launch.harvest --config=experiments/paper_gemma7b.py --dry_run --dry_run_slice=v5e-16
    python -m launch.train --config=experiments/paper_gemma7b.py --workdir=/tmp/p --dry_run \\
        --dry_run_slice=8xh100

What we chose where this config cannot be sure of the paper's exact value (check the paper for
your replication): layer 20 of 28 as the default site layer, 1024-token contexts, a 2-billion
token budget, the lambda grids below, and the Pile-like text source (set `harvest.text`).
"""

import ml_collections

from experiments import gemma3_270m, harvest_gemma3_270m


def get_config() -> ml_collections.ConfigDict:
  c = gemma3_270m.get_config()
  h = harvest_gemma3_270m.get_config()
  h.model = "google/gemma-7b"
  h.layer, h.site = 20, "resid_post"
  h.context_length = 1024
  h.windows_per_shard = 16            # 16 x 1023 x 3072 x 4 B = 200 MB per shard
  h.batch_size = 32                   # windows per LM call, split over the mesh's 'data' axis
  # Every device on 'data', LM weights split along d_model (FSDP): 32 GB of float32 Gemma-7B
  # is 2 GiB per chip of a v5e-16. See `launch/harvest.py --dry_run --dry_run_slice=v5e-16`.
  h.mesh.data, h.mesh.model, h.mesh.strategy = -1, 1, "fsdp"
  h.output_dir = ""                   # set by the main job under --out
  h.text.source = "hf"
  h.text.hf_name = "monology/pile-uncopyrighted"
  c.harvest = h
  c.train_tokens = 2_000_000_000
  c.heldout_tokens = 1_000_000
  c.epochs = 1

  t = c.sweep.train
  t.data.d_in = 3072
  t.sae.d_sae = 2**17
  t.sae.init_b_dec = "zeros"
  t.optim.lr = 3e-4
  t.optim.warmup_steps = 1000
  t.optim.decay_fraction = 0.0
  t.sae.gated.l1_warmup_steps = t.sae.baseline.l1_warmup_steps = 0
  t.train.batch_size = 4096
  t.train.log_every = 100
  t.train.feature_window_tokens = 10_000_000
  t.checkpoint.save_every = 5000
  t.mesh.model = 8                    # dictionary split over 8 devices (see --dry_run)
  c.sweep.overrides = ml_collections.ConfigDict()
  c.sweep.overrides.gated = ml_collections.ConfigDict()
  c.sweep.overrides.baseline = ml_collections.ConfigDict(
      {"optim": {"lr": 1e-3}, "train": {"resample_every": 25_000, "resample_until": 100_000}})
  c.sweep.grids.gated = (0.5, 1.0, 2.0, 4.0)
  c.sweep.grids.baseline = (1.0, 2.0, 4.0, 8.0)
  c.sweep.eval.num_sequences = 512
  c.sweep.eval.lm_batch_size = 8
  c.sweep.eval.max_tokens = 1_000_000
  return c
