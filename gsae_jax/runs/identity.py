"""What run a training workdir holds, so that a re-run continues only that run.

`<workdir>/run.json` records the run's identity: every config field that changes what is
computed (architecture, sizes, hyper-parameters, seeds, steps), flattened to dotted names, plus the
identity of the activation source (model, site, normalisation, shard checksums). A re-run with
another identity is refused naming each changed field, unless the user allows the change
(`--allow_changes=optim.lr`), which is then recorded in `<workdir>/history.jsonl`.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from typing import Any, Sequence

from gsae_jax.data import shards, storage
from gsae_jax.errors import RunMismatch

RUN_FILE = "run.json"
HISTORY_FILE = "history.jsonl"
# Config fields that change how the run is executed or logged, not what it computes (the sparse
# path and batch chunks are exact; restores re-shard onto any mesh): free to change on a re-run.
_OPERATIONAL = ("train.log_every", "checkpoint", "mesh", "data.path", "data.num_threads",
                "data.prefetch", "data.verify_checksums", "train.path", "train.batch_chunks",
                "train.sparse_capacity", "train.sparse_dead_capacity", "train.cpu_row_kernels",
                "train.split_step",
                "sweep.execution")

# The block shuffle's fields: they change the batches only under data.shuffle='block'.
_BLOCK_SHUFFLE = ["data.shuffle", "data.block_rows", "data.buffer_blocks", "data.lanes"]


def _under(field: str, prefixes: Sequence[str]) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def of(config, source_info: dict, shard_checksums: bool = True) -> dict[str, Any]:
  """The identity of the run `config` on the source described by `source_info`
  (`training.source_description`): {dotted field: JSON value}. `shard_checksums` reads the
  shard folder's manifest for a digest of its checksums."""
  flat = _flatten(json.loads(config.to_json_best_effort()))
  arch = config.sae.architecture
  unused = [f"sae.{k}" for k, v in config.sae.items() if hasattr(v, "keys") and k != arch]
  if config.data.get("shuffle", "global") == "global":
    unused += _BLOCK_SHUFFLE  # as in runs recorded before the block shuffle existed
  identity = {k: v for k, v in flat.items()
              if not _under(k, _OPERATIONAL) and not _under(k, unused)}
  identity.update({f"source.{k}": v for k, v in source_info.items() if k != "source"})
  if config.data.source == "shards" and shard_checksums:
    manifest = shards.read_manifest(config.data.path)
    digest = hashlib.sha256("".join(e["sha256"] for e in manifest["shards"]).encode())
    identity["source.shard_checksums"] = digest.hexdigest()
  return json.loads(json.dumps(identity))


def _read(workdir: str) -> dict | None:
  path = storage.join(workdir, RUN_FILE)
  if not storage.exists(path):
    return None
  try:
    recorded = json.loads(storage.read_bytes(path))
    return dict(recorded["identity"])
  except (ValueError, KeyError, TypeError) as e:
    raise RunMismatch(f"{path}: unreadable ({type(e).__name__}: {e}); it records which run "
                      "this workdir holds: restore it or use a new --workdir") from None


def changes(workdir: str, identity: dict, allowed: Sequence[str] = (),
            earlier: dict | None = None) -> dict[str, list]:
  """{field: [recorded, new]} of the changes `allowed` lets through; raises RunMismatch naming
  the others. A workdir without run.json is new (no changes), or was written by an earlier
  version: then `earlier`, the identity rebuilt from its checkpoint's config and source.json, is
  compared on the fields both know."""
  recorded, where = _read(workdir), storage.join(workdir, RUN_FILE)
  if recorded is None:
    if earlier is None:
      return {}
    identity = {k: v for k, v in identity.items() if k in earlier}
    recorded = {k: v for k, v in earlier.items() if k in identity}
    where = f"{storage.join(workdir, 'checkpoints')} (an earlier version's run)"
  diff = {k: [recorded.get(k), identity.get(k)] for k in sorted(set(recorded) | set(identity))
          if recorded.get(k) != identity.get(k)}
  refused = [k for k in diff if not _under(k, allowed)]
  if refused:
    shown = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in refused[:3])
    more = f" (and {len(refused) - 3} more: {', '.join(refused[3:8])})" if len(refused) > 3 else ""
    raise RunMismatch(
        f"{where}: this workdir holds another run: {shown}{more}; use "
        f"a new --workdir, or continue this run with the change: --allow_changes="
        f"{','.join(refused)}")
  return diff


def record(workdir: str, identity: dict, changed: dict[str, list], step: int | None) -> None:
  """Writes run.json (atomically) and, for a new identity or allowed changes, a history line."""
  path = storage.join(workdir, RUN_FILE)
  new = not storage.exists(path)
  if not new and not changed:
    return
  shards.write_atomic(path, json.dumps({"identity": identity}, indent=1).encode())
  event = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv,
           "event": "started" if new and step is None else "adopted" if new else "changed",
           "step": step, "changes": changed}
  with storage.AppendFile(storage.join(workdir, HISTORY_FILE)) as f:
    f.write(json.dumps(event) + "\n")
