r"""Writes a feature browser: a static site of an SAE's features over a shard folder.

  python -m launch.features --workdir=W --shards=SHARDS [--model=LM] [--out=W/features] \
      [--member=i] [--top_k=20] [--max_tokens=N]
  python -m launch.features --export=FOLDER --shards=SHARDS ...   # sae.npz + sae.json

`OUT/index.html` lists every feature (density, mean activation when active, max activation;
search and sort in the page), `OUT/feature_<i>.html` shows its top contexts, activation
histogram, contexts from lower quantiles and logit effect. Opens from disk, no server.
--model defaults to the model_id of the shard folder's manifest; a sweep workdir needs --member
and writes W/features_<member> by default.
"""

from __future__ import annotations

import os

from absl import app, flags

from gsae_jax import export
from gsae_jax import lm as lm_lib
from gsae_jax.data import shards
from gsae_jax.errors import ConfigError
from gsae_jax.runs import evaluation, exporting
from gsae_jax.runs import features as browser
from launch.common import parse_flags, run_guarded

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_EXPORT = flags.DEFINE_string("export", None, "Instead of --workdir: a folder with sae.npz and "
                              "sae.json (launch/export.py).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_SHARDS = flags.DEFINE_string("shards", None, "Activation shard folder to browse.")
_MODEL = flags.DEFINE_string("model", None, "LM (short id or folder) for token text and the "
                             "unembedding; default: the shards' model_id.")
_OUT = flags.DEFINE_string("out", None, "Output folder; default: <workdir or export>/features "
                           "(a sweep's: <workdir>/features_<member>).")
_MEMBER = flags.DEFINE_integer("member", None, "Sweep workdirs: the member (0-based) to browse.")
_TOP_K = flags.DEFINE_integer("top_k", 20, "Top activating contexts per feature.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", None, "Rows of the shards to read; default all.")
flags.mark_flag_as_required("shards")


def _load_sae():
  """(params, spec, source, label, default output folder) of the chosen SAE."""
  if (_WORKDIR.value is None) == (_EXPORT.value is None):
    raise ConfigError("pass exactly one of --workdir (a training workdir) and --export (a folder "
                      "with sae.npz and sae.json)")
  if _EXPORT.value is not None:
    path = os.path.join(_EXPORT.value, "sae.npz")
    params, metadata, spec = export.load_npz(path)
    if "normalisation_scale" not in metadata:
      raise ConfigError(f"{os.path.join(_EXPORT.value, 'sae.json')}: no normalisation_scale; "
                        "re-export with launch/export.py")
    return (params, spec, metadata, f"{spec.name} SAE from {_EXPORT.value}",
            os.path.join(_EXPORT.value, "features"))
  trained = exporting.load_trained(_WORKDIR.value, _STEP.value)
  spec, member = trained.spec, _MEMBER.value or 0
  if spec.sweep and _MEMBER.value is None:
    raise ConfigError(f"--member: {_WORKDIR.value} is a sweep of {spec.members} SAEs; pass "
                      f"--member=i with 0 <= i < {spec.members}")
  if not 0 <= member < spec.members:
    raise ConfigError(f"--member: expected 0 <= member < {spec.members}, found {member}")
  params = evaluation.members(trained.params, spec)[member]
  label = f"{spec.name} SAE, {_WORKDIR.value} step {trained.step}"
  if spec.sweep:  # one folder per member, as evaluate's density_<member>.png
    return (params, spec.member(member), trained.source, f"{label} member {member}",
            os.path.join(_WORKDIR.value, f"features_{member}"))
  return params, spec, trained.source, label, os.path.join(_WORKDIR.value, "features")


def _main() -> None:
  for flag in (_TOP_K, _MAX_TOKENS):
    if flag.value is not None and flag.value <= 0:
      raise ConfigError(f"--{flag.name}: expected an int > 0, found {flag.value}")
  params, spec, source, label, default_out = _load_sae()
  evaluation.check_heldout(_SHARDS.value, spec.d_in, source)
  model = _MODEL.value or shards.read_manifest(_SHARDS.value).get("model_id")
  if not model:
    raise ConfigError(f"--model: {_SHARDS.value}/manifest.json names no model_id; pass --model")
  lm, tokenizer = lm_lib.load(model)
  if tokenizer is None:
    raise ConfigError(f"--model: {model} has no tokenizer files")
  out = _OUT.value or default_out
  title = f"{label}; {source.get('site', 'unknown site')} of {model}; shards {_SHARDS.value}"
  index = browser.write_browser(out, params, spec, source["normalisation_scale"], _SHARDS.value,
                                lm, tokenizer, top_k=_TOP_K.value, max_tokens=_MAX_TOKENS.value,
                                title=title, site=source.get("site") or "")
  print(f"wrote {index} ({spec.d_sae} feature pages)", flush=True)


def main(argv):
  del argv
  run_guarded(_main)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
