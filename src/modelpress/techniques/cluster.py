"""Weight sharing: each selected layer's weights are clustered (k-means) into 2 to 256 shared values, per
layer or per group of output rows, and stored as a codebook plus packed indices (4 bits each for 16
values). No calibration data is needed; with `recover`, the shared values (centroids) are then trained on
data with every weight's index fixed.

The artifact stores the codebook (fp32, or int8 with one scale per codebook: `codebook_bits: 8`) and
uint8 bytes of packed indices; the graph decodes them (unpack, gather), a constant subgraph that ONNX
Runtime and OpenVINO fold once at load, so the file is small and the runtime computes with the dense
weight at fp32 speed. A layer stored sparse by an earlier `sparsity` step keeps its bitmask: only its kept
values are clustered, a pruned weight stays exactly 0.

A `static_int8` step after `cluster` quantizes each clustered Linear/Conv as the layer it wraps, its
weight decoded (`clustered_int8`): int8 per-channel codes, which take at most `values` distinct values a
row, stored as an int8 codebook per row plus the same packed indices. ONNX keeps that form (the gather
is folded at load, before the integer kernel); LiteRT and ExecuTorch store the dense int8 codes
(`decode_clustered_int8`), as for any static int8 layer.

>>> small = compress(model, [ClusterConfig(values=16)])  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from modelpress.data import Dataset, as_dataset
from modelpress.errors import DataError, RecipeError
from modelpress.ops.cluster import (
    OPTIMAL_MAX_N,
    assign,
    codes_on_grid,
    index_bits,
    kmeans,
    pack_indices,
    quantize_codebook,
    unpack_bits,
    unpack_indices,
)
from modelpress.ops.quant import qrange, symmetric_scale
from modelpress.ops.sparse import pack_mask, scatter_kept
from modelpress.techniques.blockwise import bf16_supported
from modelpress.techniques.distill import DistillConfig, as_recover, train
from modelpress.techniques.quantized import (
    QUANTIZABLE_TYPES,
    QuantizedLayer,
    SparseLayer,
    WeightView,
    call_with_weight,
    output_axis,
)
from modelpress.techniques.select import select_modules, set_submodule, unmatched_patterns

log = logging.getLogger(__name__)

# Below this many weights a layer's decoding graph (~1.5 KB in ONNX) outweighs what clustering saves
# (fp32: 4 bytes a weight): such layers are left alone unless named in `targets`.
MIN_CLUSTER_ELEMENTS = 1024

ClusterKind = Literal["linear", "conv", "embedding"]
_KINDS = ("linear", "conv", "embedding")


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster each selected layer's weights into `values` shared values (k-means, quantile seeds).

    `per: layer`: one codebook per layer; `per: rows`: one per `group_size` output rows (channels).
    `codebook_bits: 8` stores each codebook as int8 with one fp32 scale (the shared values are then on an
    int8 grid). `recover` (a DistillConfig, or None) trains the shared values on data, every weight's cluster
    fixed, as sparsity's recovery does.

    >>> ClusterConfig(values=16, per="rows", group_size=4).index_bits
    4
    """

    type: ClassVar[str] = "cluster"
    values: int = 16
    per: Literal["layer", "rows"] = "layer"
    group_size: int = 1  # per: rows: output rows (channels) sharing one codebook
    # per: rows: weights of a row per codebook (0: the whole row). 16 values per 192 weights with an int8
    # codebook store 4.83 bits a weight; a long row (576-4096 weights) is a coarse group for 16 values.
    columns: int = 0
    # Weights per codebook kept apart exactly (fp16, with their position): the ones furthest from the
    # group's median, so the 16 shared values cover the bulk (dense-and-sparse, as SqueezeLLM does).
    # per: rows with group_size 1 only. Each costs 24 bits (32 where a codebook covers over 256 weights).
    outliers: int = 0
    codebook_bits: Literal[32, 8] = 32
    iterations: int = 30  # Lloyd iterations at most (it stops when no assignment changes)
    # lloyd: Lloyd's iterations from deterministic seeds (fast; a local optimum). optimal: the exact least
    # squares codebook by dynamic programming, for codebooks over at most 2048 weights (per: rows with
    # `columns`); O(values x n^2) a codebook: SmolLM2 in groups of 192 took 509 s on 2 cores, Lloyd 29 s.
    method: Literal["lloyd", "optimal"] = "lloyd"
    # Training of the shared values afterwards, every weight's cluster fixed: a distill config (YAML
    # `recover: {loss: task, epochs: 1, lr: 1e-4}`; `kl` / `mse` distil from the model before clustering on
    # unlabeled inputs, `task` is cross-entropy on (inputs, labels) items), or null: none.
    recover: DistillConfig | None = None
    layers: tuple[ClusterKind, ...] = ("linear", "conv")
    targets: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.values, bool) or not isinstance(self.values, int) or not 2 <= self.values <= 256:
            raise RecipeError(
                f"cluster: values={self.values!r} must be a whole number from 2 to 256 (shared values per "
                "codebook; 16 packs each index into 4 bits)."
            )
        if self.per not in ("layer", "rows"):
            raise RecipeError(f"cluster: per={self.per!r} is unknown; choose 'layer' or 'rows'.")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise RecipeError(
                f"cluster: group_size={self.group_size!r} must be a whole number, at least 1 (output rows "
                "per codebook with per: rows)."
            )
        if self.per == "layer" and self.group_size != 1:
            raise RecipeError(
                "cluster: group_size applies to per: rows; set per: rows or leave group_size at 1."
            )
        for field in ("columns", "outliers"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RecipeError(f"cluster: {field}={value!r} must be a whole number, 0 or more.")
        if self.per == "layer" and (self.columns or self.outliers):
            raise RecipeError(
                "cluster: columns and outliers apply to per: rows (a codebook per group of rows, or per "
                "`columns` weights of a row); set per: rows."
            )
        if self.outliers and self.group_size != 1:
            raise RecipeError(
                f"cluster: outliers={self.outliers} needs one row per codebook (group_size 1, not "
                f"{self.group_size}); use `columns` for smaller codebook groups instead."
            )
        if self.codebook_bits not in (32, 8):
            raise RecipeError(
                f"cluster: codebook_bits={self.codebook_bits!r} is not supported; use 32 (fp32 shared values) or "
                "8 (int8 with one scale per codebook)."
            )
        if self.method not in ("lloyd", "optimal"):
            raise RecipeError(f"cluster: method={self.method!r} is unknown; choose 'lloyd' or 'optimal'.")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise RecipeError(f"cluster: iterations={self.iterations!r} must be a whole number, at least 1.")
        object.__setattr__(self, "recover", as_recover("cluster", self.recover))
        bad = [k for k in self.layers if k not in _KINDS]
        if bad or not self.layers:
            raise RecipeError(f"cluster: layers={list(self.layers)} is invalid; choose from {list(_KINDS)}.")

    @property
    def index_bits(self) -> int:
        """Bits each packed index takes: 2 (<= 4 values), 4 (<= 16) or 8."""
        return index_bits(self.values)


class ClusteredLayer(WeightView):
    """A layer whose weight is stored as shared values (a codebook per layer or per group of output rows)
    plus one packed index per weight (or, for a layer stored sparse, a bitmask plus one index per kept
    weight). Forward decodes the dense weight (unpack, gather, and where the bitmask says 0, zero) and runs
    the wrapped layer's own maths with it.

    The weight is handled rows-first: output channels on dim 0 (ConvTranspose's weight is moved there),
    the rest flattened, so a group of rows is a contiguous block of indices.
    """

    _modelpress_atomic = True
    codebook: torch.Tensor  # (groups, values) fp32, or int8 codes with `codebook_scale`
    codebook_scale: torch.Tensor | None  # (groups,) fp32 for an int8 codebook
    indices: torch.Tensor  # uint8, packed `index_bits` each, row-major over the (kept) weights
    bitmask: torch.Tensor | None  # uint8, one bit per weight (rows-first order), or None: dense
    outlier_values: torch.Tensor | None  # (rows, k) fp16: weights kept apart, k per codebook, or None
    outlier_positions: torch.Tensor | None  # (rows, k) uint8/int32: their columns within their codebook

    def __init__(
        self,
        inner: nn.Module,
        centroids: torch.Tensor,
        indices: torch.Tensor,
        *,
        shape: tuple[int, ...],
        group_size: int,
        mask: torch.Tensor | None = None,
        codebook_bits: int = 32,
        columns: int = 0,
        outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`centroids` (groups, values) fp32; `indices` (rows, cols) int in [0, values) in rows-first
        layout; `mask` (rows, cols) bool or None; `shape` the layer's weight shape; `group_size` rows per
        codebook (the last group may be partial); `columns` weights of a row per codebook (0: the whole
        row; the last may be partial), codebook of rows group g, columns group j at g * books_per_row + j;
        `outliers`: (values, positions), both (rows, k * books_per_row), each row's weights kept apart,
        `k` per codebook in the codebook's order, a position counted from its codebook's first column."""
        super().__init__()
        self.axis = output_axis(inner)
        self.weight_shape = tuple(shape)
        self.rows = shape[self.axis]
        self.cols = math.prod(shape) // max(self.rows, 1)
        self.group_size = group_size
        self.columns = columns if 0 < columns < self.cols else self.cols
        self.books_per_row = -(-self.cols // max(self.columns, 1))
        self.values = centroids.shape[1]
        self.bits = index_bits(max(self.values, 2))
        if indices.shape != (self.rows, self.cols):
            raise ValueError(
                f"ClusteredLayer: indices {tuple(indices.shape)} are not ({self.rows}, {self.cols})."
            )
        if centroids.shape[0] != -(-self.rows // group_size) * self.books_per_row:
            raise ValueError(
                f"ClusteredLayer: {centroids.shape[0]} codebooks for {self.rows} rows in groups of {group_size}"
                f" and {self.cols} columns in groups of {self.columns}."
            )
        if outliers is None:
            self.register_buffer("outlier_values", None)
            self.register_buffer("outlier_positions", None)
        else:
            values, positions = outliers
            if group_size != 1 or values.shape != positions.shape or values.shape[0] != self.rows:
                raise ValueError("ClusteredLayer: outliers need one row per codebook and (rows, k) tensors.")
            self.register_buffer("outlier_values", values.detach().to(torch.float16).contiguous())
            self.register_buffer("outlier_positions", positions.to(position_dtype(self.columns)).contiguous())
        if codebook_bits == 8:
            codes, scale = quantize_codebook(centroids.detach().float())
            self.register_buffer("codebook", codes)
            self.register_buffer("codebook_scale", scale)
        else:
            self.register_buffer("codebook", centroids.detach().float().contiguous())
            self.register_buffer("codebook_scale", None)
        if mask is None:
            self.register_buffer("bitmask", None)
            kept = indices.reshape(-1)
        else:
            self.register_buffer("bitmask", pack_mask(mask))
            kept = indices[mask]
        self.kept = int(kept.numel())
        self.register_buffer("indices", pack_indices(kept, bits=self.bits))
        if "weight" in inner._parameters:
            del inner.weight  # only the codebook and the indices are kept
        self.inner = inner

    @property
    def scheme(self) -> str:
        per = "" if self.group_size >= self.rows else f"/{self.group_size}rows"
        if self.columns < self.cols:
            per += f"x{self.columns}cols"
        name = f"cluster{self.values}{per}"
        if self.outlier_values is not None:
            name += f"+{self.outlier_values.shape[1] // self.books_per_row}outliers"
        if self.codebook_scale is not None:
            name += "+int8cb"
        if self.bitmask is not None:
            name = f"sparse{round(100 * (1 - self.kept / max(self.rows * self.cols, 1)))}%+" + name
        return name

    def shared_values(self) -> torch.Tensor:
        """The codebooks (groups, values) as fp32."""
        if self.codebook_scale is None:
            return self.codebook
        return self.codebook.float() * self.codebook_scale[:, None]

    def group_indices(self) -> torch.Tensor:
        """Each weight's index into its group's codebook, (rows, cols) int64 (0 where pruned)."""
        numel = self.rows * self.cols
        kept = unpack_indices(self.indices, self.kept, bits=self.bits)
        if self.bitmask is None:
            return kept.reshape(self.rows, self.cols)
        return scatter_kept(kept, unpack_bits(self.bitmask, numel)).reshape(self.rows, self.cols)

    def mask(self) -> torch.Tensor | None:
        """The keep-mask (rows, cols), or None for a dense layer."""
        if self.bitmask is None:
            return None
        return unpack_bits(self.bitmask, self.rows * self.cols).reshape(self.rows, self.cols)

    def flat_indices(self) -> torch.Tensor:
        """Indices into the flattened codebooks, (rows, cols) int64: a row's group offset added."""
        idx = self.group_indices()
        for term in book_offsets(self.rows, self.cols, self.group_size, self.columns, self.values):
            idx = idx + term
        return idx

    def outlier_columns(self) -> torch.Tensor | None:
        """Each outlier's column (rows, k * books_per_row) int64, or None: no outliers."""
        if self.outlier_positions is None:
            return None
        return outlier_columns(self.outlier_positions, self.columns, self.books_per_row)

    def outliers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(columns, values fp32) of the weights kept apart, each (rows, k * books_per_row), or None."""
        columns = self.outlier_columns()
        if columns is None:
            return None
        assert self.outlier_values is not None
        return columns, self.outlier_values.float()

    def dequantized_weight(self) -> torch.Tensor:
        return _decode(
            self.shared_values(),
            self.flat_indices(),
            self.mask(),
            self.weight_shape,
            self.axis,
            self.outliers(),
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return call_with_weight(self.inner, self.forward_weight(), args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.scheme}, shape={self.weight_shape}, {self.bits}-bit indices, codebooks={self.codebook.shape[0]}"


def position_dtype(columns: int) -> torch.dtype:
    """The dtype of an outlier's position within its codebook's `columns`: uint8 up to 256, else int32."""
    return torch.uint8 if columns <= 256 else torch.int32


def book_offsets(rows: int, cols: int, group_size: int, columns: int, values: int) -> list[torch.Tensor]:
    """Where each weight's codebook starts in the flattened codebooks, as the terms to add to its index:
    (rows, 1) for groups of rows, (1, cols) for groups of columns, int64 (rows group g, columns group j read
    codebook g * books + j); none where the whole layer has one codebook. Small broadcast terms, not one
    (rows, cols) tensor: an exporter folds them to constants, and a folded (rows, cols) int64 would
    outweigh the indices 16 times."""
    books = -(-cols // columns)
    terms = []
    if group_size < rows:
        group = torch.div(torch.arange(rows), group_size, rounding_mode="floor")
        terms.append((group * (books * values))[:, None])
    if books > 1:
        column = torch.div(torch.arange(cols), columns, rounding_mode="floor")
        terms.append((column * values)[None, :])
    return terms


def outlier_columns(positions: torch.Tensor, columns: int, books: int) -> torch.Tensor:
    """The columns (rows, k * books) int64 of outliers stored `k` per codebook as positions within it."""
    per_book = positions.shape[1] // books
    start = torch.div(torch.arange(positions.shape[1]), per_book, rounding_mode="floor") * columns
    return positions.long() + start[None, :]


def _decode(
    shared: torch.Tensor,
    flat_idx: torch.Tensor,
    mask: torch.Tensor | None,
    shape: tuple[int, ...],
    axis: int,
    outliers: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The dense weight of `shape` from codebooks (groups, values), flat indices (rows, cols), a mask and
    the weights kept apart, (columns, values) (rows, k) or None."""
    # (rows, cols); a 1-D Gather, which OpenVINO folds at load (a GatherND it runs on every call)
    w = torch.index_select(shared.reshape(-1), 0, flat_idx.reshape(-1)).reshape(flat_idx.shape)
    if mask is not None:
        w = torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
    if outliers is not None:  # a ScatterElements of constants, folded at load as the gather is
        w = w.scatter(1, outliers[0], outliers[1].to(w.dtype))
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return w.reshape(moved).movedim(0, axis)


def _rows_first(weight: torch.Tensor, axis: int) -> torch.Tensor:
    return weight.detach().float().movedim(axis, 0).reshape(weight.shape[axis], -1)


def _spans(total: int, size: int) -> list[tuple[int, int, int]]:
    """(start, stop, size) of the whole groups of `size` in [0, total), then of the partial last group."""
    full = total - total % size
    spans = [(0, full, size)] if full else []
    if full < total:
        spans.append((full, total, total - full))
    return spans


def _cluster_layer(name: str, module: nn.Module, config: ClusterConfig) -> ClusteredLayer:
    """k-means of one layer (or one SparseLayer's kept values) into a ClusteredLayer."""
    if isinstance(module, SparseLayer):
        inner, shape = module.inner, module.weight_shape
        dense = module.dense_weight()
        mask2d: torch.Tensor | None = (
            _rows_first(unpack_bits(module.bitmask, module.numel).reshape(shape), module.axis) != 0
        )
    else:
        inner = module
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        shape, dense, mask2d = tuple(weight.shape), weight, None
    if mask2d is not None and config.outliers:
        raise RecipeError(
            f"cluster: layer '{name}' is stored sparse (an earlier sparsity step); outliers are for dense "
            "layers: set outliers: 0, or add the layer to ignore."
        )
    axis = output_axis(inner)
    w2 = _rows_first(dense, axis)  # (rows, cols)
    rows, cols = w2.shape
    size = rows if config.per == "layer" else min(config.group_size, rows)
    width = config.columns if 0 < config.columns < cols else cols
    books = -(-cols // width)
    keep = config.outliers
    weights = None if mask2d is None else mask2d.float()
    centroids = torch.empty(-(-rows // size), books, config.values)
    idx = torch.empty(rows, cols, dtype=torch.int64)
    out_values = torch.empty(rows, books, keep)
    out_positions = torch.empty(rows, books, keep, dtype=torch.int64)
    for r0, r1, rs in _spans(rows, size):
        for c0, c1, cs in _spans(cols, width):
            nr, nc = (r1 - r0) // rs, (c1 - c0) // cs
            # each (rs, cs) block of weights, one codebook: (nr * nc, rs * cs)
            x = w2[r0:r1, c0:c1].reshape(nr, rs, nc, cs).permute(0, 2, 1, 3).reshape(nr * nc, rs * cs)
            wt = None
            if weights is not None:
                wt = weights[r0:r1, c0:c1].reshape(nr, rs, nc, cs).permute(0, 2, 1, 3).reshape(nr * nc, -1)
            apart = None
            if keep:  # rs == 1: the `keep` weights furthest from their block's median, kept exactly
                spread = (x - x.median(dim=1, keepdim=True).values).abs()
                positions = spread.topk(keep, dim=1).indices.sort(dim=1).values
                apart = torch.zeros_like(x, dtype=torch.bool).scatter_(1, positions, True)
                wt = (~apart).float()
                out_positions[r0:r1, c0 // width : c0 // width + nc] = positions.reshape(nr, nc, keep)
                out_values[r0:r1, c0 // width : c0 // width + nc] = x.gather(1, positions).reshape(
                    nr, nc, keep
                )
            # a layer pruned in place (too small for the bitmask format) keeps its zeros as a shared value 0
            c, i = kmeans(
                x,
                config.values,
                weights=wt,
                iterations=config.iterations,
                keep_zero=mask2d is None,
                method=config.method,
            )
            if (
                config.codebook_bits == 8
            ):  # the shared values as stored: each weight to its nearest int8 value
                codes, scale = quantize_codebook(c)
                c = codes.float() * scale[:, None]
                i = assign(x, c)
            centroids[r0 // size : r0 // size + nr, c0 // width : c0 // width + nc] = c.reshape(nr, nc, -1)
            idx[r0:r1, c0:c1] = i.reshape(nr, nc, rs, cs).permute(0, 2, 1, 3).reshape(r1 - r0, c1 - c0)
    outliers = None
    if keep:
        outliers = (out_values.reshape(rows, -1), out_positions.reshape(rows, -1))
    return ClusteredLayer(
        inner,
        centroids.reshape(-1, config.values),
        idx,
        shape=shape,
        group_size=size,
        mask=mask2d,
        codebook_bits=config.codebook_bits,
        columns=width,
        outliers=outliers,
    )


def _check_group_size(name: str, module: nn.Module, shape: torch.Size, config: ClusterConfig) -> None:
    """Refuse, before any layer changes, a layer with fewer weights in a codebook's group than clusters."""
    inner = module.inner if isinstance(module, SparseLayer) else module
    rows = shape[output_axis(inner)]
    cols = math.prod(shape) // max(rows, 1)
    size = rows if config.per == "layer" else min(config.group_size, rows)
    width = config.columns if 0 < config.columns < cols else cols
    smallest = (rows % size or size) * (cols % width or width)
    largest = min(size, rows) * min(width, cols)
    if config.method == "optimal" and largest > OPTIMAL_MAX_N:
        raise RecipeError(
            f"cluster: method: optimal solves codebooks over at most {OPTIMAL_MAX_N} weights, and layer '{name}'"
            f" has {largest} per codebook; set per: rows with columns: 256 (or fewer), or method: lloyd."
        )
    if smallest < config.values + config.outliers:
        where = (
            "the layer"
            if config.per == "layer"
            else f"its smallest codebook group ({rows % size or size} rows x {cols % width or width} columns)"
        )
        also = f" plus outliers={config.outliers}" if config.outliers else ""
        raise RecipeError(
            f"cluster: layer '{name}' has {smallest} weights in {where}, fewer than values={config.values} "
            f"clusters{also}; lower values, use larger groups, or add '{name}' to ignore."
        )


def _select(model: nn.Module, config: ClusterConfig) -> dict[str, nn.Module]:
    missing = unmatched_patterns(model, config.targets)
    if missing:
        raise RecipeError(
            f"cluster: targets {missing} match no module of the model. Check the names (see `modelpress "
            "profile` for the layer list), or use a type name such as 'Linear' or a 're:' regex."
        )
    types = tuple(t for kind in config.layers for t in QUANTIZABLE_TYPES[kind])
    chosen: dict[str, nn.Module] = {}
    small: list[str] = []
    for name, module in select_modules(
        model, types=(*types, SparseLayer), targets=config.targets, ignore=config.ignore
    ):
        if isinstance(module, SparseLayer):
            if not isinstance(module.inner, types):
                continue
        elif not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue  # the inner layer of a compressed layer (its weight is stored elsewhere)
        weight = module.dense_weight() if isinstance(module, SparseLayer) else module.weight
        assert isinstance(weight, torch.Tensor)
        if not torch.isfinite(weight).all():
            raise RecipeError(
                f"cluster: layer '{name}' has NaN or Inf in its weight; fix the checkpoint, or add it to ignore."
            )
        if weight.numel() < MIN_CLUSTER_ELEMENTS and not (config.targets and name in config.targets):
            small.append(name)
            continue
        _check_group_size(name, module, weight.shape, config)
        chosen[name] = module
    if small:
        log.info(
            "cluster: %d layers under %d weights stay as they are (the decoding graph would cost more than "
            "it saves; name one in targets to cluster it anyway): %s",
            len(small),
            MIN_CLUSTER_ELEMENTS,
            small,
        )
    return chosen


class _Centroids(nn.Module):
    """A clustered layer being fine-tuned: its shared values are the parameter, every weight's index (and
    bitmask) fixed, the dense weight gathered from them on each forward."""

    flat_idx: torch.Tensor
    keep: torch.Tensor | None

    def __init__(self, layer: ClusteredLayer) -> None:
        super().__init__()
        self.shared = nn.Parameter(layer.shared_values().detach().clone())
        self.register_buffer("flat_idx", layer.flat_indices())
        self.register_buffer("keep", layer.mask())
        self.layer = [layer]  # a list: not a submodule
        self.inner = layer.inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layer = self.layer[0]  # the weights kept apart stay as they are
        weight = _decode(
            self.shared, self.flat_idx, self.keep, layer.weight_shape, layer.axis, layer.outliers()
        )
        return call_with_weight(self.inner, weight, args, kwargs)

    def stored(self, codebook_bits: int) -> ClusteredLayer:
        layer = self.layer[0]
        return _like(layer, self.inner, self.shared.detach(), codebook_bits)


def _like(
    layer: ClusteredLayer, inner: nn.Module, shared: torch.Tensor, codebook_bits: int
) -> ClusteredLayer:
    """A ClusteredLayer for `inner` with `layer`'s indices, groups, mask and outliers and the codebooks
    `shared` (groups, values) fp32."""
    outliers = None
    if layer.outlier_values is not None and layer.outlier_positions is not None:
        outliers = (layer.outlier_values.float(), layer.outlier_positions.long())
    return ClusteredLayer(
        inner,
        shared,
        layer.group_indices(),
        shape=layer.weight_shape,
        group_size=layer.group_size,
        mask=layer.mask(),
        codebook_bits=codebook_bits,
        columns=layer.columns,
        outliers=outliers,
    )


def _recover(
    model: nn.Module, names: list[str], data: Dataset, config: ClusterConfig, teacher: nn.Module | None
) -> None:
    """Train the shared values of the clustered layers among `names`, indices fixed; everything else frozen."""
    recovery = config.recover
    assert recovery is not None
    swapped: dict[str, _Centroids] = {}
    for name in names:
        layer = model.get_submodule(name)
        if isinstance(layer, ClusteredLayer):
            swapped[name] = _Centroids(layer)
            set_submodule(model, name, swapped[name])
    trainable = {id(c.shared) for c in swapped.values()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in trainable]
    for p in frozen:
        p.requires_grad_(False)
    start = time.perf_counter()
    try:
        train(
            model, teacher, data, recovery, owner="cluster", tag="cluster-recover", autocast=bf16_supported()
        )
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for name, c in swapped.items():
            set_submodule(model, name, c.stored(config.codebook_bits))
    log.info(
        "cluster: recovery (%s) trained the shared values of %d layers, indices fixed, in %.1f s",
        recovery.loss,
        len(swapped),
        time.perf_counter() - start,
    )


def _sharing(module: nn.Module, source: ClusteredLayer) -> ClusteredLayer:
    """A ClusteredLayer for `module` holding the very tensors of `source` (a layer tied to the same weight)."""
    layer = _like(source, module, source.shared_values(), 32 if source.codebook_scale is None else 8)
    for key, value in source._buffers.items():
        setattr(layer, key, value)  # the same tensors: exported once
    return layer


def _weight_bytes(module: nn.Module) -> int:
    if isinstance(module, SparseLayer):
        return sum(t.numel() * t.element_size() for t in module.buffers(recurse=False))
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.numel() * weight.element_size()


def cluster(model: nn.Module, config: ClusterConfig, data: Dataset | Any = None) -> nn.Module:
    """Replace the selected layers by `ClusteredLayer`s (k-means per layer or group of rows); with
    `recover`, then train their shared values on `data`, every weight's cluster fixed.

    >>> m = cluster(nn.Sequential(nn.Linear(64, 32)), ClusterConfig(values=4))
    >>> m[0].shared_values().shape, m[0].indices.dtype
    (torch.Size([1, 4]), torch.uint8)
    """
    chosen = _select(model, config)
    if not chosen:
        log.warning("cluster: no layer matched (layers=%s); this step changes nothing.", list(config.layers))
        return model
    training = as_dataset(data)
    recovery = config.recover
    if recovery is not None and training is None:
        raise DataError(
            "cluster: recover trains the shared values on data: pass `data=` to compress, or --data "
            "file.py:fn on the command line; or drop recover (k-means itself needs no data)."
        )
    teacher = (
        copy.deepcopy(model).eval().requires_grad_(False)
        if recovery is not None and recovery.needs_teacher
        else None
    )
    before = after = 0
    # Tied weights (an LM's embedding and head share one Parameter) are clustered once and the codebook
    # and indices shared, so the artifact stores them once, as the fp32 model did.
    first_user: dict[int, ClusteredLayer] = {}
    for name, module in chosen.items():
        stored = _weight_bytes(module)
        weight = module._parameters.get("weight")
        source = first_user.get(id(weight)) if weight is not None else None
        if (
            source is not None
            and weight is not None
            and source.weight_shape == tuple(weight.shape)
            and source.axis == output_axis(module)
        ):
            layer = _sharing(module, source)
        else:
            layer = _cluster_layer(name, module, config)
            if weight is not None:
                first_user[id(weight)] = layer
        before += stored
        after += sum(t.numel() * t.element_size() for t in layer.buffers(recurse=False))
        if name:
            set_submodule(model, name, layer)
        else:
            model = layer
    if recovery is not None:
        assert training is not None
        _recover(model, list(chosen), training, config, teacher)
    log.info(
        "cluster: %d layers clustered into %d shared values (%s), %d-bit indices: weight bytes %d -> %d",
        len(chosen),
        config.values,
        "per layer" if config.per == "layer" else f"per {config.group_size} rows",
        config.index_bits,
        before,
        after,
    )
    return model


class ClusteredInt8Layer(QuantizedLayer):
    """A clustered layer quantized by static int8 (W8A8): a `QuantizedLayer` (int8 per-channel weight,
    calibrated input quantizer) whose int8 weight codes are stored as the clustering stored its weight:
    an int8 codebook per row (or per group of rows) plus the packed indices (and bitmask) of the
    `ClusteredLayer` it came from. `qweight` gathers the codes; in an ONNX export that is a constant
    subgraph (unpack, gather) before the weight's DequantizeLinear, which the runtimes fold at load, so
    the file keeps 4-bit indices and the runtime runs an integer kernel. `as_quantized()` gives the
    plain `QuantizedLayer` with the same codes, what LiteRT and ExecuTorch lower.

    A row's weights take at most `values` distinct values, so its int8 codes are its codebook's values on
    the row's grid: exactly the shared values when the codebook is int8 and the grid is its own (8-bit
    weights), else each rounded to the row's per-channel grid (max |w| of the row to 127, as static int8
    does for any layer).
    """

    codebook: torch.Tensor  # (books, values) int8: the codes each book of rows reads
    indices: torch.Tensor  # uint8, packed as in the ClusteredLayer
    bitmask: torch.Tensor | None
    outlier_positions: torch.Tensor | None  # as in the ClusteredLayer
    outlier_codes: torch.Tensor | None  # (rows, k) int8: the outliers on their row's grid

    def __init__(self, layer: ClusteredLayer, *, bits: int = 8) -> None:
        nn.Module.__init__(self)
        self.axis = layer.axis
        self.bits = bits
        self.weight_shape = layer.weight_shape
        self.rows, self.cols, self.kept = layer.rows, layer.cols, layer.kept
        self.values, self.index_bits = layer.values, layer.bits
        self.source_scheme = layer.scheme
        self.columns, self.books_per_row = layer.columns, layer.books_per_row
        shared = layer.shared_values()  # (groups, values) fp32
        row_group = torch.arange(self.rows) // layer.group_size  # (rows,): the codebook each row reads
        _, qmax = qrange(bits, symmetric=True)
        if (
            layer.codebook_scale is not None
            and bits == 8
            and layer.books_per_row == 1
            and layer.outlier_values is None
        ):
            # an int8 codebook is already an int8 grid: its codes, with its scale for each of its rows
            self.book_rows = layer.group_size
            codebook, scale = layer.codebook, layer.codebook_scale[row_group]
        else:  # each row's codebooks on the row's own grid: books (rows * books_per_row, values)
            self.book_rows = 1
            books = layer.books_per_row
            scale = symmetric_scale(layer.dequantized_weight(), axis=self.axis, bits=bits)
            read = (row_group[:, None] * books + torch.arange(books)[None, :]).reshape(-1)
            codebook = codes_on_grid(shared[read], scale.repeat_interleave(books), qmax=qmax)
        self.register_buffer("codebook", codebook.contiguous())
        self.register_buffer("indices", layer.indices)
        self.register_buffer("bitmask", layer.bitmask)
        apart = layer.outliers()
        self.register_buffer("outlier_positions", layer.outlier_positions)
        self.register_buffer(
            "outlier_codes",
            None
            if apart is None
            else torch.round(apart[1] / scale.float()[:, None]).clamp(-qmax, qmax).to(torch.int8),
        )
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero_point", None)
        self.register_buffer("input_multiplier", None)
        self.inner = layer.inner
        self.input_scale: float | None = None
        self.input_zero_point = 0
        self.input_signed = False

    @property
    def qweight(self) -> torch.Tensor:  # type: ignore[override]
        """The int8 weight codes in the layer's weight shape, gathered from the codebooks."""
        kept = unpack_indices(self.indices, self.kept, bits=self.index_bits)
        mask = None if self.bitmask is None else unpack_bits(self.bitmask, self.rows * self.cols)
        idx = (kept if mask is None else scatter_kept(kept, mask)).reshape(self.rows, self.cols)
        for term in book_offsets(self.rows, self.cols, self.book_rows, self.columns, self.values):
            idx = idx + term
        # (rows, cols) int8; a 1-D Gather, which OpenVINO folds at load (a GatherND it runs on every call)
        codes = torch.index_select(self.codebook.reshape(-1), 0, idx.reshape(-1)).reshape(idx.shape)
        if mask is not None:
            keep = mask.reshape(self.rows, self.cols)
            codes = torch.where(keep, codes, torch.zeros((), dtype=codes.dtype, device=codes.device))
        if self.outlier_codes is not None and self.outlier_positions is not None:
            where = outlier_columns(self.outlier_positions, self.columns, self.books_per_row)
            codes = codes.scatter(1, where, self.outlier_codes)
        shape = self.weight_shape
        moved = (shape[self.axis], *shape[: self.axis], *shape[self.axis + 1 :])
        return codes.reshape(moved).movedim(0, self.axis)

    @property
    def scheme(self) -> str:
        return f"{super().scheme}+{self.source_scheme}"

    def as_quantized(self) -> QuantizedLayer:
        """The plain `QuantizedLayer` with these codes, scales and input quantizer (its own copy of the
        wrapped layer): the dense int8 form that runtimes without the decoding subgraph lower."""
        inner = copy.deepcopy(self.inner)
        inner.weight = nn.Parameter(self.dequantized_weight().detach(), requires_grad=False)
        layer = QuantizedLayer(inner, bits=self.bits, weight_scale=self.scale.clone())
        layer.input_scale = self.input_scale
        layer.input_zero_point = self.input_zero_point
        layer.input_signed = self.input_signed
        return layer

    def extra_repr(self) -> str:
        return (
            f"{self.scheme}, per-channel axis={self.axis}, shape={self.weight_shape}, {self.index_bits}-bit "
            f"indices, int8 codebooks={self.codebook.shape[0]}"
        )


def has_int8_form(module: nn.Module) -> bool:
    """Whether `module` is a clustered Linear or (non-transposed) convolution: what static int8 quantizes
    as the layer it wraps (`clustered_int8`)."""
    return (
        isinstance(module, ClusteredLayer)
        and isinstance(module.inner, (*QUANTIZABLE_TYPES["linear"], *QUANTIZABLE_TYPES["conv"]))
        and not isinstance(module.inner, nn.modules.conv._ConvTransposeNd)
    )


def clustered_int8(layer: ClusteredLayer, *, bits: int = 8) -> ClusteredInt8Layer:
    """The int8 (W8A8) form of a clustered Linear/Conv, its input quantizer still to set
    (`set_input_range`): what static int8 makes of a `ClusteredLayer`.

    >>> m = cluster(nn.Sequential(nn.Linear(64, 32)), ClusterConfig(values=4))
    >>> q = clustered_int8(m[0])
    >>> q.qweight.dtype, int(q.qweight[0].unique().numel()) <= 4
    (torch.int8, True)
    """
    if not has_int8_form(layer):
        raise ValueError(f"clustered_int8: a clustered {type(layer.inner).__name__} has no static int8 form.")
    return ClusteredInt8Layer(layer, bits=bits)


def decode_clustered_int8(model: nn.Module) -> nn.Module:
    """`model`, or a copy of it whose `ClusteredInt8Layer`s are plain `QuantizedLayer`s with the same int8
    codes (`as_quantized`): the form LiteRT and ExecuTorch lower (their converters take a weight as a
    stored tensor, not a gather). The model itself is left as it is.

    >>> plain = decode_clustered_int8(small)  # doctest: +SKIP
    """
    names = [n for n, m in model.named_modules() if isinstance(m, ClusteredInt8Layer)]
    if not names:
        return model
    plain = copy.deepcopy(model)
    for name in names:
        layer = plain.get_submodule(name)
        assert isinstance(layer, ClusteredInt8Layer)
        if name:
            set_submodule(plain, name, layer.as_quantized())
        else:
            plain = layer.as_quantized()
    return plain


__all__ = [
    "ClusterConfig",
    "ClusteredInt8Layer",
    "ClusteredLayer",
    "cluster",
    "clustered_int8",
    "decode_clustered_int8",
    "has_int8_form",
]
