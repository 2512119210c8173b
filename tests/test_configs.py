import pytest

from experiments import synthetic
from gsae_jax import configs
from gsae_jax.errors import ConfigError

MESH = {"data": 2, "model": 4}


def test_default_configs_are_valid():
  configs.validate(synthetic.get_config(), MESH)


@pytest.mark.parametrize("field, value, message", [
    ("sae.d_sae", 510, "multiple of the mesh 'model' axis size 4, found 510"),
    ("sae.gated.l1_coefficient", -0.1, ">= 0, found -0.1"),
    ("sae.gated.l1_coefficient", float("inf"), "a finite number >= 0, found inf"),
    ("sae.architecture", "relu6", "one of ('gated', 'baseline'"),
    ("sae.gated.gate_backward", "sigmoid", "found 'sigmoid'"),
    ("sae.gated.gate_eps", 0.0, "> 0"),
    ("sweep.coefficient", "k", "a coefficient of gated: one of ['l1'], found 'k'"),
    ("train.batch_size", 1023, "multiple of the mesh 'data' axis size 2"),
    ("optim.lr", 0.0, "> 0"),
    ("data.source", "hub", "one of ('synthetic', 'shards', 'lm')"),
])
def test_bad_values_name_the_field(field, value, message):
  c = synthetic.get_config()
  *sections, name = field.split(".")
  block = c
  for section in sections:
    block = block[section]
  block[name] = value
  if field == "sweep.coefficient":
    c.sweep.grid = (1.0,)
  with pytest.raises(ValueError, match="config." + field) as err:
    configs.validate(c, MESH)
  assert message in str(err.value)


def _set(c, field, value):
  *sections, name = field.split(".")
  block = c
  for section in sections:
    block = block[section]
  block[name] = value


@pytest.mark.parametrize("field, value, message", [
    ("optim.lr", float("inf"), "config.optim.lr: expected a finite number > 0, found inf"),
    ("optim.lr", float("nan"), "config.optim.lr: expected a finite number > 0, found nan"),
    ("optim.eps", 0.0, "config.optim.eps: expected a finite number > 0, found 0.0"),
    ("optim.eps", float("inf"), "config.optim.eps: expected a finite number > 0, found inf"),
    ("optim.b2", float("nan"), "config.optim.b1/b2: expected in [0, 1)"),
    ("optim.decay_fraction", float("nan"), "config.optim.decay_fraction: expected in [0, 1]"),
    ("seed", 2**40, "config.seed: expected an integer in [0, 2**31), found 1099511627776"),
    ("sae.init_b_dec_batches", 0, "config.sae.init_b_dec_batches: expected an integer > 0"),
    ("sae.param_dtype", "int8", "config.sae.param_dtype: expected a floating dtype name"),
    ("train.resample_until", -1, "config.train.resample_until: expected an integer >= 0"),
    ("train.steps", 0, "config.train.steps: expected an integer > 0, found 0"),
    ("mesh.data", 0, "config.mesh.data: expected an integer > 0, or -1"),
    ("data.normalise_target", "inf", "config.data.normalise_target: expected 'd_model', 'off' "
                                     "or a finite number > 0, found 'inf'"),
    ("data.normalise_target", "-2", "found '-2'"),
    ("data.normalise_sample_tokens", 0, "config.data.normalise_sample_tokens: expected an "
                                        "integer > 0"),
    ("data.seed", -1, "config.data.seed: expected an integer in [0, 2**31), found -1"),
    ("data.fire_prob", float("nan"), "config.data.fire_prob: expected a probability in (0, 1]"),
    ("data.mag_high", float("inf"), "config.data.mag_low/mag_high: expected finite numbers"),
    # Fields no range check reads: the walk over the whole config still refuses them.
    ("sae.jumprelu.bandwidth", float("inf"),
     "config.sae.jumprelu.bandwidth: expected a finite number, found inf"),
    ("sae.gated.gate_eps", float("inf"), "config.sae.gated.gate_eps: expected a finite number, "
                                         "found inf"),
])
def test_non_finite_and_out_of_range_values_are_refused(field, value, message):
  c = synthetic.get_config()
  _set(c, field, value)
  with pytest.raises(ConfigError) as err:
    configs.validate(c, MESH)
  assert message in str(err.value)
  assert "\n" not in str(err.value)


def test_non_finite_values_in_tuples_are_refused():
  c = synthetic.get_config()
  c.sweep.grid = (0.1, float("inf"))
  with pytest.raises(ConfigError, match=r"config.sweep.grid: expected finite numbers >= 0"):
    configs.validate(c, MESH)
  c = synthetic.get_config()
  c.sae.architecture, c.sweep.grid = "topk", (4, float("nan"))  # int(nan) would raise
  with pytest.raises(ConfigError, match=r"config.sweep.grid: expected integers in \[1, "
                                        r"sae.d_sae=512\] \(values of k\), found \(4, nan\)"):
    configs.validate(c, MESH)
  c = synthetic.get_config()
  c.data.extra = (1.0, (2.0, float("nan")))
  with pytest.raises(ConfigError, match=r"config.data.extra\[1\]\[1\]: expected a finite "
                                        r"number, found nan"):
    configs.validate(c, MESH)


def test_integer_coefficients_are_bounded_by_the_dictionary():
  c = synthetic.get_config()
  c.sae.architecture, c.sae.topk.k = "topk", 513
  with pytest.raises(ConfigError, match=r"config.sae.topk.k: expected an integer in \[1, "
                                        r"sae.d_sae=512\], found 513"):
    configs.validate(c, MESH)
  c.sae.topk.k, c.sweep.grid = 4, (4, 1024)
  with pytest.raises(ConfigError, match="config.sweep.grid"):
    configs.validate(c, MESH)


def test_shards_fields_are_range_checked(tmp_path):
  from experiments import shards as shards_experiment
  from gsae_jax.data import harvest
  from tests.data.conftest import fake_activations, spec, unique_windows
  s = spec()
  harvest.harvest(str(tmp_path), unique_windows(4, s.context_length), fake_activations(8), s,
                  progress=False)
  c = shards_experiment.get_config()
  c.data.path, c.data.d_in, c.sae.d_sae, c.train.batch_size = str(tmp_path), 8, 32, 64
  configs.validate(c, MESH)
  for field, value, message in [("data.prefetch", -1, "an integer >= 0"),
                                ("data.num_threads", 0, "an integer > 0"),
                                ("data.seed", 2**31, "an integer in [0, 2**31)")]:
    bad = c.copy_and_resolve_references()
    _set(bad, field, value)
    with pytest.raises(ConfigError, match="config." + field) as err:
      configs.validate(bad, MESH)
    assert message in str(err.value)


def test_shuffle_fields_are_checked(tmp_path):
  """data.shuffle and the block shuffle's fields (checked only under 'block'); the global
  shuffle is refused for a remote folder before anything is read from it."""
  from experiments import shards as shards_experiment
  from gsae_jax.data import harvest
  from tests.data.conftest import fake_activations, spec, unique_windows
  s = spec()
  harvest.harvest(str(tmp_path), unique_windows(4, s.context_length), fake_activations(8), s,
                  progress=False)  # 64 rows
  c = shards_experiment.get_config()
  c.data.path, c.data.d_in, c.sae.d_sae, c.train.batch_size = str(tmp_path), 8, 32, 64
  c.data.block_rows = 0  # unused by the global shuffle
  configs.validate(c, MESH)
  c.data.shuffle, c.data.block_rows = "block", 8
  configs.validate(c, MESH)
  for field, value, message in [("data.shuffle", "rows", "'global' or 'block'"),
                                ("data.block_rows", 0, "an integer > 0"),
                                ("data.buffer_blocks", -2, "an integer > 0"),
                                ("data.lanes", 0, "an integer > 0"),
                                ("data.block_rows", 10, "at most 9 (the 64 rows must make a block "
                                                        "for each of data.lanes=8 lanes)")]:
    bad = c.copy_and_resolve_references()
    _set(bad, field, value)
    with pytest.raises(ConfigError, match="config." + field) as err:
      configs.validate(bad, MESH)
    assert message in str(err.value)
  c.data.shuffle, c.data.path = "global", "gs://bucket/harvest"
  with pytest.raises(ConfigError, match=r"config.data.shuffle: expected 'block' for shards on "
                                        r"remote storage \(gs://bucket/harvest\)"):
    configs.validate(c, MESH)
