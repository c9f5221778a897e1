"""Range estimators for calibration: each sees one batch at a time and returns a (lo, hi) to quantize with.

Memory stays bounded whatever the calibration set: observers keep a running min/max or a fixed-size
histogram, never the activations. Pure tensor maths; the caller decides which tensors to observe.

    obs = make_observer("mse")
    for x in batches:
        obs.update(x)
    lo, hi = obs.range()  # 0-d fp32 tensors, then affine_params(lo, hi, symmetric=False, signed=False)
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Protocol

import torch

from modelpress.errors import DataError
from modelpress.ops.quant import affine_params, code_range

_N_CANDIDATES = 100  # clip points per side tried by MSEObserver
_KL_EPS = 1e-4  # count given to empty bins of Q where P has mass (EntropyObserver)
_CHUNK = 256  # candidates evaluated at once: bounds the (candidates, bins) work tensors to a few MB


class Observer(Protocol):
    """What every observer does: `update` once per calibration batch, then `range`."""

    def update(self, x: torch.Tensor) -> None: ...

    def range(self) -> tuple[torch.Tensor, torch.Tensor]: ...


def _batch(x: torch.Tensor, owner: str) -> torch.Tensor | None:
    """fp32 detached view of a batch; None for an empty one (it carries no range information)."""
    x = x.detach()
    x = x.float() if x.dtype != torch.float32 else x
    if x.numel() == 0:
        return None
    if not torch.isfinite(x).all():
        raise DataError(
            f"{owner}: a calibration batch contains NaN or Inf; fix the model or data that produced it "
            "(a range cannot be calibrated from non-finite values)."
        )
    return x


def _not_ready(owner: str) -> DataError:
    return DataError(
        f"{owner}.range() was called before any update(); feed it at least one non-empty calibration batch."
    )


def _pair(lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Running min/max


class MinMaxObserver:
    """Exact running min and max over all batches; per channel along `axis` if given.

    >>> obs = MinMaxObserver()
    >>> obs.update(torch.tensor([-1.0, 2.0])); obs.update(torch.tensor([3.0]))
    >>> obs.range()
    (tensor(-1.), tensor(3.))
    """

    def __init__(self, *, axis: int | None = None) -> None:
        self.axis = axis
        self._lo: torch.Tensor | None = None
        self._hi: torch.Tensor | None = None

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.axis is None:
            return x.amin(), x.amax()
        if not -x.ndim <= self.axis < max(x.ndim, 1) or x.ndim == 0:
            raise ValueError(
                f"{type(self).__name__}: axis={self.axis} is out of range for a batch of shape {tuple(x.shape)}."
            )
        rows = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)  # (channels, everything else)
        if self._lo is not None and rows.shape[0] != self._lo.numel():
            raise ValueError(
                f"{type(self).__name__}: batch has {rows.shape[0]} channels along axis {self.axis}, "
                f"earlier batches had {self._lo.numel()}."
            )
        return rows.amin(dim=1), rows.amax(dim=1)

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        assert self._lo is not None and self._hi is not None
        self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the running range."""
        xb = _batch(x, type(self).__name__)
        if xb is None:
            return
        lo, hi = self._batch_range(xb)
        if self._lo is None:
            self._lo, self._hi = lo, hi
        else:
            self._combine(lo, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi): 0-d fp32 tensors, or 1-d (channels,) with `axis`."""
        if self._lo is None or self._hi is None:
            raise _not_ready(type(self).__name__)
        return self._lo.clone(), self._hi.clone()


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max: `lo = momentum * lo + (1 - momentum) * batch_lo`.

    The first batch sets the range. Less sensitive than `MinMaxObserver` to one extreme batch.

    >>> obs = MovingAverageMinMaxObserver(momentum=0.5)
    >>> obs.update(torch.tensor([0.0, 2.0])); obs.update(torch.tensor([0.0, 4.0]))
    >>> obs.range()
    (tensor(0.), tensor(3.))
    """

    def __init__(self, *, momentum: float = 0.9, axis: int | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"momentum={momentum} must be in [0, 1); 0.9 keeps 90% of the running range per batch."
            )
        super().__init__(axis=axis)
        self.momentum = momentum

    def _combine(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        assert self._lo is not None and self._hi is not None
        step = 1 - self.momentum  # lo + step * (batch_lo - lo): a constant input stays exactly constant
        self._lo = self._lo + step * (lo - self._lo)
        self._hi = self._hi + step * (hi - self._hi)


# ---------------------------------------------------------------------------------------------------------
# Histogram-based observers


class HistogramObserver:
    """A `bins`-bin histogram over a range that always contains 0 and grows to cover every batch.

    When a batch falls outside the range, the range grows to exactly [min, max] of everything seen (and
    0), and each old bin's count is split between the (at most two) new bins it overlaps, in proportion
    to the overlap: the total is preserved, positions move by less than one new bin. The range is never
    padded: snapping it to multiples of the old bins instead would double the bin width on every small
    extension, which ordinary batches (each with a slightly larger max) trigger again and again.
    `range()` here is the exact observed min/max; subclasses choose a clipped range from the histogram.

    >>> obs = HistogramObserver(bins=4)
    >>> obs.update(torch.tensor([0.5, 1.5, 3.9]))
    >>> obs.histogram()[0].tolist()
    [1.0, 1.0, 0.0, 1.0]
    """

    def __init__(self, *, bins: int = 2048) -> None:
        if bins < 2:
            raise ValueError(f"bins={bins} is too small; use at least 2 (default 2048).")
        self.bins = bins
        self._counts: torch.Tensor | None = None  # (bins,) float64: re-binning splits counts
        self._lo = 0.0  # histogram edges; lo <= 0 <= hi
        self._hi = 0.0
        self._min = math.inf  # exact extremes of the data seen
        self._max = -math.inf
        self._zeros = 0  # exact zeros seen (ReLU outputs, padding): always representable, never in error

    def update(self, x: torch.Tensor) -> None:
        """Add one batch to the histogram, growing its range first if needed."""
        xb = _batch(x, type(self).__name__)
        if xb is not None:
            self._accumulate(xb)

    def _accumulate(self, x: torch.Tensor) -> None:
        v = x.double().flatten()
        dmin, dmax = float(v.min()), float(v.max())
        self._min, self._max = min(self._min, dmin), max(self._max, dmax)
        self._zeros += int((v == 0).sum())
        if self._counts is None:
            self._lo, self._hi = min(dmin, 0.0), max(dmax, 0.0)
            self._counts = torch.zeros(self.bins, dtype=torch.float64)
        elif dmin < self._lo or dmax > self._hi:
            self._grow(dmin, dmax)
        self._counts += torch.bincount(self._bin_index(v), minlength=self.bins).double()

    def _bin_index(self, v: torch.Tensor) -> torch.Tensor:
        if self._hi == self._lo:  # only zeros seen so far: everything is in the bin holding 0
            return torch.zeros(v.shape, dtype=torch.int64)
        width = (self._hi - self._lo) / self.bins
        # clamp: the top edge belongs to the last bin, and float slop at the edges must not lose counts
        return ((v - self._lo) / width).floor().clamp_(0, self.bins - 1).long()

    def _grow(self, dmin: float, dmax: float) -> None:
        assert self._counts is not None
        old, n = self._counts, self.bins
        lo, hi = min(dmin, self._lo), max(dmax, self._hi)
        if self._hi == self._lo:  # all previous mass sits at 0
            self._lo, self._hi = lo, hi
            self._counts = torch.zeros(n, dtype=torch.float64)
            self._counts[self._bin_index(torch.zeros(1, dtype=torch.float64))] += old.sum()
            return
        w, new_w = (self._hi - self._lo) / n, (hi - lo) / n
        # New bins are at least as wide as old ones, so old bin i, [a, a + w], overlaps new bins j and j + 1
        # only; split its count by overlap (values uniform within a bin).
        a = self._lo + w * torch.arange(n, dtype=torch.float64)
        j = ((a - lo) / new_w).floor().clamp_(0, n - 1)
        first = ((lo + (j + 1) * new_w - a) / w).clamp_(0, 1)
        first = torch.where(first > 1 - 1e-9, 1.0, torch.where(first < 1e-9, 0.0, first))  # no float dust
        j = j.long()
        counts = torch.zeros(n, dtype=torch.float64).index_add_(0, j, old * first)
        self._counts = counts.index_add_(0, (j + 1).clamp_(max=n - 1), old * (1 - first))
        self._lo, self._hi = lo, hi

    def _ready(self) -> torch.Tensor:
        if self._counts is None:
            raise _not_ready(type(self).__name__)
        return self._counts

    def _nonzero_bins(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(counts, left edges) of the non-empty bins, float64, exact zeros removed; and the bin width."""
        counts = self._ready().double()
        width = (self._hi - self._lo) / self.bins
        zero_bin = self._bin_index(torch.zeros(1, dtype=torch.float64))
        counts[zero_bin] = (counts[zero_bin] - self._zeros).clamp(min=0)
        left = self._lo + width * torch.arange(self.bins, dtype=torch.float64)
        keep = counts > 0
        return counts[keep], left[keep], width

    def histogram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts (bins,), edges (bins + 1,)), both float64."""
        counts = self._ready()
        return counts.clone(), torch.linspace(self._lo, self._hi, self.bins + 1, dtype=torch.float64)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact observed (min, max) as 0-d fp32 tensors."""
        self._ready()
        return _pair(self._min, self._max)


class PercentileObserver(HistogramObserver):
    """Clip each tail separately: lo at the (100 - p)th percentile, hi at the pth, read off the histogram.

    Within a bin values are taken as uniform; the result never exceeds the observed min/max.

    >>> obs = PercentileObserver(percentile=99.0)
    >>> obs.update(torch.cat([torch.linspace(-1, 1, 1000), torch.tensor([1e4])]))
    >>> bool(obs.range()[1] < 10)
    True
    """

    def __init__(self, *, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(
                f"percentile={percentile} must be in (50, 100]; 99.99 clips the top and bottom 0.01%."
            )
        super().__init__(bins=bins)
        self.percentile = percentile

    def _quantile(self, q: float) -> float:
        counts = self._ready().double()
        cdf = counts.cumsum(0)
        target = q * float(cdf[-1])
        j = min(int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64))), self.bins - 1)
        before = float(cdf[j - 1]) if j > 0 else 0.0
        frac = (target - before) / float(counts[j]) if counts[j] > 0 else 0.0
        value = self._lo + (j + min(max(frac, 0.0), 1.0)) * (self._hi - self._lo) / self.bins
        return min(max(value, self._min), self._max)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) at the two percentiles, as 0-d fp32 tensors."""
        self._ready()
        if self._min == self._max:
            return _pair(self._min, self._max)
        lo = self._quantile(1.0 - self.percentile / 100.0)
        hi = self._quantile(self.percentile / 100.0)
        return _pair(min(lo, hi), max(lo, hi))


def _sawtooth_integral(t: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Antiderivative of the squared rounding error (x - s * round(x / s))^2, split as (periods, remainder).

    The value is periods * s^3 / 12 + remainder; keeping the parts apart avoids cancellation.
    """
    periods = torch.floor(t / s + 0.5)
    r = t - periods * s  # in [-s/2, s/2)
    return periods, (r * r * r + s * s * s / 8) / 3


def _expected_sq_error(
    counts: torch.Tensor,
    left: torch.Tensor,
    width: float,
    scale: torch.Tensor,
    t_lo: torch.Tensor,
    t_hi: torch.Tensor,
) -> torch.Tensor:
    """Summed squared fake-quantization error per candidate, values taken as uniform inside each bin.

    counts, left: (bins,) counts and left edges. scale, t_lo, t_hi: (C,) the step and the lowest/highest
    representable value. Values below t_lo - s/2 or above t_hi + s/2 are clipped (error to that end level),
    those between are rounded to the grid k * s (the zero point is integral, so the grid contains 0).
    Returns (C,).
    """
    s, t_lo, t_hi = scale[:, None], t_lo[:, None], t_hi[:, None]  # (C, 1)
    a, b = left[None, :], left[None, :] + width  # (1, bins)
    cut_lo, cut_hi = t_lo - s / 2, t_hi + s / 2

    def clipped(u0: torch.Tensor, u1: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        length = (u1 - u0).clamp(min=0)
        mid = (u0 + u1) / 2 - level
        return length * (mid * mid + length * length / 12)  # integral of (x - level)^2 over [u0, u1]

    m0, m1 = torch.maximum(a, cut_lo), torch.minimum(b, cut_hi)
    p0, r0 = _sawtooth_integral(m0, s)
    p1, r1 = _sawtooth_integral(m1, s)
    rounded = ((p1 - p0) * (s * s * s / 12) + (r1 - r0)) * (m1 > m0)
    total = clipped(a, torch.minimum(b, cut_lo), t_lo) + rounded + clipped(torch.maximum(a, cut_hi), b, t_hi)
    return total @ (counts / width)


class MSEObserver(HistogramObserver):
    """The clipping range with the least expected quantization MSE (clipping plus rounding) on the histogram.

    Each candidate range is scored on the grid it really produces (`affine_params`: fp32 scale, rounded
    zero point, saturation at the codes), with values uniform inside each bin and exact zeros error-free.
    Symmetric (signed codes) tries [-a, a] for a = amax * i / 100, i = 1..100. Asymmetric (unsigned codes,
    the default, as for uint8 activations) clips each side at min * i / 100 and max * j / 100: a 21 x 21
    grid in steps of 5/100, then the 9 x 9 steps of 1/100 around the best. Ties go to the widest range.

    >>> obs = MSEObserver()
    >>> obs.update(torch.cat([torch.randn(10_000), torch.tensor([80.0])]))
    >>> bool(obs.range()[1] < 80)
    True
    """

    def __init__(self, *, bits: int = 8, symmetric: bool = False, bins: int = 2048) -> None:
        code_range(bits, signed=True)  # validates bits
        super().__init__(bins=bins)
        self.bits = bits
        self.symmetric = symmetric

    def _errors(self, cand_lo: torch.Tensor, cand_hi: torch.Tensor) -> torch.Tensor:
        counts, left, width = self._nonzero_bins()
        qmin, qmax = code_range(self.bits, signed=self.symmetric)
        errors = []
        for start in range(0, cand_lo.numel(), _CHUNK):
            lo_c, hi_c = cand_lo[start : start + _CHUNK], cand_hi[start : start + _CHUNK]
            scale, zp = affine_params(
                lo_c, hi_c, bits=self.bits, symmetric=self.symmetric, signed=self.symmetric
            )
            s = scale.double()
            errors.append(_expected_sq_error(counts, left, width, s, (qmin - zp) * s, (qmax - zp) * s))
        return torch.cat(errors)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) minimising the expected MSE, as 0-d fp32 tensors; feed them to `affine_params`."""
        self._ready()
        if self._min == self._max:
            return _pair(self._min, self._max)
        lo, hi = min(self._min, 0.0), max(self._max, 0.0)
        steps = torch.arange(_N_CANDIDATES, -1, -1, dtype=torch.float64)  # 100 .. 0: widest first
        if self.symmetric:
            a = max(-lo, hi) * steps[:-1] / _N_CANDIDATES
            best = int(torch.argmin(self._errors(-a, a)))
            return _pair(-float(a[best]), float(a[best]))
        # Both sides: coarse grid, then refine around its best point.
        i_best, j_best = _N_CANDIDATES, _N_CANDIDATES
        for grid in (steps[::5], None):
            if grid is None:
                fine = torch.arange(4, -5, -1, dtype=torch.float64)
                gi = (i_best + fine).clamp(0, _N_CANDIDATES).unique_consecutive()
                gj = (j_best + fine).clamp(0, _N_CANDIDATES).unique_consecutive()
            else:
                gi = gj = grid
            gi = gi if lo < 0 else gi[:1]  # a side with no data beyond 0 has nothing to clip
            gj = gj if hi > 0 else gj[:1]
            ii, jj = (g.flatten() for g in torch.meshgrid(gi, gj, indexing="ij"))
            cand_lo, cand_hi = lo * ii / _N_CANDIDATES, hi * jj / _N_CANDIDATES
            errors = self._errors(cand_lo, cand_hi).masked_fill(cand_hi - cand_lo <= 0, math.inf)
            best = int(torch.argmin(errors))
            i_best, j_best = int(ii[best]), int(jj[best])
        return _pair(lo * i_best / _N_CANDIDATES, hi * j_best / _N_CANDIDATES)


class EntropyObserver(HistogramObserver):
    """TensorRT-style calibration: the threshold T minimising KL(P || Q) on the histogram of |x|.

    For each candidate T (a bin edge, from `levels` bins up), P is the histogram cut at T with the mass
    beyond folded into its last bin, and Q is the cut histogram merged into `levels` quantization bins and
    spread back evenly over the non-empty bins. `levels` is 2^(bits-1) - 1 when negative values were seen
    (range (-T, T)), else 2^bits - 1 (range (0, T), for unsigned codes). Exact zeros are left out: they are
    always representable, and their spike would only distort the search. Ties go to the largest T.

    >>> obs = EntropyObserver()
    >>> obs.update(torch.cat([torch.randn(10_000), torch.tensor([80.0])]))
    >>> bool(obs.range()[1] < 80)
    True
    """

    def __init__(self, *, bits: int = 8, bins: int = 2048) -> None:
        code_range(bits, signed=True)  # validates bits
        if bins < 2**bits:
            raise ValueError(
                f"EntropyObserver: bins={bins} must be at least 2^bits = {2**bits} for bits={bits}."
            )
        super().__init__(bins=bins)
        self.bits = bits
        self._negative = False

    def update(self, x: torch.Tensor) -> None:
        """Add |x| of one batch to the histogram, remembering whether any value was negative."""
        xb = _batch(x, type(self).__name__)
        if xb is not None:
            self._negative = self._negative or bool(xb.amin() < 0)
            self._accumulate(xb.abs())

    def _kl(self, counts: torch.Tensor, kept: torch.Tensor, levels: int) -> torch.Tensor:
        """KL(P || Q) for each candidate number of kept bins `kept` (C,); counts (bins,) float64."""
        c = counts.numel()
        cdf = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (bins + 1,) counts before bin t
        nz = counts > 0
        nz_cdf = torch.cat([counts.new_zeros(1), nz.double().cumsum(0)])
        i = kept[:, None]  # (C, 1)
        per = i // levels  # bins per quantization level; the last level also takes the remainder
        g = torch.arange(levels)[None, :]  # (1, levels)
        start, stop = g * per, torch.where(g == levels - 1, i, (g + 1) * per)  # (C, levels)
        avg = (cdf[stop] - cdf[start]) / (nz_cdf[stop] - nz_cdf[start]).clamp(min=1)
        t = torch.arange(c)[None, :]  # (1, bins)
        inside = t < i  # (C, bins)
        q = avg.gather(1, torch.clamp(t // per, max=levels - 1)) * (inside & nz)
        p = counts[None, :] * inside
        p = p.scatter_add(1, i - 1, (cdf[-1] - cdf[kept])[:, None])  # fold the clipped tail into bin i - 1
        # A tail folded into an empty bin i - 1 leaves Q = 0 where P > 0: an infinite divergence that would
        # rule out every clip below an isolated outlier. Like MXNet/TVM's version of this method, give such
        # bins a tiny count instead.
        q = torch.where((p > 0) & (q == 0), _KL_EPS, q)
        p = p / p.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=1, keepdim=True)
        return torch.where(p > 0, p * torch.log(p / q), 0.0).sum(dim=1)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(-T, T), or (0, T) if no negative value was seen, as 0-d fp32 tensors."""
        counts = self._ready().double()
        counts[0] = (counts[0] - self._zeros).clamp(min=0)  # |x| histogram: bin 0 holds the exact zeros
        amax = self._max  # of |x|
        if self._min == self._max or counts.sum() == 0:
            threshold = amax
        else:
            levels = 2 ** (self.bits - 1) - 1 if self._negative else 2**self.bits - 1
            kept = torch.arange(levels, self.bins + 1)
            kl = torch.cat(
                [self._kl(counts, kept[j : j + _CHUNK], levels) for j in range(0, len(kept), _CHUNK)]
            )
            best = len(kl) - 1 - int(torch.argmin(kl.flip(0)))  # the last minimum: widest of equals
            threshold = min(int(kept[best]) * (self._hi - self._lo) / self.bins, amax)
        return _pair(-threshold if self._negative else 0.0, threshold)


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, **kwargs: Any) -> Observer:
    """A fresh observer by registry name, with its keyword options.

    >>> make_observer("percentile", percentile=99.9).percentile
    99.9
    """
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose from {sorted(OBSERVERS)}.")
    cls = OBSERVERS[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError:
        accepted = list(inspect.signature(cls).parameters)
        raise ValueError(
            f"observer {name!r} does not take {sorted(kwargs)}; its options are {accepted}."
        ) from None
    return cls(**kwargs)
