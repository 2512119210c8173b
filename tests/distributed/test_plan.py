"""The memory/communication planner and `launch/train.py --dry_run`: a hand computation for the
Gemma-7B config on 16 simulated devices, refusal naming the overflowing term, and the plan
checked against XLA's own memory analysis of the compiled step on 8 fake devices."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from experiments import gemma7b, synthetic
from gsae_jax import plan, sharding
from gsae_jax.sae import registry
from gsae_jax.train import optim
from gsae_jax.sae.spec import describe
from gsae_jax.train.state import abstract_train_state
from gsae_jax.train.step import compile_steps

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Runs the CLI in-process of a child and reports the child's peak RSS after it exits: VmHWM of
# its own address space (ru_maxrss would carry over the forking pytest process's peak).
_CHILD = ("import re, runpy, sys; sys.argv = ['launch.train'] + sys.argv[1:]\n"
          "try:\n  runpy.run_module('launch.train', run_name='__main__')\n"
          "finally:\n  hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())\n"
          "  print('maxrss_kib', hwm.group(1), flush=True)\n")


def _dry_run(tmp_path, *flags):
  cmd = [sys.executable, "-c", _CHILD, "--config=experiments/gemma7b.py",
         f"--workdir={tmp_path / 'w'}", "--dry_run", "--dry_run_devices=16", *flags]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _term(out: str, name: str) -> int:
  m = re.search(rf"^  {name} +([\d,]+) B", out, re.M)
  assert m, f"no '{name}' line in:\n{out}"
  return int(m.group(1).replace(",", ""))


def test_gemma7b_dry_run_matches_hand_computation(tmp_path):
  proc = _dry_run(tmp_path, "--device_memory_gib=16")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  # Hand computation: d = 3072, M = 2^17, batch 4096, mesh data=2 x model=8, float32.
  d, m, batch, data, model = 3072, 2**17, 4096, 2, 8
  assert "mesh {'data': 2, 'model': 8} (16 devices)" in out
  m_local, rows = m // model, batch // data
  params = 4 * (d * m_local            # W_gate [d, M] split on M
                + m_local * d          # W_dec [M, d] split on M
                + 3 * m_local          # r_mag, b_gate, b_mag
                + d)                   # b_dec, replicated
  assert _term(out, "params") == params == 402_862_080
  opt = _term(out, "opt_state")
  assert 2 * params <= opt <= 2 * params + 64  # Adam mu, nu (+ int32 step counters)
  assert _term(out, "gradients") == params
  assert _term(out, "batch") == 4 * rows * d == 25_165_824
  assert _term(out, "activations") == 4 * (4 * rows * m_local) == 536_870_912  # 4 buffers, gated
  assert _term(out, "stats") == 4 * (1 + 2 + 2 * m_local + 1)  # step, rng, 2 counters, tokens
  total = params + opt + params + 4 * rows * d + 16 * rows * m_local + 4 * (4 + 2 * m_local)
  assert _term(out, "total") == total
  assert f"gradients: all-reduce over 'data' (2 devices), payload {params:,d} B" in out
  assert (f"all-reduce over 'model' (8 devices) x2, payload {4 * rows * d:,d} B, "
          f"ring traffic {round(2 * 7 / 8 * 2 * 4 * rows * d):,d} B") in out
  # Shapes only: the unsharded weights alone would be 3.2 GB (+ 6.4 GB of Adam state).
  rss_kib = int(re.search(r"maxrss_kib (\d+)", out).group(1))
  assert rss_kib < 1_000_000, rss_kib
  assert not (tmp_path / "w").exists()


def test_dry_run_refuses_naming_the_overflowing_term(tmp_path):
  proc = _dry_run(tmp_path, "--device_memory_gib=1")
  assert proc.returncode == 1
  assert "does not fit in 1.00 GiB per device" in proc.stderr
  assert "'opt_state' (768.40 MiB) overflows it" in proc.stderr, proc.stderr[-2000:]


def test_dry_run_refuses_a_mesh_the_dictionary_does_not_divide(tmp_path):
  proc = _dry_run(tmp_path, "--config.mesh.model=6", "--dry_run_devices=12")
  assert proc.returncode != 0
  assert "mesh model=6" in proc.stderr or "sae.d_sae" in proc.stderr, proc.stderr[-2000:]


def test_plan_check_names_term():
  c = gemma7b.get_config()
  p = plan.sae_plan(c, 3072, 16)
  p.check(int(2.5 * plan.GiB))
  with pytest.raises(plan.PlanError, match="'activations'"):
    p.check(p.total_bytes - p.term("stats").bytes - p.term("activations").bytes // 2)
  with pytest.raises(plan.PlanError, match="'params'"):
    p.check(100)


def test_more_model_shards_cut_per_device_dictionary_memory():
  c = gemma7b.get_config()
  c.mesh.model = 16
  p16 = plan.sae_plan(c, 3072, 16)
  c.mesh.model = 8
  p8 = plan.sae_plan(c, 3072, 16)
  assert p16.term("params").bytes < 0.51 * p8.term("params").bytes
  assert p16.mesh == {"data": 1, "model": 16}
  assert [x.axis for x in p16.collectives] == ["model"]  # no data axis: no gradient all-reduce


def _compiled_step(config, d_in, mesh_shape):
  config.mesh.data, config.mesh.model = mesh_shape
  mesh = sharding.make_mesh(*mesh_shape)
  spec, rules = describe(config, d_in), tuple(map(tuple, config.mesh.rules))
  tx = optim.make_optimizer(config.optim, config.train.steps, spec.architecture.UNIT_NORM_DECODER)
  abstract, shardings, _ = abstract_train_state(spec, mesh, rules, tx)
  step = compile_steps(spec, mesh, shardings, rules, tx, config.train.feature_window_tokens).dense
  x = jax.ShapeDtypeStruct((config.train.batch_size, d_in), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, sharding.batch_spec()))
  return step.lower(abstract, x, None).compile()


def assert_plan_agrees_with_xla(config, d_in, mesh_shape):
  """The plan's total within 15% of XLA's argument + temp bytes of the compiled step (also
  used by tests/test_registry.py for every architecture on a (2, 4) mesh)."""
  ma = _compiled_step(config, d_in, mesh_shape).memory_analysis()
  p = plan.sae_plan(config, d_in, 8)
  t = {term.name: term.bytes for term in p.memory}
  # Inputs are exactly the state and the batch; the donated state is aliased to the outputs.
  assert ma.argument_size_in_bytes == t["params"] + t["opt_state"] + t["stats"] + t["batch"]
  xla = ma.argument_size_in_bytes + ma.temp_size_in_bytes
  assert 0.85 * xla <= p.total_bytes <= 1.15 * xla, (p.total_bytes, xla)


# Every architecture on a (2, 4) mesh: tests/test_registry.py. Here the other mesh shapes, for
# the default architecture.
@pytest.mark.parametrize("mesh_shape", [(4, 2), (1, 8)], ids=["4x2", "1x8"])
def test_plan_agrees_with_xla_memory_analysis(mesh_shape):
  c = synthetic.get_config()
  c.sae.d_sae, c.train.batch_size = 4096, 512
  assert_plan_agrees_with_xla(c, 64, mesh_shape)


class _Accelerator:
  """A device that reports its own memory limit, as GPUs and TPUs do."""
  platform, process_index = "gpu", 0

  def __init__(self, limit: int):
    self.limit = limit

  def memory_stats(self):
    return {"bytes_limit": self.limit}


def test_check_sae_fits_refuses_a_huge_dictionary_on_cpu(tiny_config):
  from gsae_jax.errors import ConfigError
  plan.check_sae_fits(tiny_config, tiny_config.data.d_in, jax.local_devices())
  tiny_config.sae.d_sae = 2**34
  with pytest.raises(ConfigError) as err:  # planned from shapes: nothing is allocated
    plan.check_sae_fits(tiny_config, tiny_config.data.d_in, jax.local_devices())
  message = str(err.value)
  assert isinstance(err.value, plan.PlanError) and "\n" not in message
  assert "does not fit in" in message and "'params'" in message, message
  assert "of available host memory / 8 CPU devices" in message and "--dry_run" in message


def test_check_sae_fits_refuses_a_huge_batch(tiny_config):
  tiny_config.train.batch_size = 2**36
  with pytest.raises(plan.PlanError, match="'batch'"):
    plan.check_sae_fits(tiny_config, tiny_config.data.d_in, jax.local_devices())


def test_cpu_limit_is_the_host_memory_shared_by_local_devices(monkeypatch):
  monkeypatch.setattr(plan, "host_available_bytes", lambda: 8 * plan.GiB)
  limit, source = plan.memory_limit(jax.local_devices())
  assert plan.memory_limit([]) is None
  assert limit == plan.GiB and "8.00 GiB of available host memory / 8 CPU devices" in source


def test_accelerator_limit_is_its_bytes_limit(tiny_config):
  p = plan.sae_plan(tiny_config, tiny_config.data.d_in, jax.device_count())
  plan.check_sae_fits(tiny_config, tiny_config.data.d_in, [_Accelerator(p.total_bytes)])
  with pytest.raises(plan.PlanError, match="limit: the device's bytes_limit"):
    plan.check_sae_fits(tiny_config, tiny_config.data.d_in, [_Accelerator(p.total_bytes - 1)])


@pytest.mark.parametrize("name", registry.names())
def test_plans_of_huge_dictionaries_are_shapes_only(tiny_config, name):
  tiny_config.sae.architecture, tiny_config.sae.d_sae = name, 2**34
  p = plan.sae_plan(tiny_config, tiny_config.data.d_in, 8)
  assert p.term("params").bytes >= 2 * 16 * 2**34 * 4 // 8  # encoder and decoder
