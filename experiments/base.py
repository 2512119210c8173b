"""Shared defaults for every experiment (GATED_SAE.md hyper-parameters)."""

import ml_collections

from gsae_jax.sae import registry


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.sae = ml_collections.ConfigDict()
  c.sae.architecture = "gated"        # a name in gsae_jax.sae.registry (gated, baseline, ...)
  c.sae.d_sae = 4096                  # dictionary size M
  c.sae.init_b_dec = "zeros"          # 'zeros' | 'mean' (mean of the first batches)
  c.sae.init_b_dec_batches = 4
  c.sae.param_dtype = "float32"
  # One block per architecture with its own fields and defaults (config.sae.gated.l1_coefficient,
  # config.sae.topk.k, ...); only the chosen architecture's block is used.
  for name, block in registry.default_blocks().items():
    c.sae[name] = block

  c.sweep = ml_collections.ConfigDict()
  c.sweep.coefficient = ""            # a named coefficient of the architecture ('l1', 'k', ...);
                                      # '' = its first one
  c.sweep.grid = ()                   # non-empty: train one SAE per value in one data pass
                                      # (as sweep.execution says); the block's value is unused
  c.sweep.execution = "auto"          # 'vmap' | 'sequential' (members one after another on
                                      # the shared batch, in one program) | 'separate' (each
                                      # member's state its own arrays, stepped one after
                                      # another) | 'auto' (separate on CPU, sequential on an
                                      # accelerator's sparse path, vmap elsewhere)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4                   # the paper's LR for every Gated SAE
  c.optim.b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.warmup_steps = 1000
  c.optim.decay_fraction = 0.0        # linear decay to 0 over this final fraction of steps

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10_000
  c.train.batch_size = 4096
  c.train.log_every = 100
  c.train.feature_window_tokens = 10_000_000   # dead/dense window (GATED_SAE.md section 5)
  c.train.resample_every = 0          # 0 = off; else resample dead features every N steps
  c.train.resample_until = 0          # no resampling at or after this step (0 = never stop)
  c.train.path = "auto"               # 'dense' | 'sparse' (exact, on each token's active
                                      # features; dense fallback on overflow) | 'auto' (sparse
                                      # where it pays: gsae_jax/train/paths.py)
  c.train.sparse_capacity = 0         # active features per token on the sparse path; 0: the
                                      # architecture's default (128; TopK: k)
  c.train.batch_chunks = 0            # gradients accumulated over this many parts of the batch
                                      # (lax.scan); 0: parts of ~1024 tokens per device
  c.train.compute_dtype = "float32"   # 'bfloat16': matmuls in bf16 (float32 results, params,
                                      # optimiser state and loss sums); bf16 shards fed as bf16
  c.train.sparse_dead_capacity = 1024  # dead latents AuxK handles on the sparse path
  c.train.cpu_row_kernels = True      # sparse step on a 1-device CPU mesh: C++ row kernels
                                      # (gsae_jax/kernels) instead of XLA's gathers
  c.train.split_step = True           # sparse path: when only a few tokens (1/32 of the batch)
                                      # overflow the slots, run those dense and the rest sparse

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.save_every = 1000      # steps; also saved at the end and on SIGTERM/SIGINT
  c.checkpoint.keep = 3               # most recent checkpoints kept
  c.checkpoint.async_save = True

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                    # -1: all devices not used by 'model'
  c.mesh.model = 1
  c.mesh.rules = (("batch", "data"), ("features", "model"), ("d_in", None))

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.normalise_target = "d_model"  # E||x||^2 = d_in; 'off' or a number
  c.data.normalise_sample_tokens = 65536
  return c
