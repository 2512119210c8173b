"""Orbax checkpoints of a training run: train state, data-iterator state and config.

Layout: `<workdir>/checkpoints/<step>/{state,data,config}`. Saves are asynchronous (the train
loop goes on while files are written) and atomic (Orbax writes a temporary directory and renames
it), so a run killed at any moment leaves only complete checkpoints behind. Restores place every
array directly in the shardings of the current mesh, whatever device count saved it. The folder
may be local or any `etils.epath` path (gs://, ...): Orbax writes both.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from gsae_jax.data import storage
from gsae_jax.errors import CheckpointError

__all__ = ["CheckpointError", "Checkpointer"]


@contextlib.contextmanager
def _stderr_held_back() -> Iterator[None]:
  """Holds back what is written to fd 2 during the block: passed on if the block succeeds,
  dropped (once the writers fall quiet) if it raises. A damaged checkpoint makes TensorStore's
  in-flight reads call back into Orbax's closed event loop, and each prints a traceback that
  would bury the one-line error."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    ok = False
    try:
      yield
      ok = True
    finally:
      if not ok:  # wait (at most ~3 s) for the failing reads to finish printing
        size, deadline = -1, time.time() + 3
        while size != os.fstat(held.fileno()).st_size and time.time() < deadline:
          size = os.fstat(held.fileno()).st_size
          time.sleep(0.3)
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if ok:
        held.seek(0)
        sys.stderr.buffer.write(held.read())
        sys.stderr.flush()


class Checkpointer:
  """Saves every `save_every` steps (and on demand), keeps the last `keep`."""

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory) if storage.is_local(directory) else directory
    self.save_every = save_every
    # The interval is decided here (Orbax alone would also save the first step of every run).
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(epath.Path(self.directory), options=options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, ..., force=force)` would write a checkpoint."""
    return (force or step % self.save_every == 0) and step not in self._manager.all_steps()

  def save(self, step: int, state: Any, data_state: dict, config: dict, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether a save started."""
    if not self.due(step, force):
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_state),
                              config=ocp.args.JsonSave(config))
    return self._manager.save(step, args=args, force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of `step` (default: the latest), or None when there is none.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with the target shardings. Reads only.
    """
    steps = self.steps()
    if not steps:
      if step is not None:
        raise CheckpointError(f"{self.directory}: no checkpoints, cannot restore step {step}")
      return None
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"{self.directory}: no checkpoint at step {step}; available: {steps}")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      with _stderr_held_back():
        restored = self._manager.restore(step, args=args)
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
      earlier = [s for s in steps if s < step]
      hint = (f"restore step {earlier[-1]} instead with --restore_step={earlier[-1]}" if earlier
              else "no earlier checkpoint exists; move the directory away to start afresh")
      raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                            f"({type(e).__name__}: {str(e)[:300]}); {hint}") from e
    return step, restored["state"], dict(restored["data"])

  def restore_config(self, step: int) -> dict:
    """The config (as a dict) saved with `step`."""
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"])

  def set_aside_after(self, step: int) -> None:
    """Moves checkpoints later than `step` to `<directory>_superseded/<time>/` (kept, never
    overwritten), so that a run resumed from `step` can save those step numbers again.

    Every process calls it; process 0 alone moves the (shared) folders, between two barriers so
    that no process lists, restores or saves while the folders are being renamed."""
    multi_process = jax.process_count() > 1
    if multi_process:
      multihost_utils.sync_global_devices("gsae_jax set_aside_after: before")
    if jax.process_index() == 0:
      later_steps = [s for s in self.steps() if s > step]
      if later_steps:
        aside = epath.Path(f"{self.directory}_superseded") / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True, exist_ok=True)
        for s in later_steps:
          (epath.Path(self.directory) / str(s)).rename(aside / str(s))
    if multi_process:
      multihost_utils.sync_global_devices("gsae_jax set_aside_after: after")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

