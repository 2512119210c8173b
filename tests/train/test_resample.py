import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gsae_jax import sharding
from gsae_jax.data.sources import make_source
from gsae_jax.train import optim
from gsae_jax.sae.spec import describe
from gsae_jax.train.state import create_train_state
from gsae_jax.train.step import compile_steps


@pytest.mark.parametrize("architecture", ["gated", "baseline"])
def test_resampling_reinitialises_only_dead_features(tiny_config, architecture):
  c = tiny_config
  c.sae.architecture = architecture
  mesh = sharding.make_mesh(2, 4)
  source = make_source(c, mesh)
  tx = optim.make_optimizer(c.optim, c.train.steps)
  spec, rules = describe(c, source.d_in), tuple(map(tuple, c.mesh.rules))
  state, shardings = create_train_state(spec, mesh, rules, tx)
  train_step, resample_step = compile_steps(spec, mesh, shardings, rules, tx,
                                            c.train.feature_window_tokens)[:2]
  for step in range(3):
    state, _ = train_step(state, next(source.batches))
  dead = np.zeros(c.sae.d_sae, bool)
  dead[[1, 7, 40]] = True
  state = state.replace(tokens_since_fired=jax.device_put(
      jnp.where(dead, c.train.feature_window_tokens, 0), state.tokens_since_fired.sharding))
  before = jax.device_get(state)
  after = resample_step(state, next(source.batches))

  w_dec = np.asarray(after.params["W_dec"])
  np.testing.assert_allclose(np.linalg.norm(w_dec, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(w_dec[~dead], before.params["W_dec"][~dead])
  assert not np.allclose(w_dec[dead], before.params["W_dec"][dead])
  enc = "W_gate" if architecture == "gated" else "W_enc"
  enc_dirs = np.asarray(after.params[enc])[:, dead].T
  cos = np.sum(enc_dirs * w_dec[dead], -1) / np.linalg.norm(enc_dirs, axis=-1)
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)  # encoder column is along the new direction
  # Adam moments of the dead features are zeroed, the others kept.
  nu = after.opt_state[1][0].nu[enc]
  assert np.all(np.asarray(nu)[:, dead] == 0) and np.any(np.asarray(nu)[:, ~dead] != 0)
  np.testing.assert_array_equal(after.tokens_since_fired, 0)
