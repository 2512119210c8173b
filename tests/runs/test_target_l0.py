"""Target-L0 search: on the synthetic config, Gated's and the baseline's coefficients land
within 10% of three target L0s, and training at them gives those L0s."""

import ml_collections
import pytest

from gsae_jax.errors import ConfigError
from gsae_jax.runs import sweep, target_l0, training

TARGETS = (4.0, 8.0, 16.0)


def _sweep_config(tiny_config, targets=TARGETS):
  t = tiny_config.copy_and_resolve_references()
  t.train.steps, t.train.batch_size, t.train.log_every = 200, 256, 1000
  t.optim.warmup_steps, t.train.feature_window_tokens = 10, 4096
  t.sae.gated.l1_warmup_steps = t.sae.baseline.l1_warmup_steps = 20
  t.mesh.data = 1  # one device: 8 fake ones on a 2-core machine only add all-reduces
  c = ml_collections.ConfigDict({"train": t})
  c.grids = {"gated": (0.1, 1.0, 10.0), "baseline": (0.1, 1.0, 10.0)}  # the search's start
  c.target_l0 = {"targets": targets, "tolerance": 0.1, "search_steps": 0, "rounds": 3,
                 "measure_tokens": 8192, "ratio": ("gated", "baseline")}
  return c


def test_search_lands_within_tolerance_of_three_targets(tiny_config, tmp_path):
  c = _sweep_config(tiny_config)
  grids = sweep.targeted(c, str(tmp_path), sweep.grid_configs(c))
  assert sorted(arch for arch, _ in grids) == ["baseline", "gated"]
  for arch, tc in grids:
    assert len(tc.sweep.grid) == 3
    # full-length rounds: the final grid's members are the runs the search measured
    result = training.run(tc, str(tmp_path / arch))
    for l0, target in zip(target_l0.measured_l0s(result, 8192), TARGETS):
      assert abs(l0 / target - 1) <= 0.1, (arch, l0, target, tc.sweep.grid)
  assert (tmp_path / "target_l0" / "search.json").exists()


def test_integer_coefficient_is_the_target(tiny_config, tmp_path):
  c = tiny_config.copy_and_resolve_references()
  c.sae.architecture, c.sweep.grid = "topk", (2, 4)
  found = target_l0.search(c, (3.0, 12.4), 0.1, 0, 2, 1024, str(tmp_path))
  assert found.coefficient == "k" and found.chosen == (3.0, 12.0) and found.rounds == ()
  assert not (tmp_path / "round_0").exists()


def test_short_config_compresses_the_schedule(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  c.train.steps, c.optim.warmup_steps, c.sae.gated.l1_warmup_steps = 1000, 100, 400
  short = target_l0.short_config(c, 250)
  assert (short.train.steps, short.optim.warmup_steps, short.sae.gated.l1_warmup_steps) == (
      250, 25, 100)
  assert c.train.steps == 1000  # the full config is left alone


@pytest.mark.parametrize("field,value", [("targets", (8.0, -1.0)), ("tolerance", 1.5),
                                         ("search_steps", -1), ("ratio", ("gated", "nope"))])
def test_bad_target_l0_fields_name_the_field(tiny_config, tmp_path, field, value):
  c = _sweep_config(tiny_config)
  c.target_l0[field] = value
  with pytest.raises(ConfigError, match=f"config.target_l0.{field}"):
    sweep.targeted(c, str(tmp_path), sweep.grid_configs(c))
