"""Small shared utilities (profiling ranges, timing)."""
