"""Adversarial cases through the real CLIs (issue 15, "Hardening").

Every case runs a launcher (`python -m launch.train|harvest|export|evaluate|sweep`) as a
subprocess and asserts the contract for an expected failure: exit status 1, no traceback, and
stderr's last non-empty line `error: <one line naming the culprit>` (absl's own short flag error
is accepted for a flag it cannot parse); and that the workdir, export folder or shard folder is
byte-identical to before (for divergence: the last good checkpoint is intact). One case (the data
running out with `data.num_epochs=1`) is a clean end: exit 0.

Fixtures are cheap and shared: tiny shard folders are written in-process through the real harvest
code with a fake LM (no model), one trained workdir is copied per test (never retrained), and the
harvest CLI cases that need an LM use the session's tiny GPT-2 (`tiny_lm`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from gsae_jax.data import harvest as harvest_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One CPU device per launcher: faster to start and compile; meshes are tested elsewhere.
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
ENV.setdefault("JAX_PLATFORMS", "cpu")
TIMEOUT = 300  # a hang fails the test instead of blocking the suite

D = 8           # width of the tiny shard folders
ROWS = 512      # rows per shard folder: 32 windows x 16 non-BOS tokens, 4 shards of 128 rows
BATCH = 64      # -> 8 batches per epoch
CONTEXT = 17
BOS = 0


# ----------------------------------------------------------------------------------- helpers

def sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def snapshot(folder) -> dict:
  """{relative path: sha256} of every file under `folder` (sub-folders as 'name/': 'dir').
  A missing folder and an empty one both give {}: neither holds a byte."""
  folder = str(folder)
  if os.path.isfile(folder):
    return {".": sha256(folder)}
  out = {}
  if not os.path.isdir(folder):
    return out
  for dirpath, dirnames, filenames in os.walk(folder):
    rel = os.path.relpath(dirpath, folder)
    for d in dirnames:
      out[os.path.normpath(os.path.join(rel, d)) + "/"] = "dir"
    for f in filenames:
      out[os.path.normpath(os.path.join(rel, f))] = sha256(os.path.join(dirpath, f))
  return out


def assert_unchanged(before: dict, folder, what: str = "folder") -> None:
  after = snapshot(folder)
  if after != before:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    pytest.fail(f"{what} {folder} changed: added {added[:10]}, removed {removed[:10]}, "
                f"changed {changed[:10]}")


def _nonempty_lines(text: str) -> list[str]:
  return [l for l in text.splitlines() if l.strip()]


def _detail(proc) -> str:
  return (f"exit status {proc.returncode}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}\n"
          f"--- stdout (tail) ---\n{proc.stdout[-1500:]}")


def assert_one_line_error(proc, *culprits) -> str:
  """Exit status 1, no traceback, and a one-line error naming every culprit (a culprit given as
  a tuple is satisfied by any one of its strings). Returns the message."""
  assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, _detail(proc)
  assert proc.returncode == 1, _detail(proc)
  lines = _nonempty_lines(proc.stderr)
  assert lines, "nothing on stderr\n" + _detail(proc)
  last = lines[-1].strip()
  if last.startswith("error:"):
    message = last
  else:
    # absl's own flag error: 'FATAL Flags parsing error: ...' then 'Pass --helpshort ...'.
    fatal = [i for i, l in enumerate(lines) if l.startswith("FATAL Flags parsing error")]
    assert fatal and last.startswith("Pass --helpshort"), (
        "the last stderr line is not 'error: ...' (nor absl's flag error)\n" + _detail(proc))
    block = lines[fatal[-1]:-1]
    assert len(block) <= 6, "absl's flag error is not short\n" + _detail(proc)
    message = " ".join(l.strip() for l in block)
  for culprit in culprits:
    options = (culprit,) if isinstance(culprit, str) else tuple(culprit)
    assert any(o in message for o in options), (
        f"the error does not name {' or '.join(map(repr, options))}: {message!r}\n" + _detail(proc))
  print(message)  # shown with `pytest -rP`
  return message


def run_cli(module: str, *args, timeout: int = TIMEOUT, max_file_bytes: int | None = None):
  """Runs `python -m launch.<module> args`. With `max_file_bytes`, no file it writes may grow past
  that size (RLIMIT_FSIZE, SIGXFSZ ignored: the write fails with EFBIG, an OSError): a full disk.
  The limit is set by a shell around the launcher rather than a preexec_fn, which would run
  Python in a fork of this multi-threaded (JAX) process."""
  cmd = [sys.executable, "-m", f"launch.{module}", *map(str, args)]
  if max_file_bytes is not None:
    assert max_file_bytes % 1024 == 0  # ulimit -f counts 1024-byte blocks
    cmd = ["bash", "-c", f'ulimit -f {max_file_bytes // 1024} && trap "" XFSZ && exec "$@"',
           "bash", *cmd]
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def popen_cli(module: str, *args):
  cmd = [sys.executable, "-m", f"launch.{module}", *map(str, args)]
  return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)


def checkpoint_steps(workdir) -> list[int]:
  path = os.path.join(str(workdir), "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _strict_json(line: str):
  def refuse(name):
    raise ValueError(f"non-standard JSON constant {name}")
  return json.loads(line, parse_constant=refuse)


def _stop(proc) -> None:
  if proc.poll() is None:
    proc.kill()
  proc.wait(timeout=60)


# ----------------------------------------------------------------------------------- fixtures

def _fake_lm(d: int, gain: float = 1.0):
  """tokens [B, T] -> [B, T, d]: a smooth fixed function of (token, position)."""
  def fn(tokens):
    tokens = np.asarray(tokens)
    pos = np.arange(tokens.shape[1])[None, :, None]
    x = gain * np.sin(0.37 * tokens[..., None] + 1.3 * np.arange(d) + 0.05 * pos) + 0.1
    return x.astype(np.float32)
  return fn


def _windows(n: int):
  body = CONTEXT - 1
  for w in range(n):
    yield np.concatenate([[BOS], 1 + w * body + np.arange(body)]).astype(np.int32)


def _make_shards(folder, d=D, gain=1.0, **spec) -> str:
  kw = dict(model_id="fake/lm", site="blocks.1.resid_post", layer=1, d_model=d,
            context_length=CONTEXT, num_tokens=ROWS, bos_token_id=BOS, windows_per_shard=8,
            batch_size=4, normalise_sample_tokens=ROWS)
  kw.update(spec)
  harvest_lib.harvest(str(folder), _windows(ROWS // (CONTEXT - 1)), _fake_lm(kw["d_model"], gain),
                      harvest_lib.HarvestSpec(**kw), {"test": "adversarial"}, progress=False)
  return str(folder)


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
  """Finished harvests with the same row count. A: the training data. B_site: A's bytes under
  another site and layer. B_model: A's bytes from another model. B_norm: same site and model,
  other activations (other checksums and normalisation). C_width: another width."""
  root = tmp_path_factory.mktemp("shards")
  return {
      "A": _make_shards(root / "A"),
      "B_site": _make_shards(root / "B_site", site="blocks.2.resid_post", layer=2),
      "B_model": _make_shards(root / "B_model", model_id="fake/other-lm"),
      "B_norm": _make_shards(root / "B_norm", gain=3.0),
      "C_width": _make_shards(root / "C_width", d=12),
  }


BASE = {
    "data.d_in": D, "sae.d_sae": 32, "train.steps": 4, "train.batch_size": BATCH,
    "train.log_every": 2, "checkpoint.save_every": 2, "optim.warmup_steps": 2,
    "optim.lr": 0.001, "sae.gated.l1_coefficient": 0.5, "train.feature_window_tokens": 256,
}


def train_args(workdir, data, *extra, **overrides) -> list[str]:
  """launch.train flags on shard folder `data`; overrides use '__' for '.' in field names."""
  fields = dict(BASE)
  fields.update({k.replace("__", "."): v for k, v in overrides.items()})
  return ["--config=experiments/shards.py", f"--workdir={workdir}", f"--config.data.path={data}",
          *(f"--config.{k}={v}" for k, v in fields.items()), *extra]


@pytest.fixture(scope="module")
def trained(shard_sets, tmp_path_factory):
  """A finished run on A (4 steps, checkpoints at 2 and 4). Tests copy it; never modify it."""
  workdir = tmp_path_factory.mktemp("trained") / "W"
  proc = run_cli("train", *train_args(workdir, shard_sets["A"]))
  assert proc.returncode == 0, _detail(proc)
  assert checkpoint_steps(workdir) == [2, 4], checkpoint_steps(workdir)
  return str(workdir)


@pytest.fixture(scope="module")
def trained_untied_sweep(shard_sets, tmp_path_factory):
  """A finished 2-member sweep of untied Gated SAEs (sae.gated.tie_r_mag=False)."""
  workdir = tmp_path_factory.mktemp("trained_sweep") / "W"
  proc = run_cli("train", *train_args(workdir, shard_sets["A"], sweep__grid="(0.25,0.5)",
                                      sae__gated__tie_r_mag=False, train__steps=2))
  assert proc.returncode == 0, _detail(proc)
  return str(workdir)


@pytest.fixture
def workdir_copy(trained, tmp_path):
  dst = tmp_path / "W"
  shutil.copytree(trained, dst)
  return str(dst)


@pytest.fixture
def shards_copy(shard_sets, tmp_path):
  """A writable copy of shard folder A."""
  dst = tmp_path / "A"
  shutil.copytree(shard_sets["A"], dst)
  return str(dst)


def _edit_manifest(folder, edit) -> None:
  path = os.path.join(folder, "manifest.json")
  with open(path) as f:
    m = json.load(f)
  edit(m)
  with open(path, "w") as f:
    json.dump(m, f, indent=2)  # allow_nan: writes Infinity / NaN where a case puts them


# ------------------------------------------------------------------ config validation (train)

@pytest.mark.parametrize("override, culprit", [
    ({"optim__lr": "inf"}, "optim.lr"),
    ({"optim__lr": "nan"}, "optim.lr"),
    ({"sae__gated__l1_coefficient": "inf"}, "sae.gated.l1_coefficient"),
    ({"sweep__grid": "(0.1,inf)"}, "sweep.grid"),    # absl gives the string 'inf'
    ({"sweep__grid": "(0.1,1e999)"}, "sweep.grid"),  # a float inf
    ({"optim__eps": -1}, "optim.eps"),
    ({"train__batch_size": 0}, "train.batch_size"),
    ({"data__d_in": 12}, "data.d_in"),
], ids=["lr_inf", "lr_nan", "l1_inf", "grid_inf_str", "grid_inf_float", "eps_negative",
        "batch_size_0", "d_in_mismatch"])
def test_train_rejects_bad_config_writing_nothing(shard_sets, tmp_path, override, culprit):
  workdir = tmp_path / "W"
  data_before = snapshot(shard_sets["A"])
  proc = run_cli("train", *train_args(workdir, shard_sets["A"], **override))
  assert_one_line_error(proc, culprit)
  assert_unchanged({}, workdir, "workdir")
  assert_unchanged(data_before, shard_sets["A"], "shard folder")


def test_train_refuses_huge_d_sae_before_allocating(shard_sets, tmp_path):
  workdir = tmp_path / "W"
  t0 = time.time()
  proc = run_cli("train", *train_args(workdir, shard_sets["A"], sae__d_sae=17179869184),
                 timeout=120)
  assert_one_line_error(proc, ("params", "opt_state", "gradients", "activations", "memory"))
  assert time.time() - t0 < 120
  assert_unchanged({}, workdir, "workdir")


@pytest.mark.parametrize("module, flags", [
    ("train", ["--workdir={tmp}/W"]),
    ("train", ["--workdir={tmp}/W", "--config.optim.lr=0.1"]),  # an override reads the config
    ("harvest", ["--config.layer=1"]),                          # while absl parses the flags
    ("sweep", ["--out={tmp}/D"]),
], ids=["train", "train_with_override", "harvest_with_override", "sweep"])
def test_missing_config_file_is_a_short_error(tmp_path, module, flags):
  proc = run_cli(module, "--config=experiments/nope.py", *(f.format(tmp=tmp_path) for f in flags))
  assert_one_line_error(proc, "nope.py")
  assert_unchanged({}, tmp_path / "W")
  assert_unchanged({}, tmp_path / "D")


def test_train_refuses_read_only_workdir():
  workdir = "/proc/gsae_adversarial/W"  # read-only even for root (CI runs as root)
  proc = run_cli("train", "--config=experiments/synthetic.py", f"--workdir={workdir}",
                 "--config.data.d_in=8", "--config.data.m_true=16", "--config.sae.d_sae=16",
                 "--config.train.steps=2", "--config.train.batch_size=32",
                 "--config.data.normalise_sample_tokens=256")
  assert_one_line_error(proc, "/proc/gsae_adversarial")
  assert not os.path.exists(workdir)


# ----------------------------------------------------------------------------- run identity

@pytest.mark.parametrize("override, field, old, new", [
    ({"optim__lr": 0.002}, "optim.lr", "0.001", "0.002"),
    ({"sae__gated__l1_coefficient": 0.25}, "sae.gated.l1_coefficient", "0.5", "0.25"),
    ({"sae__d_sae": 64}, "sae.d_sae", "32", "64"),
], ids=["lr", "l1_coefficient", "d_sae"])
def test_rerun_with_changed_hyperparameter_is_refused(shard_sets, workdir_copy, override, field,
                                                      old, new):
  before = snapshot(workdir_copy)
  proc = run_cli("train", *train_args(workdir_copy, shard_sets["A"], **override))
  assert_one_line_error(proc, field, old, new)
  assert_unchanged(before, workdir_copy, "workdir")


@pytest.mark.parametrize("other, culprit", [
    ("B_site", ("site", "layer")),
    ("B_model", "model"),
    ("B_norm", ("normalis", "sha256", "checksum")),
], ids=["other_site", "other_model", "other_activations_same_rows"])
def test_rerun_on_other_shards_is_refused(shard_sets, workdir_copy, other, culprit):
  before = snapshot(workdir_copy)
  proc = run_cli("train", *train_args(workdir_copy, shard_sets[other]))
  assert_one_line_error(proc, culprit)
  assert_unchanged(before, workdir_copy, "workdir")


def test_refused_rerun_on_other_shards_keeps_the_export_labelled_right(shard_sets, workdir_copy,
                                                                       tmp_path):
  """The report's first finding as written: a refused re-run on B with d_sae doubled used to
  overwrite source.json and config.json, so export labelled A's SAE with B's hook and scale."""
  before = snapshot(workdir_copy)
  proc = run_cli("train", *train_args(workdir_copy, shard_sets["B_site"], sae__d_sae=64))
  assert_one_line_error(proc, "sae.d_sae", "source.site")
  assert "unreadable" not in proc.stderr and "--restore_step" not in proc.stderr
  assert_unchanged(before, workdir_copy, "workdir")
  out = tmp_path / "export"
  exported = run_cli("export", f"--workdir={workdir_copy}", f"--out={out}")
  assert exported.returncode == 0, _detail(exported)
  cfg = json.loads((out / "saelens" / "cfg.json").read_text())
  assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
  a_scale = json.loads(open(os.path.join(shard_sets["A"], "manifest.json")).read())
  assert cfg["metadata"]["gsae_jax_folded_scale"] == pytest.approx(
      a_scale["normalisation"]["scale"])
  assert json.loads((out / "sae.json").read_text())["site"] == "blocks.1.resid_post"


def test_rerun_identical_command_is_accepted(shard_sets, workdir_copy):
  proc = run_cli("train", *train_args(workdir_copy, shard_sets["A"]))
  assert proc.returncode == 0, _detail(proc)
  assert "Traceback" not in proc.stderr
  assert checkpoint_steps(workdir_copy) == [2, 4]


def test_allow_changes_accepts_and_records_the_change(shard_sets, workdir_copy):
  proc = run_cli("train", *train_args(workdir_copy, shard_sets["A"], "--allow_changes=optim.lr",
                                      optim__lr=0.002))
  assert proc.returncode == 0, _detail(proc)
  assert "Traceback" not in proc.stderr
  history = os.path.join(workdir_copy, "history.jsonl")
  assert os.path.exists(history), "no history.jsonl after an allowed change"
  records = [_strict_json(l) for l in open(history).read().splitlines() if l.strip()]
  assert records and "optim.lr" in json.dumps(records[-1]), records


# ------------------------------------------------------------------------------------- lock

def _wait_for_lock(proc, workdir, timeout=120.0) -> str:
  lock = os.path.join(workdir, ".lock")
  deadline = time.time() + timeout
  while not os.path.exists(lock) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert os.path.exists(lock), (f"{lock} never appeared while the run held the workdir "
                                f"(holder exit status {proc.poll()})")
  return lock


def test_second_run_on_a_held_workdir_is_refused(shard_sets, tmp_path):
  workdir = str(tmp_path / "W")
  args = train_args(workdir, shard_sets["A"], train__steps=10**7, train__log_every=10**6,
                    checkpoint__save_every=10**6)
  holder = popen_cli("train", *args)
  try:
    lock = _wait_for_lock(holder, workdir)
    proc = run_cli("train", *args)
    assert holder.poll() is None, "the holder ended before the second run was refused"
    assert_one_line_error(proc, f"in use by pid {holder.pid}")
    holder.send_signal(signal.SIGTERM)  # saves a checkpoint and exits 0
    assert holder.wait(timeout=120) == 0
    assert not os.path.exists(lock), "the lock file outlived its holder's clean exit"
  finally:
    _stop(holder)


def test_lock_of_a_killed_holder_is_taken_over(shard_sets, tmp_path):
  workdir = str(tmp_path / "W")
  args = train_args(workdir, shard_sets["A"], train__steps=2000, train__log_every=1000,
                    checkpoint__save_every=1000)
  holder = popen_cli("train", *args)
  try:
    lock = _wait_for_lock(holder, workdir)
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=60) == -signal.SIGKILL, "the holder ended before it was killed"
  finally:
    _stop(holder)
  assert os.path.exists(lock)  # the dead holder's lock file stays behind: the case under test
  proc = run_cli("train", *args)
  assert proc.returncode == 0, _detail(proc)
  assert "Traceback" not in proc.stderr
  assert os.path.exists(os.path.join(workdir, "params.npz"))
  assert not os.path.exists(lock)


# ------------------------------------------------------------------ divergence, end of data

def test_divergence_stops_keeping_the_last_good_checkpoint(shard_sets, tmp_path):
  workdir = str(tmp_path / "W")
  # Warm-up from lr 0: step 1 is harmless and checkpointed, the next ones blow up.
  proc = run_cli("train", *train_args(workdir, shard_sets["A"], optim__lr=1e30,
                                      optim__warmup_steps=2, train__steps=20,
                                      train__log_every=1, checkpoint__save_every=1))
  steps = checkpoint_steps(workdir)
  assert steps, "no checkpoint at all\n" + _detail(proc)
  message = assert_one_line_error(proc, "step")
  assert steps[-1] < 20, steps
  assert re.search(rf"\b{steps[-1]}\b", message), f"names no last good step {steps[-1]}: {message}"
  assert not os.path.exists(os.path.join(workdir, "params.npz"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      _strict_json(line)  # no NaN / Infinity tokens
  from gsae_jax.runs import exporting  # the last good checkpoint restores, all finite
  sae = exporting.load_trained(workdir, steps[-1])
  for name, value in sae.params.items():
    assert np.isfinite(np.asarray(value)).all(), (name, message)


def test_data_running_out_ends_cleanly(shard_sets, tmp_path):
  workdir = str(tmp_path / "W")
  proc = run_cli("train", *train_args(workdir, shard_sets["A"], data__num_epochs=1,
                                      train__steps=100, checkpoint__save_every=1000))
  assert proc.returncode == 0, _detail(proc)
  assert "Traceback" not in proc.stderr
  assert re.search(r"ran out|exhausted", proc.stdout + proc.stderr, re.I), _detail(proc)
  assert checkpoint_steps(workdir)[-1:] == [ROWS // BATCH]
  assert os.path.exists(os.path.join(workdir, "params.npz"))


# ----------------------------------------------------------------------- corrupt checkpoint

def _checkpoint_files(step_dir, target: str) -> list[str]:
  """The files of one checkpoint that a restore must read: 'metadata' (the state's tree
  metadata), 'data' (the array bytes: Orbax OCDBT keeps them in folders named 'd'; the largest
  file if a layout has none)."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  if target == "metadata":
    return [os.path.join(step_dir, "state", "_METADATA")]
  data = [p for p in files if os.path.basename(os.path.dirname(p)) == "d"]
  return data or [max(files, key=lambda p: (os.path.getsize(p), p))]


@pytest.mark.parametrize("target, damage", [
    ("metadata", "truncate"), ("data", "truncate"), ("data", "overwrite")],
    ids=["metadata_truncated", "data_truncated", "data_overwritten"])
def test_corrupt_latest_checkpoint_names_step_and_restore_step(shard_sets, workdir_copy, target,
                                                               damage):
  for victim in _checkpoint_files(os.path.join(workdir_copy, "checkpoints", "4"), target):
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
      if damage == "truncate":
        f.truncate(size // 2)
      else:
        f.write(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
  before = snapshot(workdir_copy)
  proc = run_cli("train", *train_args(workdir_copy, shard_sets["A"]))
  message = assert_one_line_error(proc, "--restore_step")
  assert re.search(r"\b4\b", message), message
  assert_unchanged(before, workdir_copy, "workdir")


# ----------------------------------------------------------------------- shard folders

def _outside_copy(folder, entry_key, dest) -> str:
  """Copies the file of shards[0][entry_key] to `dest` (same bytes: size and sha256 match)."""
  m = json.load(open(os.path.join(folder, "manifest.json")))
  shutil.copyfile(os.path.join(folder, m["shards"][0][entry_key]), dest)
  return str(dest)


@pytest.mark.parametrize("case", ["absolute", "dotdot", "slash", "duplicate", "ctx_absolute"])
def test_manifest_file_names_must_stay_inside_the_folder(shards_copy, tmp_path, case):
  field = "shards[0].file"
  if case == "absolute":
    target = _outside_copy(shards_copy, "file", tmp_path / "outside.bin")
    _edit_manifest(shards_copy, lambda m: m["shards"][0].update(file=target))
  elif case == "dotdot":
    _outside_copy(shards_copy, "file", tmp_path / "outside.bin")
    _edit_manifest(shards_copy, lambda m: m["shards"][0].update(file="../outside.bin"))
  elif case == "slash":
    os.makedirs(os.path.join(shards_copy, "sub"))
    _outside_copy(shards_copy, "file", os.path.join(shards_copy, "sub", "acts.bin"))
    _edit_manifest(shards_copy, lambda m: m["shards"][0].update(file="sub/acts.bin"))
  elif case == "duplicate":
    field = "shards[1].file"
    def dup(m):  # every shard has 128 rows: shard 1 pointing at shard 0's file matches in size
      m["shards"][1].update(file=m["shards"][0]["file"], sha256=m["shards"][0]["sha256"])
    _edit_manifest(shards_copy, dup)
  else:
    field = "shards[0].ctx_file"
    target = _outside_copy(shards_copy, "ctx_file", tmp_path / "outside_ctx.bin")
    _edit_manifest(shards_copy, lambda m: m["shards"][0].update(ctx_file=target))
  data_before = snapshot(shards_copy)
  outside = [p for p in (tmp_path / "outside.bin", tmp_path / "outside_ctx.bin") if p.exists()]
  outside_before = [snapshot(p) for p in outside]
  workdir = tmp_path / "W"
  proc = run_cli("train", *train_args(workdir, shards_copy))
  assert_one_line_error(proc, "manifest.json", field)
  assert_unchanged({}, workdir, "workdir")
  assert_unchanged(data_before, shards_copy, "shard folder")
  for p, b in zip(outside, outside_before):
    assert_unchanged(b, p, "file outside the shard folder")


def _set(path, value):
  def edit(m):
    node = m
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
  return edit


@pytest.mark.parametrize("edit, field", [
    (_set(["d_model"], "8"), "d_model"),
    (_set(["token_count"], "512"), "token_count"),
    (_set(["shards"], {"file": "acts_00000.bin"}), "shards"),
    (_set(["shards", 0, "tokens"], 127.5), "shards[0].tokens"),
    (_set(["shards", 0, "sha256"], 12345), "shards[0].sha256"),
    (_set(["normalisation", "mean_sq_norm"], float("inf")), "normalisation"),
    (_set(["normalisation", "scale"], float("nan")), "normalisation"),
    (_set(["normalisation"], None), "normalisation"),
], ids=["d_model_str", "token_count_str", "shards_dict", "tokens_float", "sha256_int",
        "mean_sq_norm_inf", "scale_nan", "normalisation_null"])
def test_manifest_schema_is_checked(shards_copy, tmp_path, edit, field):
  _edit_manifest(shards_copy, edit)
  data_before = snapshot(shards_copy)
  workdir = tmp_path / "W"
  proc = run_cli("train", *train_args(workdir, shards_copy))
  assert_one_line_error(proc, "manifest.json", field)
  assert_unchanged({}, workdir, "workdir")
  assert_unchanged(data_before, shards_copy, "shard folder")


def _damage_not_json(folder):
  with open(os.path.join(folder, "manifest.json"), "w") as f:
    f.write('{"d_model": 8, "shards": [')


def _damage_missing_field(folder):
  _edit_manifest(folder, lambda m: m.pop("d_model"))


def _damage_truncated_shard(folder):
  with open(os.path.join(folder, "acts_00001.bin"), "r+b") as f:
    f.truncate(os.path.getsize(os.path.join(folder, "acts_00001.bin")) - 4 * D)


def _write_nan(folder, row=3):
  x = np.fromfile(os.path.join(folder, "acts_00000.bin"), np.float32).reshape(-1, D)
  x[row, 2] = np.nan
  x.tofile(os.path.join(folder, "acts_00000.bin"))


def _damage_nan_stale_checksum(folder):
  _write_nan(folder)


def _damage_nan_with_checksum(folder):
  _write_nan(folder)
  digest = sha256(os.path.join(folder, "acts_00000.bin"))
  _edit_manifest(folder, lambda m: m["shards"][0].update(sha256=digest))


@pytest.mark.parametrize("damage, culprits", [
    (_damage_not_json, ("manifest.json",)),
    (_damage_missing_field, ("manifest.json", "d_model")),
    (_damage_truncated_shard, ("acts_00001.bin",)),
    (_damage_nan_stale_checksum, ("acts_00000.bin",)),
    (_damage_nan_with_checksum, ("acts_00000.bin", ("NaN", "non-finite"))),
], ids=["manifest_not_json", "manifest_missing_field", "truncated_shard", "nan_checksum_mismatch",
        "nan_checksum_updated"])
def test_damaged_shards_are_refused(shards_copy, tmp_path, damage, culprits):
  damage(shards_copy)
  data_before = snapshot(shards_copy)
  workdir = tmp_path / "W"
  proc = run_cli("train", *train_args(workdir, shards_copy))
  assert_one_line_error(proc, *culprits)
  assert_unchanged({}, workdir, "workdir")
  assert_unchanged(data_before, shards_copy, "shard folder")


def test_nonexistent_data_path_is_refused(tmp_path):
  missing = str(tmp_path / "no_such_shards")
  proc = run_cli("train", *train_args(tmp_path / "W", missing))
  assert_one_line_error(proc, missing)
  assert_unchanged({}, tmp_path / "W", "workdir")
  assert not os.path.exists(missing)


# -------------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("other, culprit", [
    ("C_width", ("d_model", "d_in", "width")),
    ("B_site", "site"),
    ("B_model", "model"),
], ids=["other_width", "other_site", "other_model"])
def test_evaluate_refuses_mismatched_heldout_shards(shard_sets, workdir_copy, other, culprit):
  before = snapshot(workdir_copy)
  proc = run_cli("evaluate", f"--workdir={workdir_copy}", f"--eval_shards={shard_sets[other]}")
  assert_one_line_error(proc, culprit)
  assert_unchanged(before, workdir_copy, "workdir")


def test_evaluate_accepts_matching_heldout_shards(shard_sets, workdir_copy):
  """The control for the refusals above: held-out shards like the training ones are evaluated."""
  proc = run_cli("evaluate", f"--workdir={workdir_copy}", f"--eval_shards={shard_sets['A']}")
  assert proc.returncode == 0, _detail(proc)
  assert "Traceback" not in proc.stderr
  assert os.path.exists(os.path.join(workdir_copy, "eval.json"))


def test_evaluate_refuses_nonexistent_heldout_shards(workdir_copy, tmp_path):
  missing = str(tmp_path / "no_such_heldout")
  before = snapshot(workdir_copy)
  proc = run_cli("evaluate", f"--workdir={workdir_copy}", f"--eval_shards={missing}")
  assert_one_line_error(proc, missing)
  assert_unchanged(before, workdir_copy, "workdir")


# ---------------------------------------------------------------------------------- export

def test_export_refuses_sweep_without_member(trained_untied_sweep, tmp_path):
  workdir = tmp_path / "W"
  shutil.copytree(trained_untied_sweep, workdir)
  before = snapshot(workdir)
  proc = run_cli("export", f"--workdir={workdir}")
  assert_one_line_error(proc, "--member")
  assert_unchanged(before, workdir, "workdir")


def test_export_refuses_untied_gated_for_saelens(trained_untied_sweep, tmp_path):
  workdir = tmp_path / "W"
  shutil.copytree(trained_untied_sweep, workdir)
  before = snapshot(workdir)
  proc = run_cli("export", f"--workdir={workdir}", "--member=0")  # default formats: npz,saelens
  assert_one_line_error(proc, "tie_r_mag")
  assert_unchanged(before, workdir, "workdir (nothing exported on refusal)")


@pytest.mark.parametrize("kind", ["empty", "nonexistent"])
def test_export_refuses_a_workdir_without_a_run(tmp_path, kind):
  workdir = tmp_path / "W"
  if kind == "empty":
    workdir.mkdir()
  proc = run_cli("export", f"--workdir={workdir}")
  assert_one_line_error(proc, str(workdir))
  assert_unchanged({}, workdir, "workdir")
  assert os.path.exists(workdir) == (kind == "empty")


def test_export_refuses_read_only_out(workdir_copy):
  out = "/proc/gsae_adversarial/export"
  before = snapshot(workdir_copy)
  proc = run_cli("export", f"--workdir={workdir_copy}", f"--out={out}")
  assert_one_line_error(proc, "/proc/gsae_adversarial")
  assert_unchanged(before, workdir_copy, "workdir")


# --------------------------------------------------------------------------------- harvest

HARVEST_T = 32


def harvest_args(model, out, *extra) -> list[str]:
  return ["--config=experiments/harvest_gemma3_270m.py", f"--config.model={model}",
          "--config.gguf_file=", f"--config.output_dir={out}", "--config.layer=1",
          "--config.site=resid_post", f"--config.context_length={HARVEST_T}",
          "--config.num_tokens=1500", "--config.windows_per_shard=16", "--config.batch_size=8",
          *extra]


# A model that cannot be loaded: a case refused before the load must not get that far.
NO_MODEL = "/nonexistent/model-never-loaded"


def test_harvest_refuses_output_dir_that_is_a_file(tmp_path):
  out = tmp_path / "out"
  out.write_text("not a folder\n")
  before = snapshot(out)
  proc = run_cli("harvest", *harvest_args(NO_MODEL, out))
  assert_one_line_error(proc, "output_dir")
  assert_unchanged(before, out, "output file")


def test_harvest_refuses_folder_holding_another_harvest(shards_copy):
  before = snapshot(shards_copy)  # a harvest of blocks.1.resid_post; this asks for blocks.0
  proc = run_cli("harvest", *harvest_args(NO_MODEL, shards_copy, "--config.layer=0"))
  assert_one_line_error(proc, "manifest.json", ("site", "layer"))
  assert_unchanged(before, shards_copy, "shard folder")


def test_harvest_refuses_unknown_dtype(tmp_path):
  out = tmp_path / "out"
  proc = run_cli("harvest", *harvest_args(NO_MODEL, out, "--config.dtype=float16"))
  assert_one_line_error(proc, "config.dtype")
  assert not out.exists()


def test_harvest_refuses_layer_past_the_model(tiny_lm, tmp_path):
  out = tmp_path / "out"
  proc = run_cli("harvest", *harvest_args(tiny_lm, out, "--config.layer=5"))
  assert_one_line_error(proc, "config.layer")
  assert_unchanged({}, out, "output folder")


def test_harvest_refuses_read_only_output_dir(tiny_lm):
  out = "/proc/gsae_adversarial/harvest"
  proc = run_cli("harvest", *harvest_args(tiny_lm, out))
  assert_one_line_error(proc, "/proc/gsae_adversarial")
  assert not os.path.exists(out)


def test_harvest_disk_full_then_resume_equals_uninterrupted(tiny_lm, tmp_path):
  # One window per shard (13 shards): acts files are 31 x 32 x 4 = 3968 B and the process's
  # progress file grows by ~0.35 KB a shard, so a 4 KiB file-size limit fails a progress write
  # after several complete shards (the manifest is written whole at the end).
  one = ("--config.windows_per_shard=1", "--config.num_tokens=400")
  reference, out = tmp_path / "reference", tmp_path / "out"
  proc = run_cli("harvest", *harvest_args(tiny_lm, reference, *one))
  assert proc.returncode == 0, _detail(proc)

  full_disk = run_cli("harvest", *harvest_args(tiny_lm, out, *one), max_file_bytes=4 * 1024)
  assert full_disk.returncode != 0, _detail(full_disk)
  partial = json.load(open(out / "manifest.json"))
  listed = json.load(open(out / harvest_lib.PROGRESS_DIR / "process_0.json"))["shards"]
  assert not partial["complete"] and listed and len(listed) < 13, listed

  proc = run_cli("harvest", *harvest_args(tiny_lm, out, *one))
  assert proc.returncode == 0, _detail(proc)
  got, want = json.load(open(out / "manifest.json")), json.load(open(reference / "manifest.json"))
  for key in ("shards", "token_count", "num_windows", "normalisation", "complete", "site"):
    assert got[key] == want[key], key
  assert snapshot(out).keys() == snapshot(reference).keys()  # no *.tmp left behind
  bins = {k: v for k, v in snapshot(out).items() if k.endswith(".bin")}
  assert bins == {k: v for k, v in snapshot(reference).items() if k.endswith(".bin")}
  # Checked last so that the resume is checked even while this fails: one line for a full disk.
  assert_one_line_error(full_disk, str(out))


# ----------------------------------------------------------------------------------- sweep

SWEEP_SMALL = ["--config=experiments/sweep_gemma3_270m.py", "--config.eval.loss_recovered=False",
               "--config.train.data.d_in=8", "--config.train.sae.d_sae=32",
               "--config.train.train.steps=2", "--config.train.train.batch_size=64",
               "--config.train.optim.warmup_steps=1", "--config.grids.topk=(2,4)",
               "--config.grids.baseline=(0.5,)", "--config.grids.jumprelu=(0.3,)"]


def test_sweep_refuses_nonexistent_shards(tmp_path):
  missing = str(tmp_path / "no_such_shards")
  proc = run_cli("sweep", *SWEEP_SMALL, f"--out={tmp_path / 'D'}",
                 f"--config.train.data.path={missing}")
  assert_one_line_error(proc, missing)
  assert_unchanged({}, tmp_path / "D", "sweep folder")


def test_sweep_refuses_infinite_grid_value(shard_sets, tmp_path):
  proc = run_cli("sweep", *SWEEP_SMALL, f"--out={tmp_path / 'D'}",
                 f"--config.train.data.path={shard_sets['A']}", "--config.grids.gated=(0.5,1e999)")
  assert_one_line_error(proc, ("grids.gated", "sweep.grid"))
  assert_unchanged({}, tmp_path / "D", "sweep folder")
