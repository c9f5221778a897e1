"""Graph-level rewrites found by tracing the model: BatchNorm folding and cross-layer equalization."""

from modelpress.graph.equalize import LayerPair, equalize_pairs, find_pairs, fold_batchnorm

__all__ = ["LayerPair", "equalize_pairs", "find_pairs", "fold_batchnorm"]
