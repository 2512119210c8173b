"""A CPU-sized Gemma 3 270M harvest: 128-token contexts of the embedded corpus.

    python -m launch.harvest --config=experiments/harvest_gemma3_270m_cpu.py
"""

from experiments import harvest_gemma3_270m


def get_config():
  c = harvest_gemma3_270m.get_config()
  c.context_length = 128
  c.num_tokens = 200_000
  c.windows_per_shard = 256           # 256 x 127 x 640 x 4 B = 83 MB per shard
  c.batch_size = 16
  c.output_dir = "/tmp/harvest/gemma3-270m-cpu/blocks.6.resid_post"
  return c
