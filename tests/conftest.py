"""Test-wide setup: 8 fake CPU devices and malloc that reuses freed memory (both set before
JAX starts), and shared tiny configs."""

import os

from gsae_jax import host_memory

host_memory.keep_freed_memory()

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


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
  """A 2-layer GPT-2 and a WordLevel tokenizer trained on the embedded corpus, saved as an HF
  folder (no downloads)."""
  import tokenizers
  import torch
  import transformers

  from gsae_jax.data.text import embedded_corpus

  folder = tmp_path_factory.mktemp("tiny_gpt2")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  trainer = tokenizers.trainers.WordLevelTrainer(vocab_size=4000,
                                                 special_tokens=["<bos>", "<unk>"])
  tok.train_from_iterator(embedded_corpus(), trainer)
  hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                                unk_token="<unk>")
  hf_tok.save_pretrained(folder)
  bos = hf_tok.bos_token_id
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=len(hf_tok), n_positions=64, n_embd=32, n_layer=2,
                                   n_head=2, bos_token_id=bos, eos_token_id=bos,
                                   initializer_range=0.3)  # far from uniform predictions
  transformers.GPT2LMHeadModel(config).save_pretrained(folder)
  return str(folder)
