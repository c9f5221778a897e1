"""The Optimize phase, above the techniques it combines: per-layer sensitivity, mixed precision,
progressive compression (one technique's strength stepped up until a quality floor), and the constrained
multi-objective search across techniques (`search`)."""
