"""Hand-written GPU kernels. Each module imports Triton itself, so importing `cepe` never needs it;
callers reach a kernel only when it can run (CUDA, or the CPU under TRITON_INTERPRET=1)."""
