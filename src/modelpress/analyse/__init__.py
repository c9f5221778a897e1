"""The baseline: parameters, bytes, MACs, per-layer latency and memory."""
