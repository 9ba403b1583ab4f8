"""Attacks (orchestration only): Carlini et al. 2023 generate-and-filter and nearest-neighbour extraction."""
