"""A workdir's run identity: what counts as the same run, and how changes are refused or allowed."""

import json

import pytest

from gsae_jax.errors import RunMismatch
from gsae_jax.runs import identity

SOURCE = {"d_in": 16, "normalisation_scale": 2.0, "source": "synthetic"}


def test_identity_keeps_what_defines_the_run(tiny_config):
  run = identity.of(tiny_config, SOURCE)
  assert run["optim.lr"] == tiny_config.optim.lr and run["sae.gated.l1_coefficient"] > 0
  assert run["source.normalisation_scale"] == 2.0 and "source.source" not in run
  # how it runs or logs, and other architectures' blocks, are not part of it
  assert not [k for k in run if k.startswith(("checkpoint.", "mesh.", "sae.topk."))]
  assert "train.log_every" not in run and "train.path" not in run


def test_changes_refused_by_field_allowed_when_named_and_recorded(tiny_config, tmp_path):
  w = str(tmp_path)
  assert identity.changes(w, identity.of(tiny_config, SOURCE)) == {}  # nothing recorded yet
  identity.record(w, identity.of(tiny_config, SOURCE), {}, None)

  same = tiny_config.copy_and_resolve_references()
  same.train.log_every, same.mesh.model = 7, 2
  assert identity.changes(w, identity.of(same, SOURCE)) == {}

  other = tiny_config.copy_and_resolve_references()
  other.optim.lr, other.sae.d_sae = 1e-2, 128
  new = identity.of(other, {**SOURCE, "normalisation_scale": 3.0})
  with pytest.raises(RunMismatch) as e:
    identity.changes(w, new, allowed=("optim.lr",))
  msg = str(e.value)
  assert "sae.d_sae: 64 -> 128" in msg and "source.normalisation_scale: 2.0 -> 3.0" in msg
  assert "optim.lr" not in msg.split("--allow_changes=")[1] and "run.json" in msg

  changed = identity.changes(w, new, allowed=("optim.lr", "sae.d_sae", "source"))
  assert changed == {"optim.lr": [tiny_config.optim.lr, 1e-2], "sae.d_sae": [64, 128],
                     "source.normalisation_scale": [2.0, 3.0]}
  identity.record(w, new, changed, step=5)
  history = [json.loads(l) for l in (tmp_path / identity.HISTORY_FILE).read_text().splitlines()]
  assert [h["event"] for h in history] == ["started", "changed"]
  assert history[1]["step"] == 5 and history[1]["changes"]["sae.d_sae"] == [64, 128]
  assert identity.changes(w, new) == {}


def test_unreadable_run_file_is_refused(tmp_path):
  (tmp_path / identity.RUN_FILE).write_text("{not json")
  with pytest.raises(RunMismatch, match="run.json: unreadable"):
    identity.changes(str(tmp_path), {})


def test_earlier_version_identity_is_compared_on_shared_fields(tiny_config, tmp_path):
  earlier = identity.of(tiny_config, {"d_in": 16})  # no normalisation_scale recorded then
  now = tiny_config.copy_and_resolve_references()
  assert identity.changes(str(tmp_path), identity.of(now, SOURCE), earlier=earlier) == {}
  now.sae.d_sae = 128
  with pytest.raises(RunMismatch, match=r"checkpoints \(an earlier version's run\).*sae.d_sae"):
    identity.changes(str(tmp_path), identity.of(now, SOURCE), earlier=earlier)
