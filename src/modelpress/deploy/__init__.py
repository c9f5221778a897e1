"""Export, runtime sessions, parity checks and benchmarking."""
