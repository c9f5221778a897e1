"""Low-rank factorization: truncated SVD of Linear layers (plain, or whitened by the layer's input
statistics as in SVD-LLM), factorized embeddings, convolutions by Tucker-2 or spatial SVD, and transposed
convolutions (a GAN generator's) by Tucker-2.

Each factorized layer is really replaced by a module of smaller ordinary layers (`LowRankLinear`,
`FactorizedEmbedding`, `Tucker2Conv2d`, `Tucker2ConvTranspose2d`, `SpatialConv2d`, `PointwiseConv2d`), so the exported graph is
smaller and runs fewer MACs in any runtime, and later steps (int8, sparsity) compress the new layers. A
layer whose factorized form is not smaller (weights), or for a convolution not cheaper (MACs), is left as
it is and named in the log.

>>> small = compress(model, [LowRankConfig(ratio=0.4, layers=("conv", "linear"))])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, RecipeError
from modelpress.loading import as_inputs
from modelpress.ops.lowrank import (
    Decomposition,
    conv_rows,
    energy_rank,
    mode_singular_values,
    output_error,
    spatial_matrix,
    spatial_svd,
    spatial_weight,
    svd,
    svd_factors,
    tucker2,
    tucker2_ranks,
    tucker2_weight,
    whitening,
)
from modelpress.techniques.distill import DistillConfig, as_recover, train
from modelpress.techniques.finetune import RECOVER_LABELS, labeled
from modelpress.techniques.quantized import QUANTIZABLE_TYPES
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

LayerKind = Literal["linear", "conv", "embedding"]
_TYPES: dict[str, tuple[type[nn.Module], ...]] = {
    "linear": (nn.Linear,),
    "conv": (nn.Conv2d,),
    "embedding": (nn.Embedding,),
}
_DEFAULT_RATIO = 0.5
_SENSITIVITY_STEPS = 16  # candidate ranks per layer: those keeping 1/16 ... 15/16 of its weights


@dataclass(frozen=True)
class LowRankConfig:
    """Replace the selected layers by low-rank factorizations.

    The rank of each layer comes from one of: `ratio` (the share of the layer's weights kept, 0.5 when
    nothing is set), `energy` (the share of squared singular values kept, e.g. 0.9) or `rank` (fixed). With
    `method: sensitivity`, `ratio` is a budget for all selected layers together and each layer's rank is
    chosen by the output error it adds on calibration data (robust layers give more). `whiten: true` takes
    the SVD of W L, L the Cholesky factor of the layer's input Gram X^T X on calibration data (SVD-LLM), so
    truncation minimises output, not weight, error (Linear and 1x1 convolutions). Convolutions (k x k) use
    `conv`: tucker2 (1x1 reduce, k x k core, 1x1 expand) or spatial (k x 1 then 1 x k); 1x1 convolutions
    become two 1x1 convolutions; transposed convolutions (k x k) use Tucker-2 with a transposed core. Grouped
    and depthwise convolutions are left as they are.
    `recover`: training after factorization, a DistillConfig (YAML `recover: {loss: kl, steps: 200, lr:
    1e-4}`; `loss: task` for cross-entropy on (inputs, labels) items); null skips it.

    >>> LowRankConfig(energy=0.9).energy
    0.9
    """

    type: ClassVar[str] = "lowrank"
    ratio: float | None = None
    energy: float | None = None
    rank: int | None = None
    method: Literal["layer", "sensitivity"] = "layer"
    whiten: bool = False
    conv: Literal["tucker2", "spatial"] = "tucker2"
    calibration_batches: int = 32
    recover: DistillConfig | None = None
    layers: tuple[LayerKind, ...] = ("linear", "conv")
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        chosen = [f for f in ("ratio", "energy", "rank") if getattr(self, f) is not None]
        if len(chosen) > 1:
            raise RecipeError(f"lowrank: set one of ratio, energy or rank, not {' and '.join(chosen)}.")
        if self.ratio is not None and not (_number(self.ratio) and 0 < self.ratio < 1):
            raise RecipeError(
                f"lowrank: ratio={self.ratio!r} must be in (0, 1): the share of each layer's weights kept "
                "(with method: sensitivity, of all selected layers' weights)."
            )
        if self.energy is not None and not (_number(self.energy) and 0 < self.energy <= 1):
            raise RecipeError(
                f"lowrank: energy={self.energy!r} must be in (0, 1]: the share of the squared singular values "
                "kept; 0.9 is a start."
            )
        if self.rank is not None and not (
            isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1
        ):
            raise RecipeError(f"lowrank: rank={self.rank!r} must be a whole number, at least 1.")
        if self.method not in ("layer", "sensitivity"):
            raise RecipeError(f"lowrank: method={self.method!r} is unknown; choose 'layer' or 'sensitivity'.")
        if self.method == "sensitivity" and chosen and chosen != ["ratio"]:
            raise RecipeError(
                "lowrank: method: sensitivity spreads a weight budget over the layers; set ratio (the share "
                f"of the selected layers' weights kept), not {chosen[0]}."
            )
        if self.conv not in ("tucker2", "spatial"):
            raise RecipeError(f"lowrank: conv={self.conv!r} is unknown; choose 'tucker2' or 'spatial'.")
        if not isinstance(self.whiten, bool):
            raise RecipeError(f"lowrank: whiten={self.whiten!r} must be true or false.")
        if not isinstance(self.calibration_batches, int) or self.calibration_batches < 1:
            raise RecipeError(
                f"lowrank: calibration_batches={self.calibration_batches!r} must be a whole number, at least 1."
            )
        object.__setattr__(self, "recover", as_recover("lowrank", self.recover))
        bad = [k for k in self.layers if k not in _TYPES]
        if bad or not self.layers:
            raise RecipeError(
                f"lowrank: layers={list(self.layers)} is invalid; choose from ['conv', 'embedding', 'linear']."
            )

    @property
    def needs_data(self) -> bool:
        """Whether factorizing (not only recovery) reads calibration data."""
        return self.whiten or self.method == "sensitivity"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------------------
# The factorized modules: ordinary layers in sequence, so export and the runtimes see nothing new.
# ------------------------------------------------------------------------------------------------


class _Factorized(nn.Sequential):
    """Layers in sequence that stand for one layer. `weight` and `bias` give the dense layer's (computed,
    not stored), for code that reads them (transformers' ViT reads the patch embedding's weight dtype)."""

    _modelpress_atomic = True  # profiled and reported as the one layer it replaces ("now Tucker2Conv2d")

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.dense_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(list(self.children())[-1], "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None


def _weight_of(module: Any) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight


class LowRankLinear(_Factorized):
    """A Linear (out, in) as `second(first(x))`: in -> rank (no bias) -> out (the original bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool, **factory: Any) -> None:
        super().__init__(
            OrderedDict(
                first=nn.Linear(in_features, rank, bias=False, **factory),
                second=nn.Linear(rank, out_features, bias=bias, **factory),
            )
        )
        self.in_features, self.out_features, self.rank = in_features, out_features, rank

    def dense_weight(self) -> torch.Tensor:
        return _weight_of(self.second) @ _weight_of(self.first)  # (out, r) @ (r, in)


class FactorizedEmbedding(_Factorized):
    """An Embedding (vocab, dim) as a (vocab, rank) table followed by a rank -> dim Linear (no bias)."""

    def __init__(self, embedding: nn.Embedding, rank: int, **factory: Any) -> None:
        super().__init__(
            OrderedDict(
                table=nn.Embedding(
                    embedding.num_embeddings,
                    rank,
                    padding_idx=embedding.padding_idx,
                    scale_grad_by_freq=embedding.scale_grad_by_freq,
                    sparse=embedding.sparse,
                    **factory,
                ),
                project=nn.Linear(rank, embedding.embedding_dim, bias=False, **factory),
            )
        )
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.rank = embedding.padding_idx, rank

    def dense_weight(self) -> torch.Tensor:
        return _weight_of(self.table) @ _weight_of(self.project).T  # (vocab, r) @ (r, dim)

    @property
    def bias(self) -> None:
        return None


def _conv(conv: nn.Conv2d, in_ch: int, out_ch: int, kernel: tuple[int, int], **kwargs: Any) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch,
        out_ch,
        kernel,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
        **kwargs,
    )


class Tucker2Conv2d(_Factorized):
    """A k x k Conv2d as 1x1 (in -> r_in) -> k x k core (r_in -> r_out, the original stride, padding and
    dilation) -> 1x1 (r_out -> out, the original bias)."""

    def __init__(self, conv: nn.Conv2d, rank_in: int, rank_out: int) -> None:
        kernel = (conv.kernel_size[0], conv.kernel_size[1])
        super().__init__(
            OrderedDict(
                reduce=_conv(conv, conv.in_channels, rank_in, (1, 1), bias=False),
                core=_conv(
                    conv,
                    rank_in,
                    rank_out,
                    kernel,
                    stride=conv.stride,
                    padding=conv.padding,
                    dilation=conv.dilation,
                    bias=False,
                ),
                expand=_conv(conv, rank_out, conv.out_channels, (1, 1), bias=conv.bias is not None),
            )
        )
        self.in_channels, self.out_channels, self.ranks = (
            conv.in_channels,
            conv.out_channels,
            (rank_in, rank_out),
        )

    def dense_weight(self) -> torch.Tensor:
        reduce, expand = _weight_of(self.reduce), _weight_of(self.expand)
        return tucker2_weight(reduce[:, :, 0, 0], _weight_of(self.core), expand[:, :, 0, 0])


class Tucker2ConvTranspose2d(_Factorized):
    """A k x k ConvTranspose2d as 1x1 (in -> r_in) -> k x k transposed core (r_in -> r_out, the original
    stride, padding, output padding and dilation) -> 1x1 (r_out -> out, the original bias): channel mixing
    commutes with the transposed convolution's spatial scatter, so the factors are the Tucker-2 factors of the
    weight read as a convolution's (out, in, kh, kw)."""

    def __init__(self, conv: nn.ConvTranspose2d, rank_in: int, rank_out: int) -> None:
        factory: dict[str, Any] = {"device": conv.weight.device, "dtype": conv.weight.dtype}
        super().__init__(
            OrderedDict(
                reduce=nn.Conv2d(conv.in_channels, rank_in, 1, bias=False, **factory),
                core=nn.ConvTranspose2d(
                    rank_in,
                    rank_out,
                    (conv.kernel_size[0], conv.kernel_size[1]),
                    stride=conv.stride,  # type: ignore[arg-type]
                    padding=conv.padding,  # type: ignore[arg-type]
                    output_padding=conv.output_padding,  # type: ignore[arg-type]
                    dilation=conv.dilation,  # type: ignore[arg-type]
                    bias=False,
                    **factory,
                ),
                expand=nn.Conv2d(rank_out, conv.out_channels, 1, bias=conv.bias is not None, **factory),
            )
        )
        self.in_channels, self.out_channels, self.ranks = (
            conv.in_channels,
            conv.out_channels,
            (rank_in, rank_out),
        )

    def dense_weight(self) -> torch.Tensor:
        """The ConvTranspose2d weight (in, out, kh, kw)."""
        reduce, expand = _weight_of(self.reduce), _weight_of(self.expand)
        core = _weight_of(self.core).transpose(0, 1)  # as a convolution's (r_out, r_in, kh, kw)
        return tucker2_weight(reduce[:, :, 0, 0], core, expand[:, :, 0, 0]).transpose(0, 1)


class SpatialConv2d(_Factorized):
    """A kh x kw Conv2d as a kh x 1 conv to `rank` channels then a 1 x kw conv (Jaderberg et al. 2014), the
    stride, padding and dilation split by direction."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        vertical: Any = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], 0)
        horizontal: Any = conv.padding if isinstance(conv.padding, str) else (0, conv.padding[1])
        super().__init__(
            OrderedDict(
                vertical=_conv(
                    conv,
                    conv.in_channels,
                    rank,
                    (kh, 1),
                    stride=(sh, 1),
                    padding=vertical,
                    dilation=(dh, 1),
                    bias=False,
                ),
                horizontal=_conv(
                    conv,
                    rank,
                    conv.out_channels,
                    (1, kw),
                    stride=(1, sw),
                    padding=horizontal,
                    dilation=(1, dw),
                    bias=conv.bias is not None,
                ),
            )
        )
        self.in_channels, self.out_channels, self.rank = conv.in_channels, conv.out_channels, rank

    def dense_weight(self) -> torch.Tensor:
        return spatial_weight(_weight_of(self.vertical), _weight_of(self.horizontal))


class PointwiseConv2d(_Factorized):
    """A 1x1 Conv2d (a Linear over channels) as two 1x1 convs: in -> rank (the original stride and
    padding) -> out (the original bias)."""

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__(
            OrderedDict(
                first=_conv(
                    conv, conv.in_channels, rank, (1, 1), stride=conv.stride, padding=conv.padding, bias=False
                ),
                second=_conv(conv, rank, conv.out_channels, (1, 1), bias=conv.bias is not None),
            )
        )
        self.in_channels, self.out_channels, self.rank = conv.in_channels, conv.out_channels, rank

    def dense_weight(self) -> torch.Tensor:
        first, second = _weight_of(self.first), _weight_of(self.second)
        return (second.flatten(1) @ first.flatten(1))[:, :, None, None]


FACTORIZED_TYPES = (
    LowRankLinear,
    FactorizedEmbedding,
    Tucker2Conv2d,
    Tucker2ConvTranspose2d,
    SpatialConv2d,
    PointwiseConv2d,
)

# ------------------------------------------------------------------------------------------------
# One layer: its form, ranks, cost, factors
# ------------------------------------------------------------------------------------------------

Form = Literal["linear", "embedding", "pointwise", "tucker2", "spatial"]


@dataclass
class _Layer:
    """A selected layer: how it factorizes and what is known about its inputs."""

    name: str
    module: nn.Module
    form: Form
    gram: torch.Tensor | None = None  # input Gram (in, in) / token counts (vocab,), from calibration data
    _chol: torch.Tensor | None = None
    _svd: Decomposition | None = None

    @property
    def transposed(self) -> bool:
        return isinstance(self.module, nn.ConvTranspose2d)

    @property
    def weight(self) -> torch.Tensor:
        """The weight; a transposed convolution's (in, out, kh, kw) read as a convolution's (out, in, kh, kw)."""
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight.detach().transpose(0, 1) if self.transposed else weight.detach()

    @property
    def matrix(self) -> torch.Tensor:
        """The weight as the matrix that is truncated (out, in), for the matrix forms."""
        w = self.weight
        if self.form == "embedding":
            return w  # (vocab, dim): the table is U S, the projection V^T
        return w.reshape(w.shape[0], -1)

    def chol(self, whiten: bool) -> torch.Tensor | None:
        if not whiten or self.form not in ("linear", "pointwise") or self.gram is None:
            return None
        if self._chol is None:
            try:
                self._chol = whitening(self.gram)
            except ValueError as exc:
                raise DataError(
                    f"lowrank: layer '{self.name}': {exc}; check the calibration data (NaN/Inf or constant "
                    "inputs), or set whiten: false."
                ) from exc
        return self._chol

    def decomposition(self, whiten: bool) -> Decomposition:
        if self._svd is None:
            self._svd = svd(self.matrix, self.chol(whiten))
        return self._svd

    def max_rank(self) -> int:
        w = self.weight
        if self.form == "tucker2":
            return max(w.shape[0], w.shape[1])
        if self.form == "spatial":
            return min(w.shape[1] * w.shape[2], w.shape[0] * w.shape[3])
        return min(self.matrix.shape)

    def describe(self) -> str:
        m = self.module
        if isinstance(m, nn.Linear):
            return f"Linear {m.in_features} -> {m.out_features}"
        if isinstance(m, nn.Embedding):
            return f"Embedding {m.num_embeddings} x {m.embedding_dim}"
        assert isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))
        return (
            f"{type(m).__name__} {m.in_channels} -> {m.out_channels}, {m.kernel_size[0]}x{m.kernel_size[1]}"
        )

    @property
    def stride(self) -> tuple[int, int]:
        stride = getattr(self.module, "stride", (1, 1))
        return int(stride[0]), int(stride[1])

    def fit(self, ranks: tuple[int, ...]) -> tuple[int, ...]:
        """Tucker-2 ranks within what the other mode leaves (r_out <= r_in * kh * kw and back)."""
        if self.form != "tucker2":
            return ranks
        taps = self.weight.shape[2] * self.weight.shape[3]
        r_in, r_out = ranks
        return (min(r_in, r_out * taps), min(r_out, r_in * taps))

    def ranks_for_ratio(self, ratio: float) -> tuple[int, ...]:
        w = self.weight
        if self.form == "tucker2":
            return self.fit(tucker2_ranks(w.shape[1], w.shape[0], w.shape[2] * w.shape[3], ratio))
        if self.form == "spatial":
            rows, cols = w.shape[1] * w.shape[2], w.shape[0] * w.shape[3]
        else:
            rows, cols = self.matrix.shape
        return (min(self.max_rank(), max(1, math.floor(ratio * rows * cols / (rows + cols)))),)

    def ranks(self, config: LowRankConfig) -> tuple[int, ...]:
        """The ranks `config` gives this layer (method: layer)."""
        w = self.weight
        if config.rank is not None:
            if config.rank > self.max_rank():
                raise RecipeError(
                    f"lowrank: layer '{self.name}' ({self.describe()}) has rank at most {self.max_rank()}; "
                    f"rank={config.rank} is larger. Lower rank, use ratio or energy, or add '{self.name}' to "
                    "ignore."
                )
            if self.form == "tucker2":
                return self.fit((min(config.rank, w.shape[1]), min(config.rank, w.shape[0])))
            return (config.rank,)
        if config.energy is not None:
            if self.form == "tucker2":
                values_out, values_in = mode_singular_values(w)
                return self.fit(
                    (energy_rank(values_in, config.energy), energy_rank(values_out, config.energy))
                )
            if self.form == "spatial":
                return (energy_rank(torch.linalg.svdvals(spatial_matrix(w).double()), config.energy),)
            return (energy_rank(self.decomposition(config.whiten)[1], config.energy),)
        return self.ranks_for_ratio(_DEFAULT_RATIO if config.ratio is None else config.ratio)

    def cost(self, ranks: tuple[int, ...]) -> tuple[int, int, int, int]:
        """(weights, MACs per output position) of the factorized form, then of the original."""
        w = self.weight
        if self.form == "tucker2":
            out_ch, in_ch, kh, kw = w.shape
            r_in, r_out = ranks
            sh, sw = self.stride
            params = in_ch * r_in + r_out * r_in * kh * kw + r_out * out_ch
            if self.transposed:  # per input position: the 1x1 expand runs at the output's, stride^2 of them
                macs = in_ch * r_in + r_out * r_in * kh * kw + r_out * out_ch * sh * sw
                return params, macs, w.numel(), w.numel()
            # the 1x1 reduce runs at the input's resolution: stride^2 positions per output position
            macs = in_ch * r_in * sh * sw + r_out * r_in * kh * kw + r_out * out_ch
            return params, macs, w.numel(), w.numel()
        (rank,) = ranks
        if self.form == "spatial":
            out_ch, in_ch, kh, kw = w.shape
            params = rank * (in_ch * kh + out_ch * kw)
            macs = rank * in_ch * kh * self.stride[1] + rank * out_ch * kw
            return params, macs, w.numel(), w.numel()
        rows, cols = self.matrix.shape
        params = rank * (rows + cols)
        if self.form == "embedding":  # a lookup costs no MACs; the projection adds rank * dim per token
            return params, rank * cols, w.numel(), 0
        return params, params, w.numel(), w.numel()

    def worth_it(self, ranks: tuple[int, ...]) -> str | None:
        """Why the factorized form at `ranks` is not worth having (None when it is)."""
        params, macs, params0, macs0 = self.cost(ranks)
        shown = "x".join(str(r) for r in ranks)
        if params >= params0:
            return f"at rank {shown} its factorized form holds {params} weights, not fewer than its {params0}"
        if self.form in ("tucker2", "spatial", "pointwise") and macs >= macs0:
            return f"at rank {shown} its factorized form costs {macs} MACs per output, not fewer than {macs0}"
        return None

    def factors(self, ranks: tuple[int, ...], whiten: bool) -> list[torch.Tensor]:
        """The new layers' weights, in module order."""
        w = self.weight
        if self.form == "tucker2":
            reduce, core, expand = tucker2(w, ranks[0], ranks[1])
            core = core.transpose(0, 1) if self.transposed else core  # ConvTranspose2d: (r_in, r_out, kh, kw)
            return [reduce[:, :, None, None], core, expand[:, :, None, None]]
        if self.form == "spatial":
            return list(spatial_svd(w, ranks[0]))
        chol = self.chol(whiten)
        first, second = svd_factors(self.matrix, ranks[0], chol, decomposition=self.decomposition(whiten))
        first, second = first.to(w.dtype), second.to(w.dtype)
        if self.form == "embedding":  # table (vocab, r) = U S^1/2, projection weight (dim, r) = (S^1/2 V^T)^T
            return [second, first.T]
        if self.form == "pointwise":
            return [first[:, :, None, None], second[:, :, None, None]]
        return [first, second]

    def dense(self, factors: list[torch.Tensor]) -> torch.Tensor:
        """The (out, in) matrix the factors stand for, in the layout of `matrix` flattened like the Gram."""
        if self.form == "tucker2":
            core = factors[1].transpose(0, 1) if self.transposed else factors[1]
            return tucker2_weight(factors[0][:, :, 0, 0], core, factors[2][:, :, 0, 0]).flatten(1)
        if self.form == "spatial":
            return spatial_weight(factors[0], factors[1]).flatten(1)
        if self.form == "embedding":
            return factors[0] @ factors[1].T
        return factors[1].flatten(1) @ factors[0].flatten(1)

    def error(self, ranks: tuple[int, ...], whiten: bool) -> float:
        """Relative output error of the factorized layer on the calibration inputs."""
        assert self.gram is not None
        reference = self.weight.flatten(1)
        approx = self.dense(self.factors(ranks, whiten))
        if self.form == "embedding":  # a lookup is one-hot (vocab) @ table: the matrix read is (dim, vocab)
            reference, approx = reference.T, approx.T
        return output_error(approx - reference, reference, self.gram)

    def build(self, ranks: tuple[int, ...], whiten: bool) -> nn.Module:
        m = self.module
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        new: nn.Module
        if isinstance(m, nn.Linear):
            new = LowRankLinear(m.in_features, m.out_features, ranks[0], bias=m.bias is not None, **factory)
        elif isinstance(m, nn.Embedding):
            new = FactorizedEmbedding(m, ranks[0], **factory)
        elif isinstance(m, nn.ConvTranspose2d):
            new = Tucker2ConvTranspose2d(m, *ranks)
        elif self.form == "tucker2":
            new = Tucker2Conv2d(m, *ranks)  # type: ignore[arg-type]
        elif self.form == "spatial":
            new = SpatialConv2d(m, ranks[0])  # type: ignore[arg-type]
        else:
            new = PointwiseConv2d(m, ranks[0])  # type: ignore[arg-type]
        weights = [p for n, p in new.named_parameters() if n.endswith("weight")]
        with torch.no_grad():
            for param, value in zip(weights, self.factors(ranks, whiten), strict=True):
                param.copy_(value.reshape(param.shape))
            bias, last = getattr(m, "bias", None), getattr(list(new.children())[-1], "bias", None)
            if isinstance(bias, torch.Tensor) and isinstance(last, torch.Tensor):
                last.copy_(bias.detach())
        return new.train(m.training)


def _form(module: nn.Module, config: LowRankConfig) -> Form | str:
    """How `module` factorizes under `config`, or why it is not factorized."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding" if module.max_norm is None else "its max_norm renormalises rows of the full table"
    if isinstance(module, nn.ConvTranspose2d):
        return _transposed_form(module, config)
    if not isinstance(module, nn.Conv2d):
        return (
            f"{type(module).__name__} is not factorized (lowrank factorizes Linear, Conv2d, ConvTranspose2d "
            "and Embedding)"
        )
    if module.groups != 1:
        return f"grouped convolution (groups={module.groups}, depthwise or not) is left as it is"
    if tuple(module.kernel_size) == (1, 1):
        return "pointwise"
    if config.conv == "spatial" and 1 in module.kernel_size:
        return f"spatial SVD needs a kernel of 2 or more in both directions, not {tuple(module.kernel_size)}"
    return config.conv


def _transposed_form(module: nn.ConvTranspose2d, config: LowRankConfig) -> Form | str:
    """A transposed convolution factorizes by Tucker-2 only, with ranks chosen from its weight."""
    if module.groups != 1:
        return f"grouped transposed convolution (groups={module.groups}) is left as it is"
    if tuple(module.kernel_size) == (1, 1):
        return (
            "a 1x1 transposed convolution is left as it is (factorize it as the Linear over channels it is)"
        )
    if config.conv == "spatial":
        return "spatial SVD is for Conv2d; transposed convolutions factorize with conv: tucker2"
    if config.method == "sensitivity":
        return "method: sensitivity weighs Conv2d and Linear inputs only; use method: layer for transposed convolutions"
    return "tucker2"


def skip_reason(module: nn.Module, config: LowRankConfig) -> str | None:
    """Why `config` leaves `module` as it is, where that follows from the layer and the config alone (the
    coverage report's reason), else None (for example ranks chosen on data: the log says)."""
    form = _form(module, config)
    if form not in ("linear", "embedding", "pointwise", "tucker2", "spatial"):
        return form
    if config.energy is not None or config.method == "sensitivity":
        return None
    layer = _Layer("", module, form)  # type: ignore[arg-type]
    if config.rank is not None and config.rank > layer.max_rank():
        return None
    return layer.worth_it(layer.ranks(config))


def factorize(
    module: nn.Module, ranks: tuple[int, ...], *, conv: Literal["tucker2", "spatial"] = "tucker2"
) -> nn.Module:
    """The factorized replacement of one layer at `ranks` ((r_in, r_out) for a Tucker-2 convolution, else
    (r,)), whether or not it is smaller; plain SVD (no data).

    >>> factorize(nn.Linear(8, 6), (2,))  # doctest: +ELLIPSIS
    LowRankLinear(...)
    """
    form = _form(module, LowRankConfig(conv=conv))
    if form not in ("linear", "embedding", "pointwise", "tucker2", "spatial"):
        raise RecipeError(f"lowrank: cannot factorize this layer: {form}.")
    layer = _Layer(type(module).__name__, module, form)  # type: ignore[arg-type]
    w = layer.weight
    bounds = (w.shape[1], w.shape[0]) if form == "tucker2" else (layer.max_rank(),)
    if len(ranks) != len(bounds) or not all(1 <= r <= b for r, b in zip(ranks, bounds, strict=True)):
        raise RecipeError(
            f"lowrank: ranks {tuple(ranks)} do not fit {layer.describe()} ({form}): give "
            f"{len(bounds)} rank(s), each from 1 to {', '.join(map(str, bounds))}."
        )
    return layer.build(tuple(ranks), whiten=False)


# ------------------------------------------------------------------------------------------------
# The technique
# ------------------------------------------------------------------------------------------------


def _shared_weights(model: nn.Module) -> dict[int, list[str]]:
    """Modules holding each >= 2-D parameter (more than one: tied, e.g. an LM head and its embedding)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if param.dim() >= 2:
                owners.setdefault(id(param), []).append(name)
    return owners


def _select(model: nn.Module, config: LowRankConfig) -> tuple[list[_Layer], dict[str, str]]:
    """The layers to factorize, and the selected layers left alone with the reason."""
    for field, patterns in (("targets", config.targets), ("ignore", config.ignore)):
        missing = unmatched_patterns(model, patterns)
        if missing:
            raise RecipeError(
                f"lowrank: {field} {missing} match no module of the model; check the names (`modelpress "
                "profile` lists the layers), or use a type name such as 'Linear' or a 're:' regex."
            )
    wide = tuple(t for kind in config.layers for t in QUANTIZABLE_TYPES[kind])
    owners = _shared_weights(model)
    layers: list[_Layer] = []
    skipped: dict[str, str] = {}
    for name, module in select_modules(model, types=wide, targets=config.targets, ignore=config.ignore):
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            skipped[name] = (
                f"its weight is a {type(weight).__name__}, not a float parameter (already compressed)"
            )
            continue
        form = _form(module, config)
        shared = [n for n in owners.get(id(weight), []) if n != name]
        if shared:
            form = f"its weight is shared with {shared} (tied); factorizing would untie and grow the model"
        if form not in ("linear", "embedding", "pointwise", "tucker2", "spatial"):
            skipped[name] = form
            continue
        if not torch.isfinite(weight).all():
            raise RecipeError(
                f"lowrank: layer '{name}' has NaN or Inf in its weight; fix the checkpoint, or add it to ignore."
            )
        layers.append(_Layer(name, module, form))  # type: ignore[arg-type]
    return layers, skipped


def _collect(model: nn.Module, layers: list[_Layer], data: Dataset, batches: int) -> None:
    """Each layer's input Gram matrix (or token counts) over the first `batches` items of `data`."""

    def observe(layer: _Layer, module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        x = args[0].detach()
        if isinstance(module, nn.Embedding):
            counts = torch.bincount(x.reshape(-1).long().cpu(), minlength=module.num_embeddings)
            layer.gram = counts.double() if layer.gram is None else layer.gram + counts
            return
        if not torch.isfinite(x).all():
            raise DataError(
                f"lowrank: the input of layer '{layer.name}' holds NaN or Inf during calibration; check the data "
                "and the model, or add the layer to ignore."
            )
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                pad = module._reversed_padding_repeated_twice
                mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
                x, padding = F.pad(x, pad, mode=mode), (0, 0)
            else:
                padding = (module.padding[0], module.padding[1])
            rows = conv_rows(
                x,
                (module.kernel_size[0], module.kernel_size[1]),
                stride=(module.stride[0], module.stride[1]),
                padding=padding,
                dilation=(module.dilation[0], module.dilation[1]),
            )
        else:
            rows = x.reshape(-1, x.shape[-1])
        rows = rows.double().cpu()
        gram = rows.T @ rows
        layer.gram = gram if layer.gram is None else layer.gram.add_(gram)

    handles = [
        layer.module.register_forward_hook(lambda m, a, o, layer=layer: observe(layer, m, a, o))
        for layer in layers
    ]
    training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for index, item in enumerate(data.take(batches)):
                model(*as_inputs(item, where=f"calibration item {index}"))
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    if seen == 0:
        raise DataError("lowrank: the calibration data is empty; pass at least one batch of typical inputs.")
    unused = [layer.name for layer in layers if layer.gram is None]
    if unused:
        raise DataError(
            f"lowrank: layers {unused[:5]} never ran on the calibration data, so their inputs are unknown; "
            "pass data that reaches them, or add them to ignore."
        )


def _allocate(layers: list[_Layer], config: LowRankConfig) -> dict[str, tuple[int, ...]]:
    """method: sensitivity. For each layer, candidate ranks keeping 1/16 ... 15/16 of its weights, each with
    the relative output error it adds on the calibration data; then the ranks minimising the summed error
    with the factorized layers' weights (the layers kept whole counting in full) within `ratio` of the
    selected layers' weights: a Lagrange multiplier on the weights, found by bisection."""
    assert config.ratio is not None
    options: dict[str, list[tuple[int, float, tuple[int, ...]]]] = {}  # name -> [(weights, error, ranks)]
    for layer in layers:
        params0 = layer.weight.numel()
        found: dict[tuple[int, ...], tuple[int, float, tuple[int, ...]]] = {}
        for step in range(1, _SENSITIVITY_STEPS):
            ranks = layer.ranks_for_ratio(step / _SENSITIVITY_STEPS)
            if ranks not in found and layer.worth_it(ranks) is None:
                found[ranks] = (layer.cost(ranks)[0], layer.error(ranks, config.whiten), ranks)
        options[layer.name] = [(params0, 0.0, ()), *found.values()]
    total = sum(layer.weight.numel() for layer in layers)
    budget = config.ratio * total

    def pick(lam: float) -> dict[str, tuple[int, float, tuple[int, ...]]]:
        return {
            name: min(choices, key=lambda c: c[1] + lam * c[0] / total) for name, choices in options.items()
        }

    def weights(choice: dict[str, tuple[int, float, tuple[int, ...]]]) -> int:
        return sum(c[0] for c in choice.values())

    lo, hi = -12.0, 12.0  # log10 of the multiplier: more weight on the weights, smaller layers
    if weights(pick(10**hi)) > budget:
        log.warning(
            "lowrank: even the smallest ranks keep more than ratio=%g of the selected layers' weights; "
            "using them.",
            config.ratio,
        )
    for _ in range(60):
        mid = (lo + hi) / 2
        if weights(pick(10**mid)) > budget:
            lo = mid
        else:
            hi = mid
    chosen = pick(10**hi)
    log.info(
        "lowrank: ranks by sensitivity (%.1f%% of %d weights kept): %s",
        100.0 * weights(chosen) / total,
        total,
        ", ".join(
            f"{name} {'x'.join(map(str, c[2])) or 'kept'} (error {c[1]:.2g})" for name, c in chosen.items()
        ),
    )
    return {name: c[2] for name, c in chosen.items()}


def _plan(layers: list[_Layer], config: LowRankConfig, skipped: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Each layer's ranks; layers not worth factorizing go to `skipped` with the reason."""
    if config.method == "sensitivity":
        allocated = _allocate(layers, config)
        for layer in layers:
            if not allocated[layer.name]:
                skipped[layer.name] = (
                    "method sensitivity kept it whole (its output error per weight saved was the highest)"
                )
        return {name: r for name, r in allocated.items() if r}
    plan: dict[str, tuple[int, ...]] = {}
    for layer in layers:
        ranks = layer.ranks(config)
        why = layer.worth_it(ranks)
        if why is None:
            plan[layer.name] = ranks
        else:
            skipped[layer.name] = why
    return plan


def _training_data(data: Any, config: LowRankConfig) -> tuple[Dataset | None, Dataset | None]:
    """(calibration inputs, the data recovery trains on)."""
    training = as_dataset(data)
    if training is None:
        if config.needs_data:
            needs = "whiten: true" if config.whiten else "method: sensitivity"
            raise DataError(
                f"lowrank: {needs} needs calibration data: pass `data=` to compress (a few dozen batches of "
                "typical inputs), or --data file.py:fn on the command line; or use method: layer with whiten: false."
            )
        if config.recover is not None:
            raise DataError(
                "lowrank: recover trains on data: pass `data=` to compress, or --data file.py:fn on the "
                "command line; or set recover: null."
            )
        return None, None
    if config.recover is not None and config.recover.labeled:  # (inputs, labels): calibration reads inputs
        return Dataset(
            training, lambda item: labeled(item, "a data item", owner="lowrank", **RECOVER_LABELS)[0]
        ), training
    return training, training


def _summary(names: Iterable[str], skipped: dict[str, str]) -> str:
    return "; ".join(f"'{name}': {skipped[name]}" for name in names)


def lowrank(model: nn.Module, config: LowRankConfig, data: Dataset | Any = None) -> nn.Module:
    """Replace the selected layers of `model` (in place) by low-rank factorizations; with `recover`, then
    fine-tune the whole model on `data`.

    >>> small = lowrank(model, LowRankConfig(energy=0.9, whiten=True), Dataset(batches))  # doctest: +SKIP
    """
    layers, skipped = _select(model, config)
    calibration, training = _training_data(data, config)
    if not layers:
        log.warning(
            "lowrank: no layer to factorize (layers=%s)%s; the model is unchanged.",
            list(config.layers),
            f": {_summary(skipped, skipped)}" if skipped else "",
        )
        return model
    if config.needs_data:
        assert calibration is not None
        needing = (
            layers
            if config.method == "sensitivity"
            else [x for x in layers if x.form in ("linear", "pointwise")]
        )
        _collect(model, needing, calibration, config.calibration_batches)
    recovery = config.recover
    needs_teacher = recovery is not None and recovery.needs_teacher
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if needs_teacher else None
    plan = _plan(layers, config, skipped)
    before = after = 0
    for layer in layers:
        if layer.name not in plan:
            continue
        new = layer.build(plan[layer.name], config.whiten)
        before += layer.weight.numel()
        after += sum(p.numel() for n, p in new.named_parameters() if n.endswith("weight"))
        set_submodule(model, layer.name, new)
    if skipped:
        log.warning("lowrank: left as they are: %s.", _summary(skipped, skipped))
    if not plan:
        return model
    log.info(
        "lowrank: %d layers factorized (%s), their weights %d -> %d (%.2fx)",
        len(plan),
        ", ".join(f"{name} rank {'x'.join(map(str, r))}" for name, r in plan.items()),
        before,
        after,
        after / max(before, 1),
    )
    if recovery is not None:
        assert training is not None
        train(model, teacher, training, recovery, owner="lowrank", tag="lowrank-recover")
    return model


__all__ = [
    "FACTORIZED_TYPES",
    "FactorizedEmbedding",
    "LowRankConfig",
    "LowRankLinear",
    "PointwiseConv2d",
    "SpatialConv2d",
    "Tucker2Conv2d",
    "Tucker2ConvTranspose2d",
    "factorize",
    "lowrank",
    "skip_reason",
]
