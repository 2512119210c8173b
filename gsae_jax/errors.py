"""The failures a user's input can cause. Launchers print these as one line and exit 1; any other
exception is a bug and keeps its traceback.

Messages are one line that names the culprit (a file, a config field, a workdir) and, where
there is one, the way out: `config.optim.lr: expected a finite number > 0, found inf`.
"""

from __future__ import annotations


def one_line(e: BaseException) -> str:
  """An exception's message on one line (some library messages span several)."""
  return " ".join(str(e).split()) or type(e).__name__


class GsaeError(Exception):
  """An expected failure caused by input: a config, data, a checkpoint, a workdir."""


class ConfigError(GsaeError, ValueError):
  """A config field is invalid, or changed on resume."""


class DataError(GsaeError, ValueError):
  """Activation shards, manifests or exported SAE files are unusable."""


class CheckpointError(GsaeError, RuntimeError):
  """A checkpoint exists but cannot be used; the message names the step and the way out."""


class RunMismatch(ConfigError):
  """A workdir holds another run than the one asked for (a changed field, other data)."""


class Locked(GsaeError):
  """Another live process holds the workdir or output folder."""


class Diverged(GsaeError):
  """Training produced a non-finite loss or parameters; the last good checkpoint is kept."""

