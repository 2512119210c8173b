"""An SAE trained on activations as the LM produces them (no shards on disk): for a disk that
cannot hold the harvest. One process; see gsae_jax/data/stream.py.

    python -m launch.train --config=experiments/stream_lm.py --workdir=/tmp/gsae-stream
"""

import ml_collections

from experiments import base, harvest_gemma3_270m


def get_config():
  c = base.get_config()
  c.data.source = "lm"
  c.data.d_in = 640                   # must equal the site's width (Gemma 3 270M resid: 640)
  c.data.seed = 0                     # group g's rows are mixed by permutation (seed, g)
  # Windows whose rows are mixed together: 512 x 127 rows = 16 batches of 4096, so one batch
  # draws on many documents; host memory about 2 x buffer_windows x context_length x d_in x 4 B
  # (170 MB each here), and a resume recomputes at most one group with the LM.
  c.data.buffer_windows = 512

  lm = c.data.lm = ml_collections.ConfigDict()  # as a harvest config (experiments/harvest_*)
  lm.model = "gemma3-270m"            # gsae_jax.lm.load id, a local HF folder, or a hub name
  lm.gguf_file = ""                   # for GGUF checkpoints
  lm.revision = ""                    # hub revision
  lm.model_dtype = "float32"          # LM compute dtype
  lm.site = "resid_post"              # resid_pre | resid_post | mlp_out | attn_out | attn_z
  lm.layer = 6
  lm.context_length = 128
  lm.exclude_bos = True               # BOS rows are outliers, not text: leave them out
  lm.batch_size = 16                  # windows per LM call
  lm.skip_windows = 0                 # start after this many windows (keep held-out text apart)
  lm.text = harvest_gemma3_270m.get_config().text  # embedded (offline) | files | hf

  c.sae.d_sae = 10240                 # 16 x d_in
  c.optim.warmup_steps = 1000
  c.train.steps = 20_000
  c.train.batch_size = 4096
  c.train.log_every = 100
  return c
