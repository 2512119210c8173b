"""Dry runs of the paper's Gemma-7B setting (experiments/paper_gemma7b.py) on the named slices:
which plans fit is computed by hand below; no weights, no network."""

import os
import re
import subprocess
import sys

import pytest

from experiments import paper_gemma7b
from gsae_jax import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GiB = 2**30
# Gemma-7B: d 3072, vocab 256000, 28 layers of attention (16 heads x 256) and gated MLP (24576).
MATRICES = 256000 * 3072 + 28 * (4 * 3072 * 16 * 256 + 3 * 3072 * 24576)
NORMS = (2 * 28 + 1) * 3072  # RMSNorm scales: replicated under every strategy


def lm_bytes(split: int) -> int:
  """float32 LM parameters per device, every matrix split `split` ways along d_model (FSDP)."""
  return 4 * (MATRICES // split + NORMS)


LM_REPLICATED = lm_bytes(1)


def _replicated():
  c = paper_gemma7b.get_config()
  c.harvest.mesh.strategy = "replicated"  # a full float32 copy of the LM on every device
  return c


# (config, slice) -> None when it fits, else the term the refusal must name. By hand (GiB):
# harvest, FSDP: 1.99 params + 1.01 activations on 16 chips, 3.98 + 2.02 on 8: fits all.
# harvest, replicated: 31.81 params: > 16 (v5e); + 1.01 activations = 32.81 > 32 (v4); < 80.
# train, each grid (the gated one is the largest: 10.02 on 16 chips, 14.03 on 8 x H100, with the
# LM the main job holds) fits all; with a replicated LM the running total before it is 7.52
# (baseline grid, mesh 2 x 8), and 7.52 + 31.81 passes 16 and 32 but not 80.
HARVEST = {("fsdp", "v5e-16"): None, ("fsdp", "v4-32"): None, ("fsdp", "8xh100"): None,
           ("replicated", "v5e-16"): "params", ("replicated", "v4-32"): "activations",
           ("replicated", "8xh100"): None}
TRAIN = {("fsdp", "v5e-16"): None, ("fsdp", "v4-32"): None, ("fsdp", "8xh100"): None,
         ("replicated", "v5e-16"): "LM params", ("replicated", "v4-32"): "LM params",
         ("replicated", "8xh100"): None}


def _term(out: str, name: str) -> list[int]:
  return [int(b.replace(",", "")) for b in re.findall(rf"^  {name} +([\d,]+) B", out, re.M)]


@pytest.mark.parametrize("strategy,slice_name", sorted(HARVEST))
def test_harvest_plans_on_each_slice(capsys, strategy, slice_name):
  c = paper_gemma7b.get_config() if strategy == "fsdp" else _replicated()
  refused = plan.dry_run_harvest(c, None, None, slice_name)
  out = capsys.readouterr().out
  chips = plan.SLICES[slice_name].chips
  assert f"mesh {{'data': {chips}, 'model': 1}} ({chips} devices)" in out
  assert f"strategy {strategy} (gsae_jax.lm.partition)" in out
  params = lm_bytes(chips) if strategy == "fsdp" else LM_REPLICATED
  assert _term(out, "params") == [params]
  rows = 32 // chips  # 2 windows of 1024 tokens per chip on 16 chips
  assert _term(out, "activations") == [
      rows * 1024 * (4 * 3 * 3072 + 4 * 4 * 16 * 256 + 4 * 3 * 24576) + 2 * rows * 16 * 1024**2 * 4]
  term = HARVEST[strategy, slice_name]
  assert (refused is None) == (term is None), refused
  if term:
    assert f"'{term}' (" in refused and "overflows it" in refused, refused


@pytest.mark.parametrize("strategy,slice_name", sorted(TRAIN))
def test_train_plans_every_grid_with_the_lm_it_holds(capsys, strategy, slice_name):
  c = paper_gemma7b.get_config() if strategy == "fsdp" else _replicated()
  refused = plan.dry_run_sae(c, None, None, slice_name)
  out = capsys.readouterr().out
  chips = plan.SLICES[slice_name].chips
  assert out.count(f"mesh {{'data': {chips // 8}, 'model': 8}}") == 4  # four grids
  lm = lm_bytes(chips) if strategy == "fsdp" else LM_REPLICATED
  assert _term(out, "LM params") == [lm] * 4
  rows, m_local = 4096 // (chips // 8), 2**17 // 8
  gated = out.index("sweep grid gated")
  assert _term(out[gated:], "params")[0] == 4 * 4 * (2 * 3072 * m_local + 3 * m_local + 3072)
  assert _term(out[gated:], "activations")[0] == 4 * 4 * 4 * rows * m_local  # 4 members x 4
  term = TRAIN[strategy, slice_name]
  assert (refused is None) == (term is None), refused
  if term:
    assert f"'{term}' (31.81 GiB) overflows it" in refused, refused


def _cli(module, *flags):
  cmd = [sys.executable, "-m", module, "--config=experiments/paper_gemma7b.py", "--dry_run", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1"))


def test_harvest_cli_prints_the_slice_and_plan_offline():
  proc = _cli("launch.harvest", "--dry_run_slice=v5e-16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "slice v5e-16: 16 chips, 16 GiB HBM each, 4 host(s) x 4 chips" in proc.stdout
  assert _term(proc.stdout, "params") == [lm_bytes(16)]
  assert "device memory 16.00 GiB: 18.9% used" in proc.stdout


def test_cli_refusals_exit_1_naming_the_term(tmp_path):
  proc = _cli("launch.harvest", "--dry_run_slice=v4-32", "--config.harvest.mesh.strategy=replicated")
  assert proc.returncode == 1
  assert "does not fit in 32.00 GiB per device" in proc.stderr
  assert "'activations' (1.01 GiB) overflows it" in proc.stderr, proc.stderr[-2000:]
  proc = _cli("launch.train", f"--workdir={tmp_path / 'w'}", "--dry_run_slice=v5e-16",
              "--config.harvest.mesh.strategy=replicated")
  assert proc.returncode == 1
  assert "'LM params' (31.81 GiB) overflows it" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "w").exists()


def test_explicit_flags_override_the_slice(capsys):
  assert plan.slice_target("v4-32", 8, None) == (8, 32)
  assert plan.slice_target("v4-32", None, 30.0) == (16, 30.0)
  assert plan.slice_target(None, 4, 2.0) == (4, 2.0)
  assert "slice v4-32: 16 chips" in capsys.readouterr().out


def test_a_multi_site_harvest_runs_to_its_deepest_site(capsys):
  c = paper_gemma7b.get_config()
  c.harvest.sites = ("blocks.5.mlp_out", "blocks.24.resid_post", "blocks.12.attn_z")
  p = plan.harvest_plan(c.harvest, 16)
  assert p.title.startswith("LM forward google/gemma-7b to block 24,")
  assert p.term("site output").bytes == 3 * 2 * 1024 * 3072 * 4
  assert [x.count for x in p.collectives] == [25]  # one FSDP gather per block 0..24
  c.harvest.sites = ("blocks.28.resid_post",)
  with pytest.raises(plan.PlanError, match=r"config.sites: .*layer in 0..27"):
    plan.harvest_plan(c.harvest, 16)


@pytest.mark.parametrize("experiment, count", [("paper_gemma7b", 8_537_680_896),
                                               ("paper_pythia2p8b", 2_775_208_960)])
def test_paper_models_plan_offline_with_their_published_sizes(monkeypatch, experiment, count):
  import importlib
  import math
  import transformers
  monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", None)  # no hub, no cache
  c = importlib.import_module(f"experiments.{experiment}").get_config()
  lm_config = plan.lm_config_from_hf_config(plan.harvest_hf_config(c.harvest), c.harvest.model)
  assert sum(math.prod(s) for s in plan.lm_param_shapes(lm_config).values()) == count
  assert plan.harvest_plan(c.harvest, 8).mesh == {"data": 8, "model": 1}
