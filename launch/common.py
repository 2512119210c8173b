"""Shared bits of the absl entry points."""

from absl import flags, logging


def quiet_library_logs() -> None:
  """Library INFO logs (Orbax, JAX) drown the progress lines; keep WARNING and above unless
  the user asked for a --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
