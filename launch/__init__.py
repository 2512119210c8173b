"""absl entry points (`python -m launch.<name>`) and cluster scripts.

Importing the package sets glibc's malloc to reuse the memory XLA frees
(`gsae_jax.host_memory`), before NumPy or JAX start threads, so every entry point runs with it.
"""

from gsae_jax import host_memory

host_memory.keep_freed_memory()
