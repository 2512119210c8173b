r"""Exports a trained SAE from a training workdir.

  python -m launch.export --workdir=DIR [--step=N] [--out=DIR/export] [--formats=npz,saelens]
      [--member=I]   (a sweep workdir: which member)

Writes `<out>/sae.npz` + `<out>/sae.json` (our names and layouts, normalised-activation units,
with the config, site, layer, model id and normalisation constant) and `<out>/saelens/`
(`sae_weights.safetensors` + `cfg.json`, normalisation folded in: acts on raw activations).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from gsae_jax import export
from gsae_jax.checkpoint import CheckpointError
from gsae_jax.runs import evaluation, exporting
from launch.common import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OUT = flags.DEFINE_string("out", None, "Output folder; default: <workdir>/export.")
_MEMBER = flags.DEFINE_integer("member", None, "Sweep workdirs: the member (0-based) to export.")
_FORMATS = flags.DEFINE_list("formats", ["npz", "saelens"], "Any of npz, saelens.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  quiet_library_logs()
  unknown = set(_FORMATS.value) - {"npz", "saelens"}
  if unknown:
    sys.exit(f"--formats: unknown {sorted(unknown)}; expected npz and/or saelens")
  try:
    trained = exporting.load_trained(_WORKDIR.value, _STEP.value)
  except (CheckpointError, FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")
  spec, source, step, params = trained.spec, trained.source, trained.step, trained.params
  if spec.sweep:
    values = dict(enumerate(spec.sweep.grid))
    if _MEMBER.value not in values:
      sys.exit(f"error: {_WORKDIR.value} holds a sweep over {spec.sweep.coefficient} {values}: "
               f"pass --member=<one of {sorted(values)}>, found {_MEMBER.value}")
    params = evaluation.members(params, spec)[_MEMBER.value]
    spec = spec.member(_MEMBER.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "export")
  os.makedirs(out, exist_ok=True)
  metadata = {"step": step, "config": trained.config.to_dict(), **source}
  if "npz" in _FORMATS.value:
    export.save_npz(os.path.join(out, "sae.npz"), params, spec, metadata)
    print(f"wrote {out}/sae.npz and {out}/sae.json", flush=True)
  if "saelens" in _FORMATS.value:
    saelens_meta = {"model_name": source.get("model_id"),
                    "hook_name": export.saelens_hook_name(source.get("site")),
                    "context_size": source.get("context_length"),
                    "prepend_bos": True, "gsae_jax_step": step}
    try:
      export.save_saelens(os.path.join(out, "saelens"), params, spec,
                          scale=source["normalisation_scale"], metadata=saelens_meta)
    except ValueError as e:
      sys.exit(f"error: {e}")
    print(f"wrote {out}/saelens (sae_weights.safetensors, cfg.json)", flush=True)


if __name__ == "__main__":
  app.run(main)
