"""Export: what is not per architecture (hook names, the export CLI) and Gated's untied W_mag.
The .npz and SAELens round trips of every architecture are in tests/test_registry.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gsae_jax import export
from gsae_jax.errors import DataError
from gsae_jax.sae.spec import from_metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D_IN, D_SAE = 12, 40


def _spec(arch, **block):
  return from_metadata({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE,
                        "architecture_config": block})


def test_untied_gated_cannot_go_to_saelens(tmp_path):
  spec = _spec("gated", tie_r_mag=False)
  with pytest.raises(ValueError, match="untied W_mag"):
    export.save_saelens(str(tmp_path / "sl"), spec.init_params(), spec, scale=1.0, metadata={})


def test_hook_names():
  assert export.saelens_hook_name("blocks.6.resid_post") == "blocks.6.hook_resid_post"
  assert export.saelens_hook_name("blocks.2.attn_z") == "blocks.2.attn.hook_z"
  with pytest.raises(ValueError, match="expected a kind"):
    export.saelens_hook_name("blocks.2.mlp_in")


def test_export_cli_from_training_workdir(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  train = [sys.executable, "-m", "launch.train", "--config=experiments/synthetic.py",
           f"--workdir={tmp_path}", "--config.train.steps=4", "--config.train.batch_size=64",
           "--config.data.d_in=16", "--config.data.m_true=32", "--config.sae.d_sae=64",
           "--config.data.normalise_sample_tokens=2048"]
  assert subprocess.run(train, cwd=ROOT, env=env, capture_output=True, timeout=300).returncode == 0
  proc = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={tmp_path}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  params, meta, spec = export.load_npz(str(tmp_path / "export" / "sae.npz"))
  assert meta["architecture"] == spec.name == "gated"
  trained = np.load(tmp_path / "params.npz")
  for k in trained.files:
    np.testing.assert_array_equal(params[k], trained[k])
  assert meta["step"] == 4 and meta["d_in"] == 16 and meta["normalisation_scale"] > 0
  cfg = json.load(open(tmp_path / "export" / "saelens" / "cfg.json"))
  assert cfg["architecture"] == "gated" and cfg["d_in"] == 16 and cfg["d_sae"] == 64

  missing = subprocess.run([sys.executable, "-m", "launch.export", f"--workdir={tmp_path / 'none'}"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  # one line naming the folder that is not a workdir
  assert missing.returncode != 0 and missing.stderr.startswith(f"error: {tmp_path / 'none'}")
  assert missing.stderr.count("\n") == 1, missing.stderr


# ------------------------------------------------------------------- bad inputs, bad outputs

def _params(spec, seed=0):
  rng = np.random.default_rng(seed)
  return {k: rng.normal(size=v.shape).astype(np.float32) for k, v in spec.abstract_params.items()}


def _one_line(err) -> str:
  message = str(err.value)
  assert "\n" not in message, message
  return message


def _listing(folder) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_savers_refuse_non_finite_params_and_write_nothing(tmp_path, bad):
  spec = _spec("gated")
  params = _params(spec)
  params["W_gate"][[1, 3], [2, 5]] = bad
  with pytest.raises(DataError, match=r"sae.npz: parameter W_gate has 2 non-finite values "
                                      r"\(NaN or Inf\) of 480; nothing written") as err:
    export.save_npz(str(tmp_path / "sae.npz"), params, spec, {})
  _one_line(err)
  with pytest.raises(DataError, match=r"sl: parameter W_gate has 2 non-finite values"):
    export.save_saelens(str(tmp_path / "sl"), params, spec, scale=1.0, metadata={})
  assert list(tmp_path.iterdir()) == []


def test_savers_keep_an_earlier_export_on_refusal(tmp_path):
  spec = _spec("gated")
  export.save_npz(str(tmp_path / "sae.npz"), _params(spec), spec, {"step": 1})
  export.save_saelens(str(tmp_path / "sl"), _params(spec), spec, scale=2.0, metadata={})
  before, before_sl = _listing(tmp_path), _listing(tmp_path / "sl")
  params = _params(spec, seed=1)
  params["b_dec"][0] = np.nan
  with pytest.raises(DataError, match="parameter b_dec has 1 non-finite"):
    export.save_npz(str(tmp_path / "sae.npz"), params, spec, {"step": 2})
  with pytest.raises(DataError, match=r"sl: normalisation scale: expected a finite number > 0, "
                                      r"found inf"):
    export.save_saelens(str(tmp_path / "sl"), _params(spec, 1), spec, scale=float("inf"),
                        metadata={})
  assert (_listing(tmp_path), _listing(tmp_path / "sl")) == (before, before_sl)


def _disk_full_midway(file, *args, **kwargs):
  """A write that stops with ENOSPC after some bytes, to a path or an open file."""
  f = open(file, "wb") if isinstance(file, str) else file
  f.write(b"PK\x03\x04 the first bytes")
  f.flush()
  raise OSError(28, "No space left on device")


def test_save_npz_failing_midway_leaves_the_old_export(tmp_path, monkeypatch):
  """The sidecar's temp file is written, then the .npz write fails halfway: neither target
  changes and no temp file is left."""
  spec = _spec("gated")
  export.save_npz(str(tmp_path / "sae.npz"), _params(spec), spec, {"step": 1})
  before = _listing(tmp_path)
  monkeypatch.setattr(export.np, "savez", _disk_full_midway)
  with pytest.raises(OSError, match="No space left"):
    export.save_npz(str(tmp_path / "sae.npz"), _params(spec, 1), spec, {"step": 2})
  assert _listing(tmp_path) == before


def test_save_saelens_failing_midway_leaves_the_old_export(tmp_path, monkeypatch):
  spec = _spec("gated")
  export.save_saelens(str(tmp_path / "sl"), _params(spec), spec, scale=1.0, metadata={})
  before = _listing(tmp_path / "sl")
  monkeypatch.setattr(export, "save_file", lambda tensors, path: _disk_full_midway(path))
  with pytest.raises(OSError, match="No space left"):
    export.save_saelens(str(tmp_path / "sl"), _params(spec, 1), spec, scale=1.0, metadata={})
  assert _listing(tmp_path / "sl") == before


def _saved_npz(tmp_path):
  spec = _spec("gated")
  path = str(tmp_path / "sae.npz")
  export.save_npz(path, _params(spec), spec, {"step": 1})
  return path, str(tmp_path / "sae.json")


def _rewrite_npz(path, edit):
  arrays = dict(np.load(path))
  edit(arrays)
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _edit_json(path, edit):
  value = json.load(open(path))
  edit(value)
  json.dump(value, open(path, "w"))


def _nan_in_r_mag(a):
  a["r_mag"][7] = np.nan


def _int_b_dec(a):
  a["b_dec"] = np.zeros(D_IN, np.int32)


@pytest.mark.parametrize("damage, culprit, pattern", [
    (lambda p, s: os.remove(p), "npz", "missing; expected an .npz"),
    (lambda p, s: open(p, "wb").write(b"\x93NUMPY junk"), "npz", "expected an .npz archive"),
    (lambda p, s: open(p, "r+b").truncate(100), "npz", "not a readable .npz"),
    (lambda p, s: os.remove(s), "json", "missing; expected the JSON sidecar"),
    (lambda p, s: open(s, "w").write("{\"d_in\": "), "json", "not valid JSON"),
    (lambda p, s: open(s, "w").write("[12, 40]"), "json", "expected a JSON object, found a list"),
    (lambda p, s: _edit_json(s, lambda m: m.update(architecture="mystery")), "json",
     "architecture: expected one of"),
    (lambda p, s: _edit_json(s, lambda m: m.update(d_sae="40")), "json",
     "d_sae: expected an int > 0, found '40'"),
    (lambda p, s: _edit_json(s, lambda m: m["architecture_config"].update(nope=1)), "json",
     "unknown fields"),
    (lambda p, s: _edit_json(s, lambda m: m.update(d_in=13)), "npz",
     r"d_in=13, d_sae=40 \(as .*sae.json says\): W_dec has shape \(40, 12\), expected \(40, 13\)"),
    (lambda p, s: _rewrite_npz(p, lambda a: a.update(extra=np.zeros(3, np.float32))), "npz",
     r"unexpected \['extra'\]"),
    (lambda p, s: _rewrite_npz(p, lambda a: a.pop("b_mag")), "npz", r"missing \['b_mag'\]"),
    (lambda p, s: _rewrite_npz(p, _nan_in_r_mag), "npz",
     r"parameter r_mag has 1 non-finite values \(NaN or Inf\) of 40"),
    (lambda p, s: _rewrite_npz(p, _int_b_dec), "npz",
     "parameter b_dec: expected a floating-point array, found dtype int32"),
], ids=["npz_missing", "npz_is_npy", "npz_truncated", "sidecar_missing", "sidecar_not_json",
        "sidecar_list", "unknown_architecture", "d_sae_str", "unknown_block_field",
        "d_in_disagrees", "extra_array", "missing_array", "nan_array", "int_array"])
def test_load_npz_names_the_file(tmp_path, damage, culprit, pattern):
  path, sidecar = _saved_npz(tmp_path)
  damage(path, sidecar)
  with pytest.raises(DataError, match=pattern) as err:
    export.load_npz(path)
  assert _one_line(err).startswith((path if culprit == "npz" else sidecar) + ":"), err.value


def _saved_saelens(tmp_path):
  spec = _spec("gated")
  folder = tmp_path / "sl"
  export.save_saelens(str(folder), _params(spec), spec, scale=2.0, metadata={})
  return str(folder), str(folder / "cfg.json"), str(folder / "sae_weights.safetensors")


def _edit_tensors(path, edit):
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path)


def _inf_in_w_dec(t):
  t["W_dec"][2, 3] = np.inf


@pytest.mark.parametrize("damage, culprit, pattern", [
    (lambda c, w: os.remove(c), "cfg", "missing; expected the cfg.json of a SAELens folder"),
    (lambda c, w: os.remove(w), "weights", "missing; expected the weights"),
    (lambda c, w: open(c, "w").write("{"), "cfg", "not valid JSON"),
    (lambda c, w: open(c, "w").write("null"), "cfg", "expected a JSON object, found a NoneType"),
    (lambda c, w: open(w, "wb").write(b"junk"), "weights", "not a readable float32 safetensors"),
    (lambda c, w: _edit_json(c, lambda m: m.update(d_in=13)), "weights",
     r"W_dec has shape \(40, 12\), but .*cfg.json says d_sae=40, d_in=13"),
    (lambda c, w: _edit_json(c, lambda m: m.update(metadata=[1])), "cfg",
     "metadata: expected an object, found list"),
    (lambda c, w: _edit_json(c, lambda m: m["metadata"].update(gsae_jax_architecture="x")),
     "cfg", "expected one of"),
    (lambda c, w: _edit_json(c, lambda m: m.update(normalize_activations="layer_norm")), "cfg",
     "normalize_activations='layer_norm' is not supported"),
    (lambda c, w: _edit_tensors(w, _inf_in_w_dec), "weights",
     r"parameter W_dec has 1 non-finite values \(NaN or Inf\) of 480"),
], ids=["cfg_missing", "weights_missing", "cfg_not_json", "cfg_null", "weights_junk",
        "d_in_disagrees", "metadata_list", "unknown_architecture", "normalised", "inf_tensor"])
def test_load_saelens_names_the_file(tmp_path, damage, culprit, pattern):
  folder, cfg, weights = _saved_saelens(tmp_path)
  damage(cfg, weights)
  with pytest.raises(DataError, match=pattern) as err:
    export.load_saelens(folder, scale=2.0)
  assert _one_line(err).startswith((cfg if culprit == "cfg" else weights) + ":"), err.value


def test_load_saelens_refuses_a_bad_scale(tmp_path):
  folder, _, _ = _saved_saelens(tmp_path)
  with pytest.raises(DataError, match="normalisation scale: expected a finite number > 0, found 0"):
    export.load_saelens(folder, scale=0.0)
