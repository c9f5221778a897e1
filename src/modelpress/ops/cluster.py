"""Weight sharing maths: 1-D k-means over groups of weights, int8 codebooks, index packing.

Each group (a whole layer, or a block of output rows) gets its own codebook of `k` shared values; every
weight is replaced by the index of its nearest value. Lloyd's k-means on each group's sorted values, many
groups at once, seeded at quantiles (`_seeds`): in 1-D each cluster is a contiguous run of the sorted values, so an
iteration costs O(k log n) per group (see `_sorted_lloyd`) and memory stays O(weights), not O(weights * k).

Indices are packed into uint8: 2 bits each for up to 4 values, 4 bits for up to 16, 8 bits up to 256,
little-endian within each byte (index j of a byte sits at bits [j * b, (j + 1) * b)).

>>> x = torch.tensor([[0.0, 0.1, 1.0, 1.1]])
>>> centroids, idx = kmeans(x, 2)
>>> centroids
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


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index (G, n) of the nearest of each group's `centroids` (G, k) for each value of `x` (G, n)."""
    order = centroids.argsort(dim=1)
    ordered = centroids.gather(1, order)
    midpoints = (ordered[:, 1:] + ordered[:, :-1]) / 2  # (G, k - 1), sorted
    slot = torch.searchsorted(midpoints.contiguous(), x.contiguous())  # (G, n) in [0, k)
    return order.gather(1, slot)


def _segment_means(
    cw: torch.Tensor, cwx: torch.Tensor, rows: torch.Tensor, ends: torch.Tensor, previous: torch.Tensor
) -> torch.Tensor:
    """The weighted mean of each run [ends[j - 1], ends[j]) of the sorted values of `rows`, from their
    prefix sums `cw` / `cwx` (G, n + 1) (weights, weights x values); a run of no weight keeps its
    `previous` value."""
    at = ends + rows[:, None] * cw.shape[1]  # flat positions: no copy of the rows
    starts = torch.cat([rows[:, None] * cw.shape[1], at[:, :-1]], dim=1)
    flat_w, flat_wx = cw.view(-1), cwx.view(-1)
    mass = flat_w[at] - flat_w[starts]
    total = flat_wx[at] - flat_wx[starts]
    return torch.where(mass > 0, total / mass.clamp_min(1e-300), previous.double()).float()


def _pin_and_sort(centroids: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Centroids sorted per row; in the rows of `zero`, the one nearest 0 first set to exactly 0."""
    nearest = centroids.abs().argmin(dim=1, keepdim=True)
    pinned = zero[:, None] & (torch.arange(centroids.shape[1]) == nearest)
    return torch.where(pinned, 0.0, centroids).sort(dim=1).values


def _seeds(xs: torch.Tensor, ws: torch.Tensor, k: int) -> torch.Tensor:
    """k seeds per row of the sorted values `xs` (G, n), weights `ws`: quantiles of a companded mass.

    The squared error of a fine quantizer is least when its points have density ~ (w p)^(1/3), p the
    values' density (Panter-Dite): each value gets mass w^(1/3) s^(2/3), s the local spacing of the sorted
    values (over 2 neighbours each side, as 1 / p), and the seeds sit at the mass's k mid-quantiles. Unlike
    plain quantiles this gives a few far outliers their own cluster, which Lloyd's iterations alone barely
    reach (SmolLM2's rows: 0.0087 relative squared error against 0.0149 from plain quantiles and 0.0096
    from k-means++ seeding), and it is deterministic and one pass."""
    g, n = xs.shape
    h = min(2, n - 1)
    lo = torch.cat([xs[:, :1].expand(g, h), xs[:, : n - h]], dim=1)
    hi = torch.cat([xs[:, h:], xs[:, -1:].expand(g, h)], dim=1)
    mass = (hi - lo).clamp_min(0).pow(2 / 3) * ws.pow(1 / 3)
    # rows of identical values have no spacing: their plain weights then
    mass = torch.where(mass.sum(dim=1, keepdim=True) > 0, mass, ws)
    cumulative = mass.double().cumsum(dim=1)
    levels = cumulative[:, -1:] * ((torch.arange(k, dtype=torch.float64) + 0.5) / k)
    return xs.gather(1, torch.searchsorted(cumulative, levels).clamp_max(n - 1))


class _RowSearch:
    """For rows of sorted values `xs` (G, n), how many values of a row are below each of its queries: a
    batched `searchsorted`, done as one search in one flat sorted array of keys (row + scaled value,
    float64), faster than torch's batched form for many short rows."""

    def __init__(self, xs: torch.Tensor) -> None:
        g, n = xs.shape
        self.n = n
        self.low = xs[:, :1].double()
        self.span = (xs[:, -1:].double() - self.low).clamp_min(1e-30) * 2  # scaled values in [0, 0.5]
        row = torch.arange(g, dtype=torch.float64)[:, None]
        self.keys = (row + (xs.double() - self.low) / self.span).reshape(-1)

    def __call__(self, rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """Counts (A, q) for `queries` (A, q) of the rows numbered `rows` (A,)."""
        # a query below the row's values searches at row - 0.25, above them at row + 0.75: inside the row
        scaled = ((queries.double() - self.low[rows]) / self.span[rows]).clamp(-0.25, 0.75)
        at = torch.searchsorted(self.keys, (rows[:, None] + scaled).reshape(-1)).reshape(queries.shape)
        return at - rows[:, None] * self.n


def _sorted_lloyd(
    xs: torch.Tensor, ws: torch.Tensor, k: int, iterations: int, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of each row of the sorted values `xs` (G, n), weights `ws`: sorted centroids (G, k)
    and where each cluster's run of sorted values ends (G, k), the last at n.

    In 1-D, with sorted values and sorted centroids, every cluster is a contiguous run: an iteration is a
    search of the k - 1 midpoints among the values and gathers from prefix sums, O(G k log n) rather than
    O(G n), and only the rows whose clusters still change go on. Seeds: `_seeds`, so no randomness."""
    g, n = xs.shape
    pad = torch.zeros(g, 1, dtype=torch.float64)
    cw = torch.cat([pad, ws.double().cumsum(dim=1)], dim=1)
    cwx = torch.cat([pad, (ws.double() * xs.double()).cumsum(dim=1)], dim=1)
    centroids = _seeds(xs, ws, k)
    count_below = _RowSearch(xs)
    ends = torch.full((g, k), -1, dtype=torch.int64)  # none yet: the first iteration always updates
    ends[:, -1] = n
    active = torch.arange(g)
    for step in range(iterations + 1):
        c = _pin_and_sort(centroids[active], zero[active])
        new = count_below(active, (c[:, 1:] + c[:, :-1]) / 2)
        changed = (new != ends[active, :-1]).any(dim=1)
        centroids[active], ends[active, :-1] = c, new
        active = active[changed]
        if step == iterations or not len(active):
            break
        centroids[active] = _segment_means(cw, cwx, active, ends[active], centroids[active])
    return centroids, ends


_OPTIMAL_CHUNK = 1 << 23  # (groups, n + 1, n + 1) float64 elements per chunk in `_sorted_optimal`
OPTIMAL_MAX_N = 2048  # values per group `kmeans(method="optimal")` takes: O(k n^2) time, O(n^2) memory


def _sorted_optimal(xs: torch.Tensor, ws: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares k-means of each row of the sorted values `xs` (G, n), weights `ws`, found exactly:
    sorted centroids (G, k) and where each cluster's run ends (G, k), as `_sorted_lloyd` returns them.

    In 1-D the clusters of the optimum are contiguous runs of the sorted values, so dynamic programming over
    where the runs end finds it (Wang & Song, Ckmeans.1d.dp, 2011): D[j][b], the least cost of j runs over
    the first b values, is min over a of D[j - 1][a] + cost(a, b), each run's cost read from prefix sums.
    O(k n^2) per group, done for many groups at once. Lloyd's iterations stop in a local optimum: on
    SmolLM2's weights in groups of 192 their squared error is ~20% above this one."""
    g, n = xs.shape
    x = xs.double() - xs.double().mean(dim=1, keepdim=True)  # centred: less cancellation in the sums
    w = ws.double()
    pad = torch.zeros(g, 1, dtype=torch.float64)
    cw = torch.cat([pad, w.cumsum(dim=1)], dim=1)
    cs = torch.cat([pad, (w * x).cumsum(dim=1)], dim=1)
    cq = torch.cat([pad, (w * x * x).cumsum(dim=1)], dim=1)
    mass = cw[:, None, :] - cw[:, :, None]  # (G, a, b): the run [a, b)
    total = cs[:, None, :] - cs[:, :, None]
    cost = cq[:, None, :] - cq[:, :, None] - total * total / mass.clamp_min(1e-300)
    cost = torch.where(mass > 0, cost.clamp_min(0), torch.zeros((), dtype=torch.float64))
    empty = torch.arange(n + 1)[:, None] >= torch.arange(n + 1)[None, :]  # a >= b: no run
    cost = cost.masked_fill(empty, torch.inf)
    # (G, b, a) float32: the minimum runs over the last, contiguous axis (twice as fast as over a middle one)
    by_end = cost.transpose(1, 2).float().contiguous()
    best = by_end[:, :, 0]  # one run over [0, b)
    choices = []
    for _ in range(1, k):
        best, choice = (best[:, None, :] + by_end).min(dim=2)
        choices.append(choice)
    ends = torch.empty(g, k, dtype=torch.int64)
    ends[:, -1] = n
    for j in range(k - 1, 0, -1):  # back from the last run: where each run starts, the previous ends
        ends[:, j - 1] = choices[j - 1].gather(1, ends[:, j : j + 1])[:, 0]
    starts = torch.cat([torch.zeros(g, 1, dtype=torch.int64), ends[:, :-1]], dim=1)
    pw = cw.gather(1, ends) - cw.gather(1, starts)
    raw = torch.cat([pad, xs.double().cumsum(dim=1)], dim=1)
    weighted = torch.cat([pad, (w * xs.double()).cumsum(dim=1)], dim=1)
    plain = (raw.gather(1, ends) - raw.gather(1, starts)) / (ends - starts).clamp_min(1)
    mean = (weighted.gather(1, ends) - weighted.gather(1, starts)) / pw.clamp_min(1e-300)
    return torch.where(pw > 0, mean, plain).float(), ends


def _run_labels(ends: torch.Tensor, n: int) -> torch.Tensor:
    """(G, n) int64: for each sorted position, the run it lies in (runs ending at `ends` (G, k))."""
    marks = torch.zeros(ends.shape[0], n + 1, dtype=torch.int64)
    marks.scatter_add_(1, ends[:, :-1], torch.ones_like(ends[:, :-1]))
    return marks[:, :n].cumsum(dim=1)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    weights: torch.Tensor | None = None,
    iterations: int = 30,
    keep_zero: bool = False,
    method: str = "lloyd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means of each row of `x` (G, n): centroids (G, k) fp32, sorted, and indices (G, n) int64.

    `method`: "lloyd" (iterations from `_seeds`, fast, a local optimum) or "optimal" (the exact least
    squares optimum by dynamic programming, `_sorted_optimal`, for groups of at most OPTIMAL_MAX_N values;
    groups where `keep_zero` pins a 0 use Lloyd's).

    `weights` (G, n), >= 0: each value's importance (a zero weight leaves the centroids alone, as a pruned
    position); a group whose weights are all zero is clustered unweighted. Deterministic (companded quantile
    seeds, see `_seeds`); stops early when no assignment changes. `keep_zero`: in every group holding an
    exact 0 (weights pruned in place), the centroid nearest 0 is pinned at exactly 0, so those weights
    stay 0. Many rows are clustered at once, in chunks of a few million values.

    >>> c, i = kmeans(torch.tensor([[1.0, 1.0, 5.0, 5.0, 9.0]]), 3)
    >>> c[0].tolist(), i[0].tolist()
    ([1.0, 5.0, 9.0], [0, 0, 1, 1, 2])
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans: x must be (groups, values), got shape {tuple(x.shape)}.")
    if not 1 <= k <= x.shape[1]:
        raise ValueError(f"kmeans: {k} clusters for groups of {x.shape[1]} values; k must be in [1, n].")
    x = x.detach().float()
    w = None if weights is None else weights.detach().float().clamp_min(0)
    if w is not None and w.shape != x.shape:
        raise ValueError(f"kmeans: weights {tuple(w.shape)} do not match x {tuple(x.shape)}.")
    if w is not None:
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    if method not in ("lloyd", "optimal"):
        raise ValueError(f"kmeans: method={method!r} is unknown; use 'lloyd' or 'optimal'.")
    n = x.shape[1]
    if method == "optimal" and n > OPTIMAL_MAX_N:
        raise ValueError(f"kmeans: method='optimal' takes groups of at most {OPTIMAL_MAX_N} values, not {n}.")
    per_chunk = max(1, _CHUNK // n if method == "lloyd" else _OPTIMAL_CHUNK // (n + 1) ** 2)
    centroids, indices = [], []
    for start in range(0, x.shape[0], per_chunk):
        xs, order = x[start : start + per_chunk].sort(dim=1)
        ws = torch.ones_like(xs) if w is None else w[start : start + per_chunk].gather(1, order)
        zero = (xs == 0).any(dim=1) if keep_zero else torch.zeros(xs.shape[0], dtype=torch.bool)
        if method == "optimal":
            c, ends = _sorted_optimal(xs, ws, k)
            if bool(zero.any()):  # a 0 pinned: Lloyd's for those groups
                c[zero], ends[zero] = _sorted_lloyd(xs[zero], ws[zero], k, iterations, zero[zero])
        else:
            c, ends = _sorted_lloyd(xs, ws, k, iterations, zero)
        centroids.append(c)
        indices.append(torch.empty_like(order).scatter_(1, order, _run_labels(ends, n)))
    return torch.cat(centroids), torch.cat(indices)


def quantize_codebook(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes (G, k) and one fp32 scale per group (G,) with codes * scale ~ centroids (symmetric)."""
    scale = (centroids.abs().amax(dim=1) / 127).clamp_min(1e-12)
    codes = torch.round(centroids / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale.float()


def codes_on_grid(shared: torch.Tensor, scale: torch.Tensor, *, qmax: int) -> torch.Tensor:
    """Each row's codebook on that row's symmetric int8 grid: codes (rows, k) = round(shared / scale),
    clamped to [-qmax, qmax], for `shared` (rows, k) fp32 (the codebook each row reads) and `scale` (rows,).
    A row's weights take only its codebook's values, so its int8 weight codes are these codes gathered.

    >>> codes_on_grid(torch.tensor([[-1.0, 0.5, 2.0]]), torch.tensor([2.0 / 127]), qmax=127).tolist()
    [[-64, 32, 127]]
    """
    codes = torch.round(shared.float() / scale.float()[:, None]).clamp(-qmax, qmax)
    return codes.to(torch.int8)


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
    "codes_on_grid",
    "index_bits",
    "kmeans",
    "pack_indices",
    "packed_bytes",
    "quantize_codebook",
    "unpack_bits",
    "unpack_indices",
]
