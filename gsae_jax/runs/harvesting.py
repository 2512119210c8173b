"""Harvesting activations of an LM over text into shard folders (config: experiments/harvest_*).

The LM runs on `config.mesh` (data x model devices, parameters placed at load under
`mesh.strategy`); with several processes every process harvests its own shards of the one text
(`gsae_jax.data.harvest`), and `config.sites` lets one LM pass feed one folder per hook site.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np

from gsae_jax import configs, distributed, locking, sharding
from gsae_jax.data import harvest, shards, storage, text
from gsae_jax.errors import ConfigError

SITE_KINDS = ("resid_pre", "resid_post", "mlp_out", "attn_out", "attn_z")
TEXT_SOURCES = ("embedded", "files", "hf")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check(ok: bool, field: str, expected: str, found) -> None:
  if not ok:
    raise ConfigError(f"config.{field}: expected {expected}, found {found!r}")


def validate_lm_block(b, prefix: str = "") -> None:
  """The fields that say which LM runs over which text (model, dtype, site, layer, windows, LM
  batch, text), in a harvest config or a stream's `data.lm` block (`prefix` 'data.lm.')."""
  _check(isinstance(b.model, str) and bool(b.model), f"{prefix}model",
         "a gsae_jax.lm.load id, a local HF folder or a hub name", b.model)
  for field in ("gguf_file", "revision"):
    _check(isinstance(b[field], str), f"{prefix}{field}", "a string ('' = none)", b[field])
  _check(b.model_dtype in _DTYPES, f"{prefix}model_dtype", f"one of {tuple(_DTYPES)}",
         b.model_dtype)
  _check(b.site in SITE_KINDS, f"{prefix}site", f"one of {SITE_KINDS}", b.site)
  configs.check_int(b.layer, f"{prefix}layer", 0)
  configs.check_int(b.context_length, f"{prefix}context_length", 2, " (BOS plus one token)")
  _check(isinstance(b.exclude_bos, bool), f"{prefix}exclude_bos", "True or False", b.exclude_bos)
  configs.check_int(b.batch_size, f"{prefix}batch_size", 1, " (windows per LM call)")
  configs.check_int(b.skip_windows, f"{prefix}skip_windows", 0)
  validate_text(b.text, prefix)


def validate(c) -> None:
  """Raises ConfigError naming the first bad field; reads neither the model nor the text."""
  validate_lm_block(c)
  configs.check_int(c.num_tokens, "num_tokens", 1)
  _check(c.dtype in shards.DTYPES, "dtype", "'float32' or 'bfloat16'", c.dtype)
  _check(isinstance(c.output_dir, str) and bool(c.output_dir), "output_dir",
         "a folder for the shards", c.output_dir)
  configs.check_int(c.windows_per_shard, "windows_per_shard", 1)
  configs.check_int(c.normalise_sample_tokens, "normalise_sample_tokens", 1)
  configs.check_seed(c.seed, "seed")
  _validate_sites(c.get("sites") or ())
  if c.get("mesh"):
    _validate_mesh(c.mesh)
  _check(c.batch_size % jax.process_count() == 0, "batch_size",
         f"a multiple of the {jax.process_count()} processes (each feeds batch_size / "
         f"{jax.process_count()} windows to every LM call)", c.batch_size)
  configs.check_finite_everywhere(c)


def _validate_sites(sites) -> None:
  """config.sites: empty (the one `layer`/`site`), or distinct 'blocks.{layer}.{kind}' names."""
  _check(isinstance(sites, (list, tuple)), "sites", "a tuple of 'blocks.{layer}.{kind}' names",
         sites)
  for i, name in enumerate(sites):
    _check(isinstance(name, str) and _site_kind(name) in SITE_KINDS, f"sites[{i}]",
           f"'blocks.{{layer}}.{{kind}}' with kind in {SITE_KINDS}", name)
  _check(len(set(sites)) == len(sites), "sites", "distinct names", sites)


def _site_kind(name: str) -> str | None:
  parts = name.split(".")
  ok = len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit()
  return parts[2] if ok else None


def validate_text(t, prefix: str = "") -> None:
  """The text block (`config.<prefix>text`): source and its fields."""
  where = f"{prefix}text"
  _check(t.source in TEXT_SOURCES, f"{where}.source", f"one of {TEXT_SOURCES}", t.source)
  if t.source == "files":
    paths = t.paths
    _check(isinstance(paths, (list, tuple)) and bool(paths) and all(
        isinstance(p, str) for p in paths), f"{where}.paths",
           "a list of globs of .txt/.md/.jsonl/.parquet files", paths)
    _check(any(os.path.isfile(f) for p in paths
               for f in glob.glob(os.path.expanduser(p), recursive=True)), f"{where}.paths",
           "globs matching at least one file", paths)
  if t.source in ("files", "hf"):
    _check(isinstance(t.text_field, str) and bool(t.text_field), f"{where}.text_field",
           "the column holding the text", t.text_field)
  if t.source == "hf":
    _check(isinstance(t.hf_name, str) and bool(t.hf_name), f"{where}.hf_name",
           "a dataset name for text.source='hf'", t.hf_name)


def _validate_mesh(mesh) -> None:
  from gsae_jax.lm.partition import MESH_RULES
  data = mesh.get("data", -1)
  _check(data == -1 or configs.is_int(data) and data >= 1, "mesh.data",
         "an integer > 0, or -1 (all devices not used by 'model')", data)
  configs.check_int(mesh.get("model", 1), "mesh.model", 1)
  _check(mesh.get("strategy", "fsdp") in MESH_RULES, "mesh.strategy",
         f"one of {sorted(MESH_RULES)}", mesh.get("strategy"))


def check_output_dir(c) -> None:
  """Refuses, before the LM is loaded, an output_dir the harvest cannot use: a file, a place
  that cannot be written, or a folder holding a harvest made with another config (the
  creation config in its manifest; `harvest.harvest_targets` checks the rest once the LM is
  known). With `config.sites`, each site's folder under output_dir is checked. On an object
  store (gs://, ...) only the manifests are checked: it has no folders or permissions to ask."""
  out = c.output_dir
  if storage.is_local(out):
    _check_local_output_dir(out)
  for folder, site in site_folders(c):
    if storage.is_local(folder) and os.path.exists(folder) and not os.path.isdir(folder):
      raise ConfigError(f"config.sites: expected a folder for {site}, found a file at {folder}")
    if storage.exists(storage.join(folder, shards.MANIFEST)):
      harvest.check_creation_config(folder, shards.read_manifest(folder),
                                    creation_config(c, folder, site))


def _check_local_output_dir(out: str) -> None:
  if os.path.exists(out) and not os.path.isdir(out):
    raise ConfigError(f"config.output_dir: expected a folder, found a file at {out}")
  missing = _outermost_missing(out)
  above = os.path.dirname(missing) if missing else out  # the folder the harvest writes into
  if not os.path.isdir(above):
    raise ConfigError(f"config.output_dir: expected a folder path, found a file at {above} "
                      f"(above {out})")
  if not os.access(above, os.W_OK | os.X_OK):
    raise ConfigError(f"config.output_dir: cannot write {out}: {above} is not writable")


def site_folders(c) -> list[tuple[str, str | None]]:
  """(folder, site) per output: output_dir itself for the one `layer`/`site` (site None: named
  once the LM is known), else output_dir/<site> for each name in `config.sites`."""
  if not c.get("sites"):
    return [(c.output_dir, None)]
  return [(storage.join(c.output_dir, site), site) for site in c.sites]


def creation_config(c, folder: str, site: str | None) -> dict:
  """What a folder's manifest records as its creation config: the config of a single-site
  harvest into that folder (`sites` left out, `layer`/`site`/`output_dir` its own), so a folder
  of a multi-site pass equals one harvested alone, and resumes as one."""
  d = c.to_dict()
  d.pop("sites", None)
  if site is not None:
    layer, kind = site.split(".")[1:]
    d.update(site=kind, layer=int(layer), output_dir=folder)
  return d


def lm_mesh(c):
  """The LM's ('data', 'model') mesh from `config.mesh` over every process's devices (None
  without one: the default device)."""
  m = c.get("mesh")
  if not m:
    return None
  try:
    return sharding.make_mesh(m.get("data", -1), m.get("model", 1))
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def _check_batch_on_mesh(c, mesh) -> None:
  """Each LM call's batch must split over the mesh's data slices, and in a multi-process run
  every process must hold a contiguous part of them (its own windows' rows)."""
  if mesh is None:
    _check(jax.process_count() == 1, "mesh",
           f"a mesh over the {jax.device_count()} devices of the {jax.process_count()} processes",
           None)
    return
  data = mesh.shape["data"]
  _check(c.batch_size % data == 0, "batch_size", f"a multiple of mesh data={data}", c.batch_size)
  try:
    distributed.check_process_batch_slices(mesh)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def load_lm(c):
  """(LanguageModel, tokenizer) named by the harvest config, parameters placed on `lm_mesh(c)`
  under `config.mesh.strategy` as they are converted (each device gets its slice only)."""
  from gsae_jax import lm  # the LM stack is only needed here, not by the data pipeline

  mesh = lm_mesh(c)
  strategy = (c.get("mesh") or {}).get("strategy", "fsdp")
  return lm.load(c.model, gguf_file=c.gguf_file or None, dtype=_DTYPES[c.model_dtype],
                 revision=c.revision or None, mesh=mesh, strategy=strategy)


def text_windows(c, tokenizer, bos: int):
  """[context_length] int32 BOS-prefixed windows of the configured text, after skipping the first
  `c.skip_windows` (held-out splits: harvest or evaluate on windows training never saw)."""
  docs = text.tokenize_documents(text.documents(c.text), text.hf_encoder(tokenizer))
  return itertools.islice(text.pack_windows(docs, c.context_length, bos), c.skip_windows, None)


def run(c, progress: bool = True, lm_and_tokenizer=None) -> dict:
  """`run_sites` of a single-site config: its one manifest."""
  if c.get("sites"):
    raise ConfigError(f"config.sites: expected none here (one folder), found {tuple(c.sites)}")
  return next(iter(run_sites(c, progress, lm_and_tokenizer).values()))


def run_sites(c, progress: bool = True, lm_and_tokenizer=None) -> dict[str, dict]:
  """Checks the config and the output folders, then, holding their locks (process 0), loads the
  LM (unless given), packs the text and harvests; returns {folder: manifest}. Every refusal that
  needs no LM comes before it is loaded, and a refusal leaves no new folder behind."""
  validate(c)
  check_output_dir(c)
  _check_batch_on_mesh(c, lm_mesh(c) if lm_and_tokenizer is None
                       else getattr(lm_and_tokenizer[0], "mesh", None))
  folders = [folder for folder, _ in site_folders(c)]
  created = [_outermost_missing(folder) if storage.is_local(folder) else None
             for folder in folders]
  try:
    with contextlib.ExitStack() as locks:
      for folder in folders:
        locks.enter_context(locking.hold(folder, enabled=jax.process_index() == 0))
      return _run_locked(c, progress, lm_and_tokenizer)
  except BaseException:
    for folder, outermost in zip(folders, created):
      if outermost:
        _remove_empty(folder, outermost)
    raise


def _outermost_missing(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet (taking the lock creates it)."""
  path, missing = os.path.abspath(path), None
  while not os.path.exists(path):
    path, missing = os.path.dirname(path), path
  return missing


def _remove_empty(path: str, outermost: str) -> None:
  """Removes `path` and its parents up to `outermost` while they are empty (nothing harvested)."""
  path = os.path.abspath(path)
  with contextlib.suppress(OSError):
    while True:
      os.rmdir(path)  # fails on a folder that is not empty, which ends the removal
      if path == outermost:
        return
      path = os.path.dirname(path)


def checked_bos(model, tokenizer, block: str, given: str) -> int:
  """The LM's BOS token id (its config's, else the tokenizer's); refuses a model without
  tokenizer files or BOS id, naming `config.<block>model` and the `given` model name."""
  cfg = model.config
  if tokenizer is None:
    raise ConfigError(f"config.{block}model: no tokenizer files next to the model {given!r}")
  bos = cfg.bos_token_id if cfg.bos_token_id is not None else tokenizer.bos_token_id
  if bos is None:
    raise ConfigError(f"config.{block}model: {cfg.model_id} has no BOS token id in its config "
                      "or tokenizer")
  return int(bos)


def _run_locked(c, progress: bool, lm_and_tokenizer) -> dict[str, dict]:
  model, tokenizer = lm_and_tokenizer or load_lm(c)
  cfg = model.config
  bos = checked_bos(model, tokenizer, "", c.model)
  outputs = site_folders(c)
  sites = [site or f"blocks.{c.layer}.{c.site}" for _, site in outputs]
  for site in sites:
    if int(site.split(".")[1]) >= cfg.n_layers and c.get("sites"):
      raise ConfigError(f"config.sites: expected layers < {cfg.n_layers} (layers of "
                        f"{cfg.model_id}), found {site!r}")
  if c.layer >= cfg.n_layers and not c.get("sites"):
    raise ConfigError(f"config.layer: expected < {cfg.n_layers} (layers of {cfg.model_id}), "
                      f"found {c.layer}")
  stored = _DTYPES[c.dtype]

  def activation_fn(tokens: np.ndarray) -> list[np.ndarray]:
    # Cast on device: a bf16 harvest moves bf16 to the host, never a float32 copy.
    out = model.activations(tokens, sites, dtype=stored)
    return [np.asarray(out[site]) for site in sites]

  targets = []
  for (folder, given), site in zip(outputs, sites):
    spec = harvest.HarvestSpec(
        model_id=cfg.model_id, revision=getattr(cfg, "revision", None), site=site,
        layer=int(site.split(".")[1]),
        d_model=int(model.site_dim(site)),  # attn_z is n_heads * d_head, not always d_model
        context_length=c.context_length, num_tokens=c.num_tokens, bos_token_id=bos,
        dtype=c.dtype, exclude_bos=c.exclude_bos, windows_per_shard=c.windows_per_shard,
        batch_size=c.batch_size, normalise_sample_tokens=c.normalise_sample_tokens, seed=c.seed)
    targets.append(harvest.Target(folder, spec, creation_config(c, folder, given)))
  processes = harvest.Processes(jax.process_index(), jax.process_count(), _allgather)
  manifests = harvest.harvest_targets(targets, text_windows(c, tokenizer, bos),
                                      activation_fn, progress, processes)
  return {t.folder: m for t, m in zip(targets, manifests)}


def _allgather(code: int) -> list[int]:
  """Every process's `code`, in process order (a barrier across the job)."""
  if jax.process_count() == 1:
    return [code]
  from jax.experimental import multihost_utils
  return [int(x) for x in multihost_utils.process_allgather(np.int32(code))]
