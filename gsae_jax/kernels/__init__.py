"""C++ kernels called through the XLA FFI (CPU)."""
