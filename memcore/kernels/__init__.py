"""Private kernels (Triton); launched only from ``memcore/ops``."""
