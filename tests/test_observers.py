import numpy as np
import pytest
import torch

from modelpress.errors import DataError
from modelpress.ops.observers import (
    OBSERVERS,
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    make_observer,
)
from modelpress.ops.quant import affine_params, fake_quantize


def _batches(seed: int, n: int = 4, size: int = 20_000) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) for _ in range(n)]


def _with_outliers(seed: int = 0) -> list[torch.Tensor]:
    batches = _batches(seed, n=5)
    batches[1][0] = -25.0  # two outliers in 100k values
    batches[3][0] = 60.0
    return batches


def _observe(obs, batches):
    for x in batches:
        obs.update(x)
    return obs.range()


def _uint8_mse(lo: torch.Tensor, hi: torch.Tensor, x: torch.Tensor) -> float:
    """Mean squared error of uint8 asymmetric fake quantization over [lo, hi] (the static int8 scheme)."""
    scale, zp = affine_params(lo, hi, symmetric=False, signed=False)
    return float((fake_quantize(x, scale, zp, axis=None, signed=False) - x).pow(2).mean())


def test_registry_and_make_observer():
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "mse", "entropy"}
    assert isinstance(make_observer("percentile", percentile=99.9), PercentileObserver)
    assert isinstance(make_observer("mse", bits=4, symmetric=True), MSEObserver)
    with pytest.raises(ValueError, match=r"unknown observer 'kl'.*'entropy'.*'minmax'"):
        make_observer("kl")
    with pytest.raises(ValueError, match=r"observer 'minmax' does not take \['bits'\].*axis"):
        make_observer("minmax", bits=8)


def test_minmax_equals_true_min_max_over_batches():
    batches = _batches(1, n=5, size=1000)
    lo, hi = _observe(MinMaxObserver(), batches)
    everything = torch.cat(batches)
    assert lo.ndim == hi.ndim == 0
    assert lo == everything.min() and hi == everything.max()


def test_minmax_per_channel():
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 3, 5, generator=g) for _ in range(3)]
    lo, hi = _observe(MinMaxObserver(axis=1), batches)
    everything = torch.cat(batches)
    assert torch.equal(lo, everything.amin(dim=(0, 2))) and torch.equal(hi, everything.amax(dim=(0, 2)))
    obs = MinMaxObserver(axis=1)
    obs.update(torch.randn(2, 3))
    with pytest.raises(ValueError, match="4 channels along axis 1, earlier batches had 3"):
        obs.update(torch.randn(2, 4))


def test_moving_average_is_an_ema_of_batch_ranges():
    obs = MovingAverageMinMaxObserver(momentum=0.9)
    obs.update(torch.tensor([-1.0, 1.0]))
    obs.update(torch.tensor([-3.0, 11.0]))
    lo, hi = obs.range()
    assert torch.allclose(lo, torch.tensor(-1.2)) and torch.allclose(hi, torch.tensor(2.0))
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageMinMaxObserver(momentum=1.0)


def test_histogram_growth_keeps_every_count_and_rebins_old_counts_in_place():
    g = torch.Generator().manual_seed(3)
    first = torch.rand(5000, generator=g)  # [0, 1]
    second = torch.randn(5000, generator=g) * 7 + 20  # exceeds the first range
    obs = HistogramObserver(bins=256)
    obs.update(first)
    obs.update(second)
    counts, edges = obs.histogram()
    everything = torch.cat([first, second])
    assert counts.shape == (256,)
    assert float(counts.sum()) == pytest.approx(everything.numel(), rel=1e-12)
    # the range is exactly what was seen: no padding, so no resolution is wasted
    assert edges[0] == min(float(everything.min()), 0.0) and edges[-1] == everything.max()
    # the first batch's counts were re-binned into the new bins over [0, 1] and nowhere else
    width = float(edges[1] - edges[0])
    old_region = (edges[:-1] < 1.0) & (edges[1:] > 0.0)
    direct = torch.from_numpy(np.histogram(second.double().numpy(), bins=edges.numpy())[0]).double()
    assert torch.allclose(counts[~old_region], direct[~old_region])
    assert float((counts - direct)[old_region].sum()) == pytest.approx(first.numel())
    assert int(old_region.sum()) <= 1 / width + 2
    # several growths in both directions keep the total
    for x in (torch.randn(5000, generator=g) * 30, torch.rand(5000, generator=g) * 500):
        obs.update(x)
    assert float(obs.histogram()[0].sum()) == pytest.approx(20_000, rel=1e-12)


def test_histogram_stays_tight_over_many_slightly_wider_batches():
    g = torch.Generator().manual_seed(9)
    obs = HistogramObserver()
    batches = [torch.randn(20_000, generator=g) for _ in range(30)]  # each new record max extends the range
    for x in batches:
        obs.update(x)
    counts, edges = obs.histogram()
    everything = torch.cat(batches)
    assert edges[0] == everything.min() and edges[-1] == everything.max()
    assert int((counts > 0).sum()) > 1500  # most of the 2048 bins still carry data


def test_percentile_clips_a_single_huge_outlier():
    batches = _batches(4, n=5)
    batches[2][123] = 1e4
    lo, hi = _observe(PercentileObserver(percentile=99.99), batches)
    assert hi < 10 and lo > -10
    assert hi > 1 and lo < -1  # the bulk is kept


def test_percentile_100_is_the_exact_range_and_tails_are_separate():
    x = torch.cat([torch.linspace(-1, 1, 10_001), torch.tensor([5.0])])
    lo, hi = _observe(PercentileObserver(percentile=100.0), [x])
    assert lo == -1.0 and hi == 5.0
    lo, hi = _observe(PercentileObserver(percentile=99.9), [x])
    assert -1.0 <= lo < -0.99 and hi < 1.01  # the lone high outlier goes, the low tail barely moves


@pytest.mark.parametrize("name", ["mse", "entropy"])
def test_mse_and_entropy_are_tighter_than_minmax_and_better_on_the_bulk(name):
    batches = _with_outliers()
    mm_lo, mm_hi = _observe(MinMaxObserver(), batches)
    lo, hi = _observe(make_observer(name), batches)
    assert mm_lo < lo < 0 < hi < mm_hi
    assert hi - lo < mm_hi - mm_lo
    bulk = torch.cat(batches)
    bulk = bulk[bulk.abs() < 5]
    assert _uint8_mse(lo, hi, bulk) < 0.8 * _uint8_mse(mm_lo, mm_hi, bulk)


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_range_is_near_the_best_clip_found_by_brute_force(bits):
    x = torch.cat(_batches(5, n=2))
    lo, hi = _observe(MSEObserver(bits=bits, symmetric=True), [x])
    assert lo == -hi

    def mse(a: float) -> float:
        scale, zp = affine_params(torch.tensor(-a), torch.tensor(a), bits=bits, symmetric=True, signed=True)
        return float((fake_quantize(x, scale, zp, axis=None, bits=bits, signed=True) - x).pow(2).mean())

    amax = float(x.abs().max())
    best = min(mse(amax * i / 200) for i in range(1, 201))
    assert mse(float(hi)) <= 1.01 * best
    assert mse(float(hi)) < 0.9 * mse(amax)


def test_mse_asymmetric_keeps_relu_outputs_unsigned():
    batches = [torch.relu(x) for x in _batches(6)]
    lo, hi = _observe(MSEObserver(), batches)
    everything = torch.cat(batches)
    assert lo == 0 and 0 < hi <= everything.max()
    assert _uint8_mse(lo, hi, everything) <= _uint8_mse(torch.tensor(0.0), everything.max(), everything)


def test_entropy_range_follows_the_sign_of_the_data():
    lo, hi = _observe(EntropyObserver(), [torch.relu(x) for x in _batches(7)])
    assert lo == 0 and hi > 0
    lo, hi = _observe(EntropyObserver(), _batches(7))
    assert lo == -hi and 2 < hi < 5


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("value", [3.0, -2.0, 0.0])
def test_constant_batches_give_a_finite_range_covering_the_value(name, value):
    obs = make_observer(name)
    for _ in range(3):
        obs.update(torch.full((4, 5), value))
    lo, hi = obs.range()
    assert torch.isfinite(lo) and torch.isfinite(hi)
    assert min(float(lo), 0.0) <= value <= max(float(hi), 0.0)
    scale, zp = affine_params(lo, hi, symmetric=False, signed=False)
    out = fake_quantize(torch.tensor([value]), scale, zp, axis=None, signed=False)
    assert torch.allclose(out, torch.tensor([value]), atol=float(scale))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_range_before_update_is_a_clear_error(name):
    obs = make_observer(name)
    with pytest.raises(DataError, match=r"range\(\) was called before any update\(\)"):
        obs.range()
    obs.update(torch.empty(0))  # an empty batch carries no range
    with pytest.raises(DataError, match="before any update"):
        obs.range()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_non_finite_batches_are_rejected(name):
    obs = make_observer(name)
    with pytest.raises(DataError, match="NaN or Inf"):
        obs.update(torch.tensor([1.0, float("nan")]))


def test_histogram_memory_is_bounded():
    obs = PercentileObserver(bins=512)
    g = torch.Generator().manual_seed(8)
    for i in range(20):
        obs.update(torch.randn(1000, generator=g) * (i + 1))
    counts, edges = obs.histogram()
    assert counts.shape == (512,) and edges.shape == (513,)
    assert float(counts.sum()) == pytest.approx(20_000, rel=1e-12)
