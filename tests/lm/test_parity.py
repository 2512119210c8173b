"""Each family: tiny random transformers model -> save_pretrained -> our converter; logits and every
hook site must match PyTorch (fp32, max abs diff < 1e-4)."""

import numpy as np
import pytest

import gsae_jax.lm as lm
from tests.lm.reference import TINY_CONFIGS, VOCAB, hf_sites, tiny_model

FAMILY_OF = {"gpt_neox_sequential": "gpt_neox"}


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_and_sites_match_transformers(name, tmp_path):
  hf = tiny_model(name)
  hf.save_pretrained(tmp_path)
  ours, tokenizer = lm.load(str(tmp_path))
  assert tokenizer is None  # the tiny folder has no tokenizer files
  assert ours.config.family == FAMILY_OF.get(name, name)
  assert ours.config.model_id == str(tmp_path) and ours.config.revision is None
  # seq 12 > the tiny sliding window (5), so local/global layers really differ
  tokens = np.random.default_rng(0).integers(3, VOCAB, (2, 12))
  tokens[:, 0] = hf.config.bos_token_id
  hf_logits, hf_acts = hf_sites(hf, tokens)
  assert len(hf_acts) == 5 * ours.config.n_layers
  np.testing.assert_allclose(np.asarray(ours.logits(tokens)), hf_logits, atol=1e-4, rtol=0)
  acts = ours.activations(tokens, sorted(hf_acts))
  for site, want in hf_acts.items():
    assert acts[site].shape == want.shape == (2, 12, ours.site_dim(site)), site
    np.testing.assert_allclose(np.asarray(acts[site]), want, atol=1e-4, rtol=0, err_msg=site)
