"""The embedded default model, Gemma 3 270M from the GGUF package, against transformers loaded from
the same GGUF (both see the same dequantised weights)."""

import numpy as np
import pytest
import torch

import gsae_jax.lm as lm
from gsae_jax.lm.convert import from_hf, load_hf_model, load_tokenizer, resolve

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Sparse autoencoders find interpretable features in language models.",
    "She poured a cup of tea and sat down to read the morning paper.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
]


@pytest.mark.slow
def test_gemma3_270m_matches_transformers_from_the_same_gguf():
  where, gguf, revision = resolve("gemma3-270m", None, None)
  assert revision.startswith("sha256:")
  hf = load_hf_model(where, gguf, revision)
  ours = lm.LanguageModel(from_hf(hf, model_id="gemma3-270m", revision=revision))
  c = ours.config
  assert (c.family, c.d_model, c.n_layers, c.vocab_size, c.bos_token_id) == ("gemma3", 640, 18, 262144, 2)
  assert c.windows.count(None) == 3 and c.windows[5] is None and c.windows[0] == 512
  tokenizer = load_tokenizer(where, gguf, revision)
  ids = [tokenizer(s).input_ids for s in SENTENCES]
  n = min(len(i) for i in ids)
  tokens = np.array([i[:n] for i in ids], np.int32)
  assert (tokens[:, 0] == c.bos_token_id).all() and n >= 10

  with torch.no_grad():
    out = hf(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
  hf_logits = out.logits.numpy()
  logits = np.asarray(ours.logits(tokens))
  assert np.abs(logits - hf_logits).max() < 1e-3

  targets = torch.as_tensor(tokens[:, 1:], dtype=torch.long)
  hf_loss = float(torch.nn.functional.cross_entropy(out.logits[:, :-1].double().transpose(1, 2),
                                                    targets))
  clean = float(ours.loss(tokens))
  assert abs(clean - hf_loss) < 1e-4
  assert clean < 6.0  # a real model on English, not noise (log 262144 = 12.5)

  acts = ours.activations(tokens, ["blocks.6.resid_pre", "blocks.6.resid_post"])
  for site, hidden in (("blocks.6.resid_pre", out.hidden_states[6]),
                       ("blocks.6.resid_post", out.hidden_states[7])):
    want = hidden.numpy()
    err = np.abs(np.asarray(acts[site]) - want).max()
    assert err < 1e-4 * np.abs(want).max() + 1e-4, (site, err, np.abs(want).max())

  identity = float(ours.loss_with_replacement(tokens, "blocks.6.resid_post", lambda x: x))
  assert abs(identity - clean) < 1e-5
  zeroed = float(ours.loss_with_replacement(tokens, "blocks.6.resid_post", lambda x: 0 * x))
  assert zeroed > clean + 2.0
