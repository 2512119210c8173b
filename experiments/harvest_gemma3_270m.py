"""Gemma 3 270M (the embedded offline model) residual stream, 1024-token contexts.

    python -m launch.harvest --config=experiments/harvest_gemma3_270m.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "gemma3-270m"             # gsae_jax.lm.load id, a local HF folder, or a hub name
  c.gguf_file = ""                    # for GGUF checkpoints
  c.revision = ""                     # hub revision (recorded in the manifest)
  c.model_dtype = "float32"           # LM compute dtype
  c.site = "resid_post"               # resid_pre | resid_post | mlp_out | attn_out | attn_z
  c.layer = 6
  c.sites = ()                        # or several 'blocks.{layer}.{kind}' from one LM pass,
                                      # one folder each: output_dir/<site> (site/layer unused)
  c.context_length = 1024
  c.num_tokens = 20_000_000           # rows stored (BOS positions excluded)
  c.dtype = "float32"                 # on disk: float32 | bfloat16
  c.exclude_bos = True                # BOS rows are outliers, not text: leave them out
  c.output_dir = "/tmp/harvest/gemma3-270m/blocks.6.resid_post"
  c.windows_per_shard = 64            # 64 x 1023 x 640 x 4 B = 168 MB per shard
  c.batch_size = 8                    # windows per LM call, all processes together
  c.normalise_sample_tokens = 65536   # GATED_SAE.md section 4 estimate
  c.seed = 0
  c.skip_windows = 0                  # start after this many windows (held-out splits)

  c.mesh = ml_collections.ConfigDict()  # the LM's devices, every process's; may change on resume
  c.mesh.data = -1                    # batch split over all devices not used by 'model'
  c.mesh.model = 1                    # tensor-parallel width
  c.mesh.strategy = "fsdp"            # lm.partition.MESH_RULES: fsdp | tp | fsdp_tp | replicated

  c.text = ml_collections.ConfigDict()
  c.text.source = "embedded"          # embedded (Python docs, offline) | files | hf
  c.text.paths = ()                   # files: globs of .txt/.md/.jsonl/.parquet
  c.text.text_field = "text"          # jsonl/parquet/hf column
  c.text.hf_name = ""                 # hf: dataset name (needs `datasets` and network)
  c.text.hf_config = ""
  c.text.hf_split = "train"
  return c
