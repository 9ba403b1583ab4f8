"""Private kernels (Triton in ``triton/``, int8 GEMM compositions in ``intmm/``); launched only from ``memcore/ops``."""
