"""Triton kernels, one file per op family; each exposes a launcher used by ``memcore/ops``."""
