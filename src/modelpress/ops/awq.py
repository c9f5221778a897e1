"""AWQ: activation-aware weight quantization (Lin et al., 2023). Input channels that carry large
activations matter most; scaling a weight's input column j up by s_j (and the input down by s_j, folded
into the op that produces it) gives those channels finer quantization steps. Then each group's range is
shrunk where clipping lowers the output error. Pure tensor maths; the caller collects the statistics,
folds the scales and installs the codes.

    stats = ActivationStats(k, max_rows=2048)
    for x in layer_inputs:  # (..., K)
        stats.update(x)
    h = stats.hessian()                                          # X^T X / T of the sampled rows
    s, _ = search_scales(h, stats.mean_abs(), w, grid)           # (K,), or None: no scaling helps
    ratio = search_clip(h / s[:, None] / s[None, :], w * s, grid)  # (N, G) range shrink factors
    scale, zp = grid.params(w * s, ratio)
"""

from __future__ import annotations

import torch

from modelpress.ops.gptq import WeightGrid

_EPS = 1e-4


class ActivationStats:
    """Mean |x| per input channel over all rows, and an evenly strided sample of at most 2 * `max_rows`
    rows (the stride doubles whenever the sample grows past that, so memory stays bounded).

    >>> stats = ActivationStats(2, max_rows=2)
    >>> for _ in range(5): stats.update(torch.ones(3, 2))
    >>> stats.mean_abs(), stats.sample().shape
    (tensor([1., 1.]), torch.Size([4, 2]))
    """

    def __init__(self, n_features: int, *, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"ActivationStats: max_rows={max_rows} must be positive.")
        self.n_features, self.max_rows = n_features, max_rows
        self._abs_sum: torch.Tensor | None = None
        self._rows: list[torch.Tensor] = []
        self._kept = 0
        self._stride = 1
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, self.n_features).float()
        total = rows.abs().sum(dim=0)
        self._abs_sum = total if self._abs_sum is None else self._abs_sum.add_(total)
        first = (-self.count) % self._stride  # index in `rows` of the next multiple of the stride
        picked = rows[first :: self._stride]
        self.count += rows.shape[0]
        if picked.numel():
            self._rows.append(picked.clone())
            self._kept += picked.shape[0]
        if self._kept > 2 * self.max_rows:  # keep rows whose global index is a multiple of 2 * stride
            kept = torch.cat(self._rows)[::2]
            self._rows, self._kept, self._stride = [kept], kept.shape[0], 2 * self._stride

    def mean_abs(self) -> torch.Tensor:
        """(K,) mean |x| per input channel."""
        if self._abs_sum is None or self.count == 0:
            raise ValueError("ActivationStats: no rows were seen.")
        return self._abs_sum / self.count

    def hessian(self) -> torch.Tensor:
        """(K, K) Gram matrix X^T X / T of the sampled rows: all the searches need of the inputs."""
        x = self.sample()
        return x.T @ x / x.shape[0]

    def sample(self) -> torch.Tensor:
        """(T, K) rows spread evenly over everything seen."""
        if not self._rows:
            raise ValueError("ActivationStats: no rows were seen.")
        if len(self._rows) > 1:
            self._rows = [torch.cat(self._rows)]
        return self._rows[0]


def weight_importance(weight: torch.Tensor, grid: WeightGrid) -> torch.Tensor:
    """(K,) mean over output rows of |w| relative to its group's max |w|: AWQ's weight term."""
    n, k = weight.shape
    g = grid.grouped(weight.detach().abs())
    rel = g / (g.amax(dim=-1, keepdim=True) + 1e-6)
    return rel.reshape(n, -1)[:, :k].mean(dim=0)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared output error of a weight error `delta` (N, K) for inputs with Gram matrix
    `hessian` = X^T X / T (K, K): mean over (t, n) of (x_t . delta_n)^2, without the inputs."""
    return float(((delta @ hessian) * delta).sum() / delta.shape[0])


def search_scales(
    hessian: torch.Tensor,
    act_mean: torch.Tensor,
    weight: torch.Tensor,
    grid: WeightGrid,
    *,
    n_grid: int = 20,
) -> tuple[torch.Tensor | None, float | None]:
    """AWQ's per-input-channel scale s (K,) for a weight (N, K) (layers sharing one input concatenated
    along N), given the inputs' Gram matrix `hessian` = X^T X / T (K, K) and mean |x| per channel
    `act_mean` (K,).

    Tries s = act_mean^a / w_mean^(1 - a), normalised to geometric mid-range 1, for a = 0, 1/n_grid, ...,
    (n_grid - 1)/n_grid, and keeps the one whose fake-quantized `W * s` (with x / s as input) gives the
    smallest output MSE. Returns (s, a), or (None, None) when no scaling beats plain rounding.

    >>> x = torch.randn(256, 16) * torch.linspace(0.1, 4, 16)
    >>> s, a = search_scales(x.T @ x / 256, x.abs().mean(0), torch.randn(8, 16), WeightGrid(4, 16, True))
    >>> s is None or s.shape == (16,)
    True
    """
    w = weight.detach().float()
    h = hessian.float()
    best_err = output_error(grid.fake_quantize(w) - w, h)
    best: tuple[torch.Tensor | None, float | None] = (None, None)
    a_mean = act_mean.float().clamp(min=_EPS)
    w_mean = weight_importance(w, grid).clamp(min=_EPS)
    for i in range(n_grid):
        alpha = i / n_grid
        s = (a_mean.pow(alpha) / w_mean.pow(1 - alpha)).clamp(min=_EPS)
        s = s / (s.max() * s.min()).sqrt()
        err = output_error(grid.fake_quantize(w * s) / s - w, h)
        if err < best_err:
            best_err, best = err, (s, alpha)
    return best
