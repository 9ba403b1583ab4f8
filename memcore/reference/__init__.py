"""Pure-PyTorch reference implementations of every op: the oracle for tests and the benchmark baseline."""
