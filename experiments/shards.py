"""An SAE on harvested activations (a folder written by launch/harvest.py).

    python -m launch.harvest --config=experiments/harvest_gemma3_270m.py
    python -m launch.train --config=experiments/shards.py --workdir=/tmp/gsae \\
        --config.data.path=/tmp/harvest/gemma3-270m/blocks.6.resid_post
"""

from experiments import base


def get_config():
  c = base.get_config()
  c.data.source = "shards"
  c.data.path = ""                    # shard folder (required): a local path or gs://...
  c.data.d_in = 640                   # must equal the manifest's d_model (Gemma 3 270M: 640)
  c.data.seed = 0                     # shuffle seed; epoch e uses permutation (seed, e)
  c.data.shuffle = "global"           # 'global': every row on its own (random row reads of
                                      # local memory-mapped shards); 'block': contiguous blocks
                                      # read sequentially and mixed in a buffer (remote or slow
                                      # storage, gs://; gsae_jax/data/block_shuffle.py)
  c.data.block_rows = 1024            # block shuffle: rows per sequential read
  c.data.buffer_blocks = 16           # block shuffle: blocks mixed together in each lane;
                                      # memory: up to 4 x this x block_rows rows per lane
  c.data.lanes = 8                    # block shuffle: independent block streams; the batch is
                                      # their concatenation (divides the batch; a multiple of
                                      # the process count)
  c.data.num_epochs = 0               # 0 = repeat forever (train.steps decides)
  c.data.num_threads = 2              # Grain read threads (state does not depend on it)
  c.data.prefetch = 4                 # batches read ahead
  c.data.verify_checksums = True      # sha256 + NaN/Inf scan of every shard before training

  c.sae.d_sae = 10240                 # 16 x d_in
  c.optim.warmup_steps = 1000
  c.train.steps = 20_000
  c.train.batch_size = 4096
  c.train.log_every = 100
  return c
