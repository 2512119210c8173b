"""`launch/harvest.py --dry_run`: the LM's plan under FSDP + tensor parallelism from config.json
alone (Gemma 7B's architecture, no weights), checked against a hand count."""

import os
import re
import subprocess
import sys

import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = """
import ml_collections
from experiments import harvest_gemma3_270m

def get_config():
  c = harvest_gemma3_270m.get_config()
  c.model = {model!r}
  c.layer = 20
  c.mesh = ml_collections.ConfigDict({{"data": 2, "model": 8, "strategy": "fsdp_tp"}})
  return c
"""


def _dry_run(tmp_path, *flags):
  model = tmp_path / "gemma-7b"
  transformers.GemmaConfig().save_pretrained(model)  # its defaults are Gemma 7B; no weights
  cfg = tmp_path / "harvest_g7.py"
  cfg.write_text(CONFIG.format(model=str(model)))
  cmd = [sys.executable, "-m", "launch.harvest", f"--config={cfg}", "--dry_run",
         "--dry_run_devices=16", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT))


def test_gemma7b_harvest_plan_matches_hand_count(tmp_path):
  proc = _dry_run(tmp_path, "--device_memory_gib=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  d, vocab, layers, heads, head_dim, mlp = 3072, 256000, 28, 16, 256, 24576
  # Every matrix is split 16 ways (d_model over 'data' x heads/mlp/vocab over 'model');
  # the RMSNorm scales (2 per block + final) are replicated.
  matrices = vocab * d + layers * (4 * d * heads * head_dim + 3 * d * mlp)
  norms = (2 * layers + 1) * d
  params = 4 * (matrices // 16 + norms)
  assert re.search(rf"^  params +{params:,d} B", out, re.M), out
  assert params == 2_135_076_864
  rows, seq = 8 // 2, 1024
  assert re.search(rf"^  tokens +{4 * rows * seq:,d} B", out, re.M)
  # TP all-reduces of [rows, seq, d] after attention and MLP in blocks 0..20.
  assert (f"all-reduce over 'model' (8 devices) x42, payload {4 * rows * seq * d:,d} B") in out
  assert "all-gather over 'data' (2 devices) x21" in out


def test_harvest_dry_run_refuses_naming_term(tmp_path):
  proc = _dry_run(tmp_path, "--device_memory_gib=1.5")
  assert proc.returncode == 1
  assert "'params' (1.99 GiB) overflows it" in proc.stderr, proc.stderr[-2000:]
