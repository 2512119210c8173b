"""Host memory allocation: glibc malloc settings under which freed memory is reused.

XLA:CPU allocates every step's outputs and temporaries afresh ([batch, d_sae] products of tens
to hundreds of MB). glibc serves blocks that large with `mmap` and returns them to the kernel
on `free`, so each step touches brand-new pages: the main job took 262 million minor page faults
and spent 23% of its CPU time in the kernel (BUILD_NOTES "Host memory"). `keep_freed_memory`
makes malloc keep what is freed and hand it out again.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD -1: never trim (mallopt(3))
OPT_OUT = "GSAE_JAX_KEEP_FREED_MEMORY"  # "0": leave malloc as it is


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to serve large blocks from its heap instead of fresh `mmap`s
  (M_MMAP_MAX 0), never to give freed heap memory back to the kernel (M_TRIM_THRESHOLD), and
  to use one arena for all threads (M_ARENA_MAX 1: XLA's worker threads free into the heap that
  the next step allocates from). Call it before JAX starts its threads. The process keeps its
  peak resident size instead of shrinking after it. Returns whether it applied: not outside
  Linux glibc, nor with the environment variable GSAE_JAX_KEEP_FREED_MEMORY=0."""
  if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
  if mallopt is None:
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER))
  return all(mallopt(param, value) == 1 for param, value in settings)
