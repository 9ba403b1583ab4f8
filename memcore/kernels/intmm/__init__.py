"""GEMM-library kernels: exact int8 GEMMs through ``torch._int_mm`` (cuBLAS(Lt) on CUDA), one file per family."""
