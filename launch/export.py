r"""Exports a trained SAE from a training workdir.

  python -m launch.export --workdir=DIR [--step=N] [--out=DIR/export] [--formats=npz,saelens]

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
from gsae_jax.runs import exporting
from launch.common import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
_OUT = flags.DEFINE_string("out", None, "Output folder; default: <workdir>/export.")
_FORMATS = flags.DEFINE_list("formats", ["npz", "saelens"], "Any of npz, saelens.")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  quiet_library_logs()
  unknown = set(_FORMATS.value) - {"npz", "saelens"}
  if unknown:
    sys.exit(f"--formats: unknown {sorted(unknown)}; expected npz and/or saelens")
  try:
    step, params, config, source = exporting.load_params(_WORKDIR.value, _STEP.value)
  except (CheckpointError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  out = _OUT.value or os.path.join(_WORKDIR.value, "export")
  os.makedirs(out, exist_ok=True)
  metadata = {"step": step, "config": config, **source}
  if "npz" in _FORMATS.value:
    export.save_npz(os.path.join(out, "sae.npz"), params, metadata)
    print(f"wrote {out}/sae.npz and {out}/sae.json", flush=True)
  if "saelens" in _FORMATS.value:
    saelens_meta = {"model_name": source.get("model_id"),
                    "hook_name": export.saelens_hook_name(source.get("site")),
                    "context_size": source.get("context_length"),
                    "prepend_bos": True, "gsae_jax_step": step}
    export.save_saelens(os.path.join(out, "saelens"), params,
                        scale=source["normalisation_scale"], metadata=saelens_meta)
    print(f"wrote {out}/saelens (sae_weights.safetensors, cfg.json)", flush=True)


if __name__ == "__main__":
  app.run(main)
