import pytest

from experiments import synthetic
from gsae_jax import configs

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
    ("data.source", "hub", "one of ('synthetic', 'shards')"),
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
