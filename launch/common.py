"""Shared bits of the absl entry points: quiet library logs, signals, and one-line errors."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from absl import flags, logging

from gsae_jax.errors import one_line


def quiet_library_logs() -> None:
  """Library INFO logs (Orbax, JAX) drown the progress lines; keep WARNING and above unless
  the user asked for a --verbosity."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with a config file that
  cannot be loaded (config_flags loads it while parsing `--config.x=` overrides) and bad flag
  values reported as one line, exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {one_line(e)}; --helpshort lists the flags")
  except (OSError, SyntaxError, AttributeError, ImportError) as e:
    sys.exit(f"error: --config: cannot load the config file ({_last_line(e)})")


def _last_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def load_config(config_flag) -> Any:
  """The value of a `config_flags.DEFINE_config_file` flag; a missing or broken file becomes a
  ConfigError naming it (config_flags raises a multi-line OSError on first access)."""
  from gsae_jax.errors import ConfigError
  try:
    return config_flag.value
  except (OSError, SyntaxError, AttributeError, ImportError) as e:
    raise ConfigError(f"--{config_flag.name}: cannot load the config file ({_last_line(e)})"
                      ) from None


def run_guarded(fn: Callable[..., Any], *args: Any) -> Any:
  """Runs a launcher's work: quiet library logs; SIGTERM/SIGINT end the process at once (training
  inside switches to save-and-stop); a preemption is reported (re-run to resume); an expected
  failure (bad config, data, checkpoint, workdir, file system) ends the process with one line
  `error: ...` on stderr and exit status 1. Anything else is a bug and keeps its traceback."""
  from gsae_jax.errors import GsaeError
  from gsae_jax.runs.stopping import watch_signals
  from gsae_jax.runs.sweep import Preempted

  quiet_library_logs()
  with watch_signals(graceful=False):
    try:
      return fn(*args)
    except Preempted as e:
      print(f"{e}; re-run the same command to resume", flush=True)
    except (GsaeError, ValueError, OSError) as e:
      # ValueError: how validators written before gsae_jax.errors say "bad input".
      _exit_with_error(f"error: {one_line(e)}")


def _exit_with_error(line: str) -> None:
  """Writes `line` as the last line on stderr and exits with status 1. Library threads may still
  report the same failure while the interpreter shuts down (Orbax's unretrieved asyncio task
  errors after a damaged checkpoint, printed at garbage collection): stderr is closed to them."""
  sys.stderr.write(line + "\n")
  sys.stderr.flush()
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  sys.stderr = open(os.devnull, "w")
  sys.exit(1)
