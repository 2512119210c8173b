"""Test-wide setup: 8 fake CPU devices (set before JAX starts) and shared tiny configs."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from experiments import synthetic  # noqa: E402


@pytest.fixture
def tiny_config():
  """A synthetic config small enough for a few-second test."""
  c = synthetic.get_config()
  c.data.d_in = 16
  c.data.m_true = 32
  c.data.fire_prob = 3 / 32
  c.data.normalise_sample_tokens = 4096
  c.sae.d_sae = 64
  c.optim.warmup_steps = 2
  c.train.steps = 5
  c.train.batch_size = 32
  c.train.log_every = 1
  c.train.feature_window_tokens = 64
  return c
