r"""Exports a trained SAE from a training workdir.

  python -m launch.export --workdir=DIR [--step=N] [--out=DIR/export] [--formats=npz,saelens]
      [--member=I]   (a sweep workdir: which member)

Writes `<out>/sae.npz` + `<out>/sae.json` (our names and layouts, normalised-activation units,
with the config, site, layer, model id and normalisation constant) and `<out>/saelens/`
(`sae_weights.safetensors` + `cfg.json`, normalisation folded in: acts on raw activations).
Every format is written to a staging folder first and moved into `<out>` only when all succeeded,
so a refusal (non-finite parameters, an SAE SAELens cannot hold) leaves `<out>` as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from absl import app, flags

from gsae_jax import export
from gsae_jax.errors import ConfigError
from gsae_jax.runs import evaluation, exporting
from launch.common import parse_flags, run_guarded

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OUT = flags.DEFINE_string("out", None, "Output folder; default: <workdir>/export.")
_MEMBER = flags.DEFINE_integer("member", None, "Sweep workdirs: the member (0-based) to export.")
_FORMATS = flags.DEFINE_list("formats", ["npz", "saelens"], "Any of npz, saelens.")
flags.mark_flag_as_required("workdir")


def _write(stage: str, trained, params, spec) -> list[str]:
  """Writes the asked formats into `stage`; returns the names written."""
  source, step = trained.source, trained.step
  written = []
  if "npz" in _FORMATS.value:
    metadata = {"step": step, "config": trained.config.to_dict(), **source}
    export.save_npz(os.path.join(stage, "sae.npz"), params, spec, metadata)
    written += ["sae.npz", "sae.json"]
  if "saelens" in _FORMATS.value:
    saelens_meta = {"model_name": source.get("model_id"),
                    "hook_name": export.saelens_hook_name(source.get("site")),
                    "context_size": source.get("context_length"),
                    "prepend_bos": True, "gsae_jax_step": step}
    export.save_saelens(os.path.join(stage, "saelens"), params, spec,
                        scale=source["normalisation_scale"], metadata=saelens_meta)
    written.append("saelens")
  return written


def _main() -> None:
  unknown = set(_FORMATS.value) - {"npz", "saelens"}
  if unknown:
    raise ConfigError(f"--formats: unknown {sorted(unknown)}; expected npz and/or saelens")
  trained = exporting.load_trained(_WORKDIR.value, _STEP.value)
  spec, params = trained.spec, trained.params
  if spec.sweep:
    values = dict(enumerate(spec.sweep.grid))
    if _MEMBER.value not in values:
      raise ConfigError(f"{_WORKDIR.value} holds a sweep over {spec.sweep.coefficient} {values}: "
                        f"pass --member=<one of {sorted(values)}>, found {_MEMBER.value}")
    params = evaluation.members(params, spec)[_MEMBER.value]
    spec = spec.member(_MEMBER.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "export")
  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  stage = tempfile.mkdtemp(prefix=".export-", dir=parent)
  try:
    written = _write(stage, trained, params, spec)
    os.makedirs(out, exist_ok=True)
    for name in written:
      target = os.path.join(out, name)
      if os.path.isdir(target):
        shutil.rmtree(target)
      os.replace(os.path.join(stage, name), target)
  finally:
    shutil.rmtree(stage, ignore_errors=True)
  for name in written:
    print(f"wrote {os.path.join(out, name)}", flush=True)


def main(argv):
  del argv
  run_guarded(_main)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
