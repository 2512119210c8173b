"""TensorBoard event files hold what was logged: train scalars at every logged step (also from a
real training run, equal to metrics.jsonl), eval scalars and the log10 density histogram.

tensorboardX has no reader and TensorBoard is not a dependency, so the files are read back as
TFRecords (u64 length, u32 crc, payload, u32 crc) parsed with tensorboardX's own Event proto."""

import glob
import json
import os
import struct

import numpy as np
from tensorboardX.proto import event_pb2

from gsae_jax.runs import live_metrics, training


def _events(workdir) -> list:
  """Every Event in `<workdir>/tensorboard`, in file order."""
  events = []
  for path in sorted(glob.glob(os.path.join(workdir, live_metrics.TENSORBOARD_DIR, "events.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      pos += 12  # length and its crc
      events.append(event_pb2.Event.FromString(data[pos:pos + length]))
      pos += length + 4  # payload and its crc
  return events


def _scalars(workdir) -> dict[str, dict[int, float]]:
  out: dict[str, dict[int, float]] = {}
  for e in _events(workdir):
    for v in e.summary.value:
      if v.HasField("simple_value"):
        out.setdefault(v.tag, {})[e.step] = v.simple_value
  return out


def _histograms(workdir) -> dict[str, dict]:
  out: dict[str, dict] = {}
  for e in _events(workdir):
    for v in e.summary.value:
      if v.HasField("histo"):
        out.setdefault(v.tag, {})[e.step] = v.histo
  return out


def test_train_and_eval_metrics_are_read_back(tmp_path):
  with live_metrics.LiveMetrics(str(tmp_path)) as board:
    board.train_metrics(1, {"loss": 2.5, "l0": [3.0, 7.0], "sparse_step": True})
    board.train_metrics(2, {"loss": 1.5, "l0": [2.0, 5.0], "sparse_step": False})
    density = np.array([-1.0, -2.0, -np.inf, -0.5, -3.0])
    board.eval_results(2, {"fvu": 0.25, "name": "gated_0", "kl_div_score": 0.9}, density,
                       prefix="eval_1")
  s = _scalars(tmp_path)
  assert s["train/loss"] == {1: 2.5, 2: 1.5}
  assert s["train/l0/0"] == {1: 3.0, 2: 2.0} and s["train/l0/1"] == {1: 7.0, 2: 5.0}
  assert s["train/sparse_step"] == {1: 1.0, 2: 0.0}
  assert s["eval_1/fvu"] == {2: 0.25} and abs(s["eval_1/kl_div_score"][2] - 0.9) < 1e-6
  assert not any("name" in tag for tag in s)
  histo = _histograms(tmp_path)["eval_1/log10_feature_density"][2]
  assert histo.num == 4 and histo.min == -3.0 and histo.max == -0.5  # -inf (dead) left out


def test_disabled_writer_writes_nothing(tmp_path):
  with live_metrics.LiveMetrics(str(tmp_path), enabled=False) as board:
    board.train_metrics(1, {"loss": 1.0})
    board.eval_results(1, {"fvu": 0.5}, np.zeros(4))
  assert not os.path.exists(tmp_path / live_metrics.TENSORBOARD_DIR)


def test_training_writes_every_logged_step(tmp_path, tiny_config):
  tiny_config.train.log_every = 2  # steps 2, 4 and the last, 5
  training.run(tiny_config, str(tmp_path))
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  s = _scalars(tmp_path)
  assert [l["step"] for l in logged] == [2, 4, 5] == sorted(s["train/loss"])
  for key in ("loss", "l0", "fvu", "tokens_per_s"):
    for line in logged:
      np.testing.assert_allclose(s[f"train/{key}"][line["step"]], line[key], rtol=1e-6)
