"""Weight sharing maths: 1-D k-means over groups of weights, int8 codebooks, index packing.

Each group (a whole layer, or a block of output rows) gets its own codebook of `k` shared values; every
weight is replaced by the index of its nearest value. k-means++ seeding (D^2 sampling, seeded generator)
then Lloyd iterations, all groups at once: in 1-D the nearest centroid is a `searchsorted` against the
midpoints of the sorted centroids, so memory stays O(weights), not O(weights * k).

Indices are packed into uint8: 2 bits each for up to 4 values, 4 bits for up to 16, 8 bits up to 256,
little-endian within each byte (index j of a byte sits at bits [j * b, (j + 1) * b)).

>>> x = torch.tensor([[0.0, 0.1, 1.0, 1.1]])
>>> centroids, idx = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
>>> centroids.sort().values
tensor([[0.0500, 1.0500]])
>>> unpack_indices(pack_indices(idx.reshape(-1), bits=4), 4, bits=4).tolist() == idx.reshape(-1).tolist()
True
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 22  # group elements processed at once in `kmeans` (memory: a few float tensors of this size)


def index_bits(values: int) -> int:
    """Bits per packed index for a codebook of `values` entries: 2 (<= 4), 4 (<= 16) or 8 (<= 256)."""
    if not 2 <= values <= 256:
        raise ValueError(f"a codebook holds 2 to 256 values, not {values}.")
    return 2 if values <= 4 else 4 if values <= 16 else 8


def _draw(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `p` (G, n), drawn in proportion to it (inverse CDF: much faster than
    torch.multinomial on wide rows)."""
    cdf = p.double().cumsum(dim=1)
    u = torch.rand(p.shape[0], 1, generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_max(p.shape[1] - 1)


def _plus_plus(
    x: torch.Tensor, w: torch.Tensor, k: int, generator: torch.Generator | None, zero: torch.Tensor
) -> torch.Tensor:
    """k-means++ seeds (G, k): the first drawn in proportion to `w` (exactly 0 for the groups in `zero`),
    each next in proportion to `w` times the squared distance to the nearest seed so far."""
    g = x.shape[0]
    rows = torch.arange(g)
    first = _draw(w, generator)
    centroids = x.new_empty(g, k)
    centroids[:, 0] = torch.where(zero, 0.0, x[rows, first])
    nearest = (x - centroids[:, :1]).pow(2)
    for j in range(1, k):
        p = w * nearest
        # a group with every weight on a seed already (fewer distinct values than k): any point will do
        p = torch.where(p.sum(1, keepdim=True) > 0, p, w)
        pick = _draw(p, generator)
        centroids[:, j] = x[rows, pick]
        nearest = torch.minimum(nearest, (x - centroids[:, j : j + 1]).pow(2))
    return centroids


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (G, n) of the nearest of each group's `centroids` (G, k) for each value of `x` (G, n)."""
    order = centroids.argsort(dim=1)
    ordered = centroids.gather(1, order)
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) / 2  # (G, k - 1), sorted
    slot = torch.searchsorted(midpoints.contiguous(), x.contiguous())  # (G, n) in [0, k)
    return order.gather(1, slot)


def _lloyd(
    x: torch.Tensor, w: torch.Tensor, centroids: torch.Tensor, iterations: int, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    g, k = centroids.shape
    wx = w * x
    idx = assign(x, centroids)
    for _ in range(iterations):
        mass = x.new_zeros(g, k).scatter_add_(1, idx, w)
        total = x.new_zeros(g, k).scatter_add_(1, idx, wx)
        # an empty cluster keeps its centroid
        centroids = torch.where(mass > 0, total / mass.clamp_min(1e-30), centroids)
        centroids[:, 0] = torch.where(zero, 0.0, centroids[:, 0])  # the pinned 0 stays exactly 0
        new = assign(x, centroids)
        if torch.equal(new, idx):
            break
        idx = new
    return centroids, idx


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    iterations: int = 30,
    generator: torch.Generator | None = None,
    keep_zero: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of each row of `x` (G, n): centroids (G, k) fp32 and indices (G, n) int64.

    `weights` (G, n), >= 0: each value's importance (a zero weight leaves the centroids alone, as a pruned
    position); a group whose weights are all zero is clustered unweighted. Deterministic for a seeded
    `generator`. Stops early when no assignment changes. `keep_zero`: in every group holding an exact 0
    (weights pruned in place), centroid 0 is pinned at exactly 0, so those weights stay 0.

    >>> c, i = kmeans(torch.tensor([[1.0, 1.0, 5.0, 5.0, 9.0]]), 3)
    >>> sorted(c[0].tolist())
    [1.0, 5.0, 9.0]
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans: x must be (groups, values), got shape {tuple(x.shape)}.")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"kmeans: {k} clusters for groups of {x.shape[1]} values; k must be in [1, n].")
    x = x.detach().float()
    w = torch.ones_like(x) if weights is None else weights.detach().float().clamp_min(0)
    if w.shape != x.shape:
        raise ValueError(f"kmeans: weights {tuple(w.shape)} do not match x {tuple(x.shape)}.")
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    per_chunk = max(1, _CHUNK // x.shape[1])
    centroids, indices = [], []
    for start in range(0, x.shape[0], per_chunk):
        xs, ws = x[start : start + per_chunk], w[start : start + per_chunk]
        zero = (xs == 0).any(dim=1) if keep_zero else torch.zeros(xs.shape[0], dtype=torch.bool)
        c, i = _lloyd(xs, ws, _plus_plus(xs, ws, k, generator, zero), iterations, zero)
        centroids.append(c)
        indices.append(i)
    return torch.cat(centroids), torch.cat(indices)


def quantize_codebook(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes (G, k) and one fp32 scale per group (G,) with codes * scale ~ centroids (symmetric)."""
    scale = (centroids.abs().amax(dim=1) / 127).clamp_min(1e-12)
    codes = torch.round(centroids / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale.float()


def pack_indices(indices: torch.Tensor, *, bits: int) -> torch.Tensor:
    """Flat indices in [0, 2^bits) as uint8 bytes, 8 / bits to a byte, padded with 0 to whole bytes."""
    if bits not in (2, 4, 8):
        raise ValueError(f"pack_indices: bits={bits}; use 2, 4 or 8.")
    flat = indices.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"pack_indices: indices outside [0, {1 << bits}) do not fit in {bits} bits.")
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat.reshape(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, numel: int, *, bits: int) -> torch.Tensor:
    """The `numel` int64 indices packed by `pack_indices`, with ONNX-exportable ops (Cast, Div, Mod): in
    an export the Cast of the uint8 bytes keeps the exporter from folding them into a dense tensor, and
    the runtimes fold the whole chain once at load."""
    if bits == 8:
        return packed.to(torch.int64)[:numel]
    per = 8 // bits
    divisors = torch.tensor([1 << (bits * j) for j in range(per)], dtype=torch.int64, device=packed.device)
    codes = torch.remainder(
        torch.div(packed.to(torch.int64)[:, None], divisors, rounding_mode="floor"), 1 << bits
    )
    return codes.reshape(-1)[:numel]


def unpack_bits(bitmask: torch.Tensor, numel: int) -> torch.Tensor:
    """The boolean mask of `ops.sparse.pack_mask`, through int64 maths (as `unpack_indices`, so an export
    keeps the packed bits rather than a folded boolean tensor for small layers)."""
    powers = torch.tensor([1 << j for j in range(8)], dtype=torch.int64, device=bitmask.device)
    as_int = torch.div(bitmask.to(torch.int64)[:, None], powers, rounding_mode="floor")
    return (torch.remainder(as_int, 2) != 0).reshape(-1)[:numel]


def packed_bytes(numel: int, *, bits: int) -> int:
    """Bytes `pack_indices` uses for `numel` indices."""
    per = 8 // bits
    return -(-numel // per)


__all__ = [
    "assign",
    "index_bits",
    "kmeans",
    "pack_indices",
    "packed_bytes",
    "quantize_codebook",
    "unpack_bits",
    "unpack_indices",
]
