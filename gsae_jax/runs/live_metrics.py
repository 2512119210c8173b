"""Live metrics: TensorBoard event files in `<workdir>/tensorboard`, beside metrics.jsonl.

Training writes every logged step's metrics as scalars; evaluation writes its results at the
checkpoint's step and the log10 feature density as a histogram. Written with tensorboardX: a
small pure-Python writer (numpy + protobuf), no TensorFlow or torch needed.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

import numpy as np
from tensorboardX import SummaryWriter

from gsae_jax.data import storage

TENSORBOARD_DIR = "tensorboard"


class LiveMetrics:
  """A TensorBoard writer for one workdir; disabled (every call a no-op) off the primary process,
  so that one process of a multi-host run writes the files."""

  def __init__(self, workdir: str, enabled: bool = True):
    # tensorboardX writes local folders, gs:// (google-cloud-storage) and s3:// (boto3) itself
    self._folder, self._enabled = storage.join(workdir, TENSORBOARD_DIR), enabled
    self._created: SummaryWriter | None = None

  @property
  def _writer(self) -> SummaryWriter | None:
    """Created at the first write: a run refused before its first metrics (a damaged checkpoint)
    leaves no event file in the workdir."""
    if self._enabled and self._created is None:
      self._created = SummaryWriter(self._folder, flush_secs=30)
    return self._created

  def scalars(self, step: int, metrics: Mapping[str, Any], prefix: str) -> None:
    """Each number as `<prefix>/<name>`; a list (one value per sweep member) as
    `<prefix>/<name>/<member>`. Anything else (text, None) is skipped."""
    if self._writer is None:
      return
    for name, value in metrics.items():
      values = value if isinstance(value, list) else [value]
      for i, v in enumerate(values):
        if isinstance(v, numbers.Real):
          tag = f"{prefix}/{name}/{i}" if isinstance(value, list) else f"{prefix}/{name}"
          self._writer.add_scalar(tag, float(v), step)

  def train_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
    """One logged training step (the dict metrics.jsonl holds), flushed at once so a board
    watching the run sees it."""
    self.scalars(step, metrics, "train")
    if self._writer is not None:
      self._writer.flush()

  def eval_results(self, step: int, metrics: Mapping[str, Any], log10_density: Any = None,
                   prefix: str = "eval") -> None:
    """An evaluation's scalars, and the log10 feature density as the histogram
    `<prefix>/log10_feature_density` (features that never fired are -inf, which a histogram
    cannot hold: they are the `dead_fraction` scalar)."""
    self.scalars(step, metrics, prefix)
    if self._writer is None:
      return
    if log10_density is not None:
      density = np.asarray(log10_density, np.float64)
      fired = density[np.isfinite(density)]
      if fired.size:
        self._writer.add_histogram(f"{prefix}/log10_feature_density", fired, step)
    self._writer.flush()

  def close(self) -> None:
    if self._created is not None:
      self._created.close()

  def __enter__(self) -> "LiveMetrics":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

