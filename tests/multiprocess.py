"""Starting several JAX processes on this machine (CPU, gloo collectives) for multi-host tests:
each process is a launcher subprocess with its own fake CPU devices."""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Sequence

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def cpu_env(devices: int, base: dict | None = None) -> dict:
  """The environment of a process with `devices` fake CPU devices."""
  return dict(os.environ if base is None else base, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def start(cmd: Sequence[str], processes: int, devices: int,
          base_env: dict | None = None) -> list[subprocess.Popen]:
  """`processes` copies of `cmd` (one: `--distributed=off`; more: a fresh coordinator port and
  each its `--process_id`), each with `devices` fake CPU devices, run from the repository."""
  if processes == 1:
    flags = [["--distributed=off"]]
  else:
    port = free_port()
    flags = [[f"--coordinator_address=localhost:{port}", f"--num_processes={processes}",
              f"--process_id={i}"] for i in range(processes)]
  return [subprocess.Popen([*cmd, *f], cwd=ROOT, env=cpu_env(devices, base_env),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for f in flags]


def finish(procs: Sequence[subprocess.Popen], timeout: float,
           check: bool = True) -> list[tuple[str, str]]:
  """(stdout, stderr) of every process; with `check`, each must exit 0. On a timeout all are
  killed and the test fails (a process waiting in a collective for a dead peer would hang)."""
  outs = []
  try:
    for i, p in enumerate(procs):
      try:
        outs.append(p.communicate(timeout=timeout))
      except subprocess.TimeoutExpired:
        pytest.fail(f"process {i} of {len(procs)} did not finish in {timeout} s")
      if check:
        assert p.returncode == 0, f"process {i}:\n{outs[-1][1][-3000:]}"
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return outs
