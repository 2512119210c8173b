"""The one check every SAELens export test makes: SAELens' own loader gives our function."""

import numpy as np
import torch
from flax import nnx


def assert_saelens_matches_ours(folder: str, spec, params: dict, scale: float,
                                x_raw: np.ndarray) -> np.ndarray:
  """`sae_lens.SAE.load_from_disk(folder)` encodes and decodes raw activations x_raw [batch, d_in]
  as our SAE does on scale * x_raw (its reconstruction divided by scale), within 1e-5, with a
  nontrivial fraction of features firing. Returns our codes f [batch, d_sae]."""
  from sae_lens import SAE

  theirs = SAE.load_from_disk(folder)
  ours = nnx.merge(spec.graphdef, params)
  f_ours = np.asarray(ours.encode(scale * x_raw))
  x_hat_ours = np.asarray(ours.decode(f_ours)) / scale
  with torch.no_grad():
    f_theirs = theirs.encode(torch.from_numpy(x_raw))
    x_hat_theirs = theirs.decode(f_theirs)
  assert 0 < np.mean(f_ours > 0) < 1
  np.testing.assert_allclose(f_theirs.numpy(), f_ours, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x_hat_theirs.numpy(), x_hat_ours, rtol=1e-5, atol=1e-5)
  return f_ours
