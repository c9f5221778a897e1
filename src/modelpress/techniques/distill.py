"""Knowledge distillation: train a student (the model after depth or structured pruning or a factorization,
or one you built) to match a frozen teacher (the model before the recipe, or one you give) on unlabeled data.

Losses, added up: the outputs' KL divergence at a temperature (`loss: kl`, logits) or relative MSE
(`loss: mse`, any outputs), mixed with cross-entropy on hard labels when items are (inputs, labels)
(`alpha`); the hidden states of the blocks (`features: mse`: student block i of L_s matched to teacher block
round(i * L_t / L_s), 1-based, through a learned linear projection where the widths differ, dropped after
training); the attention probabilities of Hugging Face attention modules (`attention: true`, KL per row).

The same config is the `recover:` step of sparsity, structured and depth pruning (YAML
`recover: {loss: kl, steps: 200, lr: 1e-4}`).

Training logs a progress line every `every` steps, can stop early on held-out distillation loss or on your
metric (`patience`), saves student and optimizer every `every` steps under `checkpoint_dir` (a rerun
resumes there) and, when the loss turns NaN or Inf, puts back the last weights whose loss was finite and
says so.

>>> small = compress(model, [DepthPruningConfig(blocks=3), DistillConfig(loss="mse", features="mse",
...                                                                       steps=400)], batches)  # doctest: +SKIP
>>> student = distill(my_small_model, big_model, batches, DistillConfig(temperature=2.0))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sized
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.data import Dataset, as_dataset, is_pair
from modelpress.errors import DataError, GraphError, ModelpressError, RecipeError
from modelpress.loading import as_inputs
from modelpress.outputs import named_outputs, no_cache, output_tensors
from modelpress.techniques.finetune import kl_loss, task_loss

log = logging.getLogger(__name__)

DistillLoss = Literal["kl", "mse", "task"]
Metric = Callable[[nn.Module], float]  # the student -> a score, higher is better

_HOLDOUT = 4  # batches held out (the first ones) for early stopping on the distillation loss
_FORMAT = 1  # checkpoint layout version


@dataclass(frozen=True)
class DistillConfig:
    """Train the model to match a teacher: the model before the recipe in `compress`, or the one given to
    `distill`. Also the `recover:` field of sparsity, structured and depth pruning.

    >>> DistillConfig(loss="kl", temperature=2.0, steps=200).labeled
    False
    """

    type: ClassVar[str] = "distill"
    # The outputs' loss: "kl" (KL divergence of the softmax over the last dim at `temperature`, times
    # temperature^2: logits of classifiers and language models), "mse" (relative MSE of every float output:
    # embeddings, images, anything) or "task" (cross-entropy on (inputs, labels) items alone, no teacher).
    loss: DistillLoss = "kl"
    temperature: float = 1.0
    alpha: float = 0.0  # weight of cross-entropy on hard labels (items are then (inputs, labels)), 0..1
    features: Literal["mse"] | None = None  # also match the blocks' hidden states
    attention: bool = False  # also match attention probabilities (Hugging Face attention, eager)
    steps: int | None = None  # this many steps (batches), passing over the data as often as it takes
    epochs: int = 1  # passes over the data when `steps` is null
    lr: float = 1e-4
    every: int = 50  # steps between progress lines, early-stopping checks, snapshots and checkpoints
    # Early stopping: stop after this many checks without improvement and keep the best weights; the
    # score is your `metric` (the `distill` function) or else the loss on the first 4 batches, held out.
    patience: int | None = None
    checkpoint_dir: str | None = None  # save student + optimizer here; a rerun resumes from it

    def __post_init__(self) -> None:
        if self.loss not in ("kl", "mse", "task"):
            raise RecipeError(
                f"distill: loss={self.loss!r} is unknown; choose 'kl' (logits), 'mse' (any outputs) or 'task' "
                "(cross-entropy on labels alone)."
            )
        if not _number(self.temperature) or self.temperature <= 0:
            raise RecipeError(f"distill: temperature={self.temperature} must be positive; 1 to 4 is usual.")
        if not _number(self.alpha) or not 0 <= self.alpha <= 1:
            raise RecipeError(
                f"distill: alpha={self.alpha} must be in [0, 1]: the weight of cross-entropy on labels "
                "(0: the teacher alone, unlabeled data is enough)."
            )
        if self.loss == "task" and self.alpha:
            raise RecipeError(
                "distill: loss: task is cross-entropy on labels alone; alpha mixes it into loss kl or mse. "
                "Drop alpha, or set loss: kl."
            )
        if self.features not in (None, "mse"):
            raise RecipeError(f"distill: features={self.features!r} is unknown; use 'mse' or null.")
        if not isinstance(self.attention, bool):
            raise RecipeError(f"distill: attention={self.attention!r} must be true or false.")
        if self.steps is not None and not _whole(self.steps, 1):
            raise RecipeError(
                f"distill: steps={self.steps} must be a whole number, at least 1, or null (whole epochs)."
            )
        if not _whole(self.epochs, 1):
            raise RecipeError(f"distill: epochs={self.epochs} must be a whole number, at least 1.")
        if not _number(self.lr) or not 0 < self.lr < 1:
            raise RecipeError(f"distill: lr={self.lr} must be positive and below 1; 1e-4 is a start.")
        if not _whole(self.every, 1):
            raise RecipeError(f"distill: every={self.every} must be a whole number of steps, at least 1.")
        if self.patience is not None and not _whole(self.patience, 1):
            raise RecipeError(
                f"distill: patience={self.patience} must be a whole number of checks, at least 1, or null."
            )
        if self.checkpoint_dir is not None and not isinstance(self.checkpoint_dir, str):
            raise RecipeError(
                f"distill: checkpoint_dir={self.checkpoint_dir!r} must be a folder path (a string) or null."
            )

    @property
    def labeled(self) -> bool:
        """Whether the items are (inputs, labels) pairs."""
        return self.loss == "task" or self.alpha > 0

    @property
    def needs_teacher(self) -> bool:
        return self.loss != "task" or self.features is not None or self.attention


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


# ------------------------------------------------------------------------------------------------
# The `recover:` field of the pruning configs
# ------------------------------------------------------------------------------------------------

_OLD_FIELDS = ("recover_epochs", "recover_steps", "recover_lr", "recover_distill")


def _new_form(raw: Mapping[str, Any]) -> str:
    """The nested `recover:` mapping that the old flat fields of `raw` stand for, as YAML flow text."""
    old = raw.get("recover")
    if old in (None, "none"):
        return "(drop the recover fields: no recovery)"
    loss = "task" if old == "task" else str(raw.get("recover_distill", "mse"))
    parts = [f"loss: {loss}"]
    for key in ("steps", "epochs", "lr"):
        if raw.get(f"recover_{key}") is not None:
            parts.append(f"{key}: {raw[f'recover_{key}']}")
    return "recover: {" + ", ".join(parts) + "}"


def old_recover_error(kind: str, raw: Mapping[str, Any]) -> RecipeError | None:
    """A RecipeError naming the new form when `raw` (a step of a recipe) uses the flat `recover_*` fields
    or `recover: distill|task|none`, which are one nested DistillConfig now; None otherwise."""
    old = [k for k in _OLD_FIELDS if k in raw]
    if not old and not isinstance(raw.get("recover"), str):
        return None
    flat = ", ".join(f"{k}: {raw[k]}" for k in ("recover", *old) if k in raw)
    return RecipeError(
        f"{kind}: the recovery settings are one nested field now, a distill config: write "
        f"`{_new_form(raw)}` instead of `{flat}` "
        "(fields: loss kl|mse|task, steps, epochs, lr, temperature, alpha, features, every, checkpoint_dir)."
    )


def as_recover(owner: str, value: Any) -> DistillConfig | None:
    """The `recover` field of a pruning config as a DistillConfig (from a mapping, as YAML gives it), or
    None; a RecipeError with the new form for the old string values."""
    if value is None or isinstance(value, DistillConfig):
        return value
    if isinstance(value, str):
        error = old_recover_error(owner, {"recover": value})
        assert error is not None
        raise error
    if not isinstance(value, Mapping):
        raise RecipeError(
            f"{owner}: recover={value!r} must be a distill config, e.g. recover: {{loss: kl, steps: 200, "
            "lr: 1e-4}, or null for no recovery."
        )
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    unknown = sorted(set(value) - fields - {"type"})
    if unknown or value.get("type", "distill") != "distill":
        raise RecipeError(
            f"{owner}: recover has no field(s) {unknown or ['type: ' + str(value.get('type'))]}; its "
            f"fields are those of distill: {', '.join(sorted(fields))}."
        )
    try:
        return DistillConfig(**{k: v for k, v in value.items() if k != "type"})
    except RecipeError as exc:
        raise RecipeError(f"{owner}: recover: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# What is matched: block outputs and attention probabilities, captured by forward hooks
# ------------------------------------------------------------------------------------------------


def layer_map(student_blocks: int, teacher_blocks: int) -> list[int]:
    """The teacher block (0-based) each student block is matched to: student block i (1-based) to
    teacher block round(i * L_t / L_s), so the last is matched to the last.

    >>> layer_map(3, 6)
    [1, 3, 5]
    """
    return [
        min(teacher_blocks, max(1, round(i * teacher_blocks / student_blocks))) - 1
        for i in range(1, student_blocks + 1)
    ]


def _stack_blocks(model: nn.Module, role: str) -> list[tuple[str, nn.Module]]:
    from modelpress.techniques.depth import find_stack  # depth imports this module for its recovery

    try:
        name, stack = find_stack(model)
    except (GraphError, RecipeError) as exc:
        raise RecipeError(
            f"distill: features/attention matching works block by block, and the {role} has no stack of "
            f"repeated blocks ({exc}). Set features: null and attention: false for this model."
        ) from exc
    return [(f"{name}.{key}" if name else key, m) for key, m in stack._modules.items() if m is not None]


def _looks_like_attention(value: Any) -> torch.Tensor | None:
    """The attention probabilities (batch, heads, queries, keys) in a module's output tuple, if any."""
    if isinstance(value, (tuple, list)) and len(value) >= 2:
        probs = value[1]
        if isinstance(probs, torch.Tensor) and probs.is_floating_point() and probs.ndim == 4:
            return probs
    return None


class _Taps:
    """Forward hooks on a model's blocks: the hidden states each block returns and (attention) the first
    attention probabilities a module inside each block returns, for the latest forward."""

    def __init__(self, blocks: list[tuple[str, nn.Module]], *, attention: bool) -> None:
        self.names = [n for n, _ in blocks]
        self.hidden: dict[int, torch.Tensor] = {}
        self.probs: dict[int, torch.Tensor] = {}
        self.handles: list[Any] = []
        for index, (_, block) in enumerate(blocks):
            self.handles.append(block.register_forward_hook(partial(self._block, index)))
            if attention:
                for inner in block.modules():
                    if inner is not block:
                        self.handles.append(inner.register_forward_hook(partial(self._attention, index)))

    def _block(self, index: int, _module: nn.Module, _args: Any, out: Any) -> None:
        found = [t for t in output_tensors(out) if t.is_floating_point()]
        if found:
            self.hidden[index] = found[0]

    def _attention(self, index: int, _module: nn.Module, _args: Any, out: Any) -> None:
        probs = _looks_like_attention(out)
        if probs is not None and index not in self.probs:
            self.probs[index] = probs

    def clear(self) -> None:
        self.hidden.clear()
        self.probs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.clear()


def _width_dim(student: torch.Tensor, teacher: torch.Tensor, where: str) -> int | None:
    """The one dim where the hidden states' shapes differ (the width to project), None if they agree."""
    if student.ndim != teacher.ndim:
        raise RecipeError(
            f"distill: {where}: the student's hidden states are {tuple(student.shape)} and the teacher's "
            f"{tuple(teacher.shape)}; features matching needs the same layout. Set features: null."
        )
    differ = [d for d in range(student.ndim) if student.shape[d] != teacher.shape[d]]
    if not differ:
        return None
    if len(differ) > 1 or differ[0] == 0:
        raise RecipeError(
            f"distill: {where}: the student's hidden states are {tuple(student.shape)} and the teacher's "
            f"{tuple(teacher.shape)}: only the width may differ (it is projected). Set features: null."
        )
    return differ[0]


class _Projection(nn.Module):
    """A learned linear map of the student's width onto the teacher's, along dim `dim` (dropped after)."""

    def __init__(self, dim: int, width: int, target: int, generator: torch.Generator) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.randn(target, width, generator=generator) / math.sqrt(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.movedim(self.dim, -1), self.weight.to(x.dtype)).movedim(-1, self.dim)


def _relative_mse(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    want = want.float()
    return F.mse_loss(got.float(), want) / want.pow(2).mean().clamp(min=1e-12)


def _attention_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention rows (batch, heads, queries, keys), the mean over rows; with
    different head counts, of the maps averaged over heads."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    s, t = student.float(), teacher.float()
    per_row = (torch.xlogy(t, t) - t * s.clamp(min=1e-12).log()).sum(-1)
    return per_row.mean()


# ------------------------------------------------------------------------------------------------
# The objective
# ------------------------------------------------------------------------------------------------


def _shapes(tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors]


class _Objective:
    """The combined loss of one item: outputs (kl/mse), labels (alpha), features and attention."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        config: DistillConfig,
        *,
        owner: str,
        autocast: bool,
    ) -> None:
        self.student, self.teacher, self.config, self.owner = student, teacher, config, owner
        self.precision = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
        )
        self.projections = nn.ModuleList()
        self.pairs: list[tuple[int, int]] = []  # (student block, teacher block)
        self.taps: list[_Taps] = []
        if config.features is not None or config.attention:
            assert teacher is not None
            s_blocks, t_blocks = _stack_blocks(student, "student"), _stack_blocks(teacher, "teacher")
            self.pairs = list(enumerate(layer_map(len(s_blocks), len(t_blocks))))
            self.taps = [
                _Taps(s_blocks, attention=config.attention),
                _Taps(t_blocks, attention=config.attention),
            ]
            log.info(
                "%s: matching student blocks to teacher blocks %s",
                owner,
                ", ".join(f"{s_blocks[s][0]}->{t_blocks[t][0]}" for s, t in self.pairs),
            )

    def remove(self) -> None:
        for taps in self.taps:
            taps.remove()

    def split(self, item: Any, where: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """(inputs, labels or None) of a data item."""
        if not self.config.labeled:
            return as_inputs(item, where=where), None
        if not is_pair(item):
            kind = type(item).__name__
            kind = f"{kind} of {len(item)} elements" if isinstance(item, (tuple, list)) else kind
            why = "loss: task" if self.config.loss == "task" else f"alpha={self.config.alpha}"
            raise DataError(
                f"{self.owner}: {why} trains on hard labels, so each item must be an (inputs, labels) pair, "
                f"but {where} is a {kind}. Pass labeled data (a transform_fn can return (inputs, labels)), "
                "or set alpha: 0 with loss kl or mse: the teacher alone needs no labels."
            )
        return as_inputs(item[0], where=where), item[1]

    def _forward(self, model: nn.Module, inputs: tuple[torch.Tensor, ...], role: str, where: str) -> Any:
        try:
            with self.precision():
                return model(*inputs)
        except ModelpressError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise DataError(
                f"{self.owner}: the {role} fails on {where} of shapes {_shapes(list(inputs))} with "
                f"{type(exc).__name__}: {first}. Items must be model inputs"
                + (", as (inputs, labels) pairs." if self.config.labeled else ".")
            ) from exc

    def teacher_pass(
        self, inputs: tuple[torch.Tensor, ...], where: str
    ) -> tuple[Any, dict[str, dict[int, torch.Tensor]]]:
        """The teacher's outputs and captured block tensors (no gradients)."""
        if self.teacher is None or not self.config.needs_teacher:
            return None, {}
        if self.taps:
            self.taps[1].clear()
        with torch.no_grad():
            out = self._forward(self.teacher, inputs, "teacher", where)
        captured = (
            {"hidden": dict(self.taps[1].hidden), "probs": dict(self.taps[1].probs)} if self.taps else {}
        )
        return out, captured

    def __call__(self, item: Any, where: str) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = self.split(item, where)
        if any(t.numel() == 0 for t in inputs):
            raise DataError(
                f"{self.owner}: {where} is empty (shapes {_shapes(list(inputs))}); drop empty batches."
            )
        reference, captured = self.teacher_pass(inputs, where)
        if self.taps:
            self.taps[0].clear()
        out = self._forward(self.student, inputs, "student", where)
        config = self.config
        parts: dict[str, torch.Tensor] = {}
        if config.loss != "task":
            self._check_outputs(out, reference)
            if config.loss == "kl":
                t = config.temperature
                got, want = self._float(out)[0], self._float(reference)[0]
                parts["kl"] = kl_loss(got / t, want / t, owner=self.owner) * t * t
            else:
                parts["mse"] = sum(
                    (
                        _relative_mse(g, w)
                        for g, w in zip(self._float(out), self._float(reference), strict=True)
                    ),
                    torch.zeros(()),
                )
        if labels is not None:
            parts["ce"] = task_loss(out, labels, owner=self.owner)
        if config.features is not None:
            parts["features"] = self._features(captured.get("hidden", {}))
        if config.attention:
            parts["attention"] = self._attention(captured.get("probs", {}))
        total = torch.zeros(())
        for name, value in parts.items():
            weight = 1.0
            if name in ("kl", "mse"):
                weight = 1.0 - config.alpha
            elif name == "ce" and config.loss != "task":
                weight = config.alpha
            total = total + weight * value.float()
        return total, {k: float(v.detach()) for k, v in parts.items()}

    def _float(self, out: Any) -> list[torch.Tensor]:
        return [t for t in output_tensors(out) if t.is_floating_point()]

    def _check_outputs(self, out: Any, reference: Any) -> None:
        got, want = self._float(out), self._float(reference)
        if self.config.loss == "kl":
            got, want = got[:1], want[:1]
        if not got or _shapes(got) != _shapes(want):
            what = "first output (the logits)" if self.config.loss == "kl" else "float outputs, one by one"
            raise RecipeError(
                f"{self.owner}: the student's outputs {_shapes(got)} do not match the teacher's {_shapes(want)} "
                f"on the same inputs; loss {self.config.loss} compares their {what}. Give a teacher and a "
                "student with the same outputs (same classes or vocabulary), or use loss: task with labels."
            )
        if isinstance(out, Mapping) and isinstance(reference, Mapping):  # same shapes, but other results?
            names = [[n for n, t in named_outputs(o) if t.is_floating_point()] for o in (out, reference)]
            if self.config.loss == "kl":
                names = [n[:1] for n in names]
            if names[0] != names[1]:
                raise RecipeError(
                    f"{self.owner}: the student returns {names[0]} but the teacher {names[1]}: loss "
                    f"{self.config.loss} would compare different results. Give models whose outputs have the "
                    "same keys, in the same order (wrap one so its forward returns what the other does)."
                )

    def _features(self, teacher_hidden: dict[int, torch.Tensor]) -> torch.Tensor:
        student_hidden = self.taps[0].hidden
        terms = []
        for s, t in self.pairs:
            if s not in student_hidden or t not in teacher_hidden:
                missing = self.taps[0].names[s] if s not in student_hidden else self.taps[1].names[t]
                raise RecipeError(
                    f"{self.owner}: features: block '{missing}' returned no float tensor to match (or did not "
                    "run). Set features: null."
                )
            got, want = student_hidden[s], teacher_hidden[t]
            if s < len(self.projections):
                got = self.projections[s](got)
            terms.append(_relative_mse(got, want))
        return torch.stack(terms).mean()

    def _attention(self, teacher_probs: dict[int, torch.Tensor]) -> torch.Tensor:
        student_probs = self.taps[0].probs
        terms = []
        for s, t in self.pairs:
            if s not in student_probs or t not in teacher_probs:
                missing = self.taps[0].names[s] if s not in student_probs else self.taps[1].names[t]
                raise RecipeError(
                    f"{self.owner}: attention: true matches attention probabilities, which are read from "
                    "Hugging Face attention modules that return them (eager attention), and block "
                    f"'{missing}' returned none. Load the models with attn_implementation='eager', or set "
                    "attention: false."
                )
            got, want = student_probs[s], teacher_probs[t]
            if got.shape[0] != want.shape[0] or got.shape[2:] != want.shape[2:]:
                raise RecipeError(
                    f"{self.owner}: attention maps {tuple(got.shape)} (student) and {tuple(want.shape)} "
                    "(teacher) cover different positions; set attention: false."
                )
            terms.append(_attention_kl(got, want))
        return torch.stack(terms).mean()

    def build_projections(self, item: Any) -> None:
        """Run both models once on `item` (no gradients): check the outputs match and make a projection for
        each matched pair whose widths differ."""
        inputs, _ = self.split(item, "training item 0")
        reference, captured = self.teacher_pass(inputs, "training item 0")
        if self.taps:
            self.taps[0].clear()
        with torch.no_grad():
            out = self._forward(self.student, inputs, "student", "training item 0")
        if self.config.loss != "task":
            self._check_outputs(out, reference)
        if self.config.features is None:
            return
        generator = torch.Generator().manual_seed(0)
        projections: list[nn.Module] = []
        for s, t in self.pairs:
            got, want = self.taps[0].hidden.get(s), captured["hidden"].get(t)
            if got is None or want is None:
                self._features(captured["hidden"])  # raises, naming the block
                return
            dim = _width_dim(got, want, f"blocks '{self.taps[0].names[s]}' / '{self.taps[1].names[t]}'")
            projections.append(
                nn.Identity()
                if dim is None
                else _Projection(dim, got.shape[dim], want.shape[dim], generator).to(got.device)
            )
        if any(isinstance(p, _Projection) for p in projections):
            self.projections = nn.ModuleList(projections)
            log.info(
                "%s: %d learned projections of the student's width onto the teacher's (dropped after training)",
                self.owner,
                sum(isinstance(p, _Projection) for p in projections),
            )


# ------------------------------------------------------------------------------------------------
# Snapshots, checkpoints
# ------------------------------------------------------------------------------------------------


class _Snapshot:
    """A copy of some named tensors, kept in memory or (lean) in a temporary file."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, lean: bool) -> None:
        self.tensors = tensors
        self.lean = lean
        self.saved: dict[str, torch.Tensor] | None = None
        self.folder: tempfile.TemporaryDirectory[str] | None = None
        self.step = -1

    def take(self, step: int) -> None:
        self.step = step
        if not self.lean:
            self.saved = {k: v.detach().clone() for k, v in self.tensors.items()}
            return
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="modelpress-distill-")
        torch.save({k: v.detach() for k, v in self.tensors.items()}, Path(self.folder.name) / "last.pt")

    def restore(self) -> None:
        saved = (
            self.saved if not self.lean else torch.load(Path(self.folder.name) / "last.pt", weights_only=True)  # type: ignore[union-attr]
        )
        if saved is None:
            return
        with torch.no_grad():
            for key, value in saved.items():
                self.tensors[key].copy_(value)

    def close(self) -> None:
        self.saved = None
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


def _fingerprint(student: nn.Module, projections: nn.Module) -> list[list[Any]]:
    return [
        [name, list(t.shape), str(t.dtype)]
        for prefix, module in (("", student), ("projection.", projections))
        for name, t in ((prefix + k, v) for k, v in module.state_dict().items())
    ]


def _save(path: Path, state: dict[str, Any]) -> None:
    """Write a checkpoint atomically: to a temporary file in the folder, then renamed."""
    partial_path = path.with_name(f".{path.name}.partial")
    torch.save(state, partial_path)
    os.replace(partial_path, path)


# ------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------


def _stream(
    data: Dataset, *, epochs: int, steps: int | None, skip: int, owner: str
) -> Iterator[tuple[int, int, Any]]:
    """(epoch, index in the data, item) over `epochs` passes, each without its first `skip` items (held
    out); with `steps`, as many passes as it takes to give that many items."""
    done = 0
    epoch = -1
    while steps is not None or epoch + 1 < epochs:
        epoch += 1
        seen = 0
        for index, item in enumerate(data):
            if index < skip:
                continue
            yield epoch, index, item
            seen += 1
            done += 1
            if steps is not None and done >= steps:
                return
        if seen == 0:
            raise DataError(
                f"{owner}: the training data is empty"
                + (f" once the first {skip} batches are held out for early stopping" if skip else "")
                + "; pass more batches."
            )


def _total(data: Dataset, config: DistillConfig, skip: int) -> int | None:
    if config.steps is not None:
        return config.steps
    source = data.source
    return config.epochs * max(len(source) - skip, 0) if isinstance(source, Sized) else None


@contextlib.contextmanager
def _as_teacher(teacher: nn.Module | None) -> Iterator[None]:
    """The teacher in eval mode with caches off; its modes are put back after (it may be the user's model)."""
    if teacher is None:
        yield
        return
    modes = [(m, m.training) for m in teacher.modules()]
    teacher.eval()
    try:
        with no_cache(teacher):
            yield
    finally:
        for module, mode in modes:
            module.training = mode


class _Optimizers:
    """Adam over the trainable tensors: one fused Adam, or (lean) one per parameter stepped as soon as its
    gradient is complete, so the whole model's gradients never exist at once."""

    def __init__(self, student: list[nn.Parameter], extra: list[nn.Parameter], lr: float, *, lean: bool):
        self.handles: list[Any] = []
        self.all: list[torch.optim.Optimizer] = []
        self.stepped: list[torch.optim.Optimizer] = []  # stepped by the loop (the rest in backward)
        if lean:
            for p in student:
                own = torch.optim.Adam([p], lr=lr, fused=True)
                self.handles.append(p.register_post_accumulate_grad_hook(partial(_step_now, own)))
                self.all.append(own)
            if extra:
                self.stepped.append(torch.optim.Adam(extra, lr=lr, fused=True))
        elif student or extra:  # fused: one kernel per step, not one op per moment
            self.stepped.append(torch.optim.Adam([*student, *extra], lr=lr, fused=True))
        self.all += self.stepped

    def zero_grad(self) -> None:
        for opt in self.stepped:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.stepped:
            opt.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.all]

    def load_state_dict(self, states: list[dict[str, Any]], lr: float) -> None:
        for opt, state in zip(self.all, states, strict=True):
            opt.load_state_dict(state)
            for group in opt.param_groups:
                group["lr"] = lr  # the config's: a rerun after divergence may lower it

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _step_now(optimizer: torch.optim.Optimizer, _param: torch.Tensor) -> None:
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class _Best:
    """Early stopping: the best score so far (higher is better), its step and weights."""

    score: float = -math.inf
    step: int = 0
    bad: int = 0
    weights: dict[str, torch.Tensor] | None = None


def train(
    student: nn.Module,
    teacher: nn.Module | None,
    data: Dataset | Any,
    config: DistillConfig,
    *,
    owner: str = "distill",
    tag: str = "distill",
    metric: Metric | None = None,
    autocast: bool = False,
    lean: bool = False,
) -> float:
    """Train the student's trainable parameters (eval mode: BatchNorm statistics kept, dropout off) by
    `config` on `data`; returns the mean training loss. `tag` names the checkpoint file; `autocast`: the
    forward passes under bf16 autocast; `lean`: per-parameter Adam stepped in backward and snapshots on disk
    (big models). Raises `DataError` for unusable data, `RecipeError` for mismatched models or a diverging
    loss (the last weights whose loss was finite put back first)."""
    dataset = as_dataset(data)
    if dataset is None:
        raise DataError(
            f"{owner}: distillation trains on data: pass `data=` to compress (model inputs; no labels needed "
            "for loss kl or mse), or --data file.py:fn on the command line."
        )
    if config.needs_teacher and teacher is None:
        raise RecipeError(f"{owner}: loss {config.loss} needs a teacher model; none was given.")
    student.eval()
    objective = _Objective(student, teacher, config, owner=owner, autocast=autocast)
    try:
        with _as_teacher(teacher), no_cache(student), torch.enable_grad():
            return _loop(student, dataset, config, objective, owner=owner, tag=tag, metric=metric, lean=lean)
    finally:
        objective.remove()


def _loop(
    student: nn.Module,
    data: Dataset,
    config: DistillConfig,
    objective: _Objective,
    *,
    owner: str,
    tag: str,
    metric: Metric | None,
    lean: bool,
) -> float:
    first = next(iter(data.take(1)), None)
    if first is None:
        raise DataError(f"{owner}: the training data is empty; pass at least one batch.")
    objective.build_projections(first)
    holdout = [] if config.patience is None or metric is not None else list(data.take(_HOLDOUT))
    skip = len(holdout)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    extra = list(objective.projections.parameters())
    if not trainable:
        raise RecipeError(f"{owner}: the student has no trainable parameter (all have requires_grad=False).")
    optimizers = _Optimizers(list(trainable.values()), extra, config.lr, lean=lean)
    named = {**trainable, **{f"projection.{k}": v for k, v in objective.projections.named_parameters()}}
    last_good = _Snapshot(named, lean=lean)
    best = _Best()
    path = Path(config.checkpoint_dir) / f"{tag}.pt" if config.checkpoint_dir is not None else None
    total = _total(data, config, skip)
    start = 0
    try:
        if path is not None:
            start, best, finished = _resume(path, student, objective, optimizers, config, owner)
            if finished:
                return float("nan")
        if config.patience is not None and start == 0:
            _check(student, objective, holdout, metric, best, 0, config, owner)
        running, count, line_loss, line_count = 0.0, 0, 0.0, 0
        line_parts: dict[str, float] = {}
        clock = time.perf_counter()
        step = start
        stream = _stream(data, epochs=config.epochs, steps=config.steps, skip=skip, owner=owner)
        for _ in range(start):  # a resumed run skips the items already trained on
            next(stream, None)
        stopped = False
        for epoch, index, item in stream:
            where = f"training item {index} (epoch {epoch + 1})"
            value, parts = objective(item, where)
            if not torch.isfinite(value):
                _diverged(value, item, step, start, last_good, config, owner, where, path)
            if step == start or step % config.every == 0:
                last_good.take(step)  # weights whose loss is finite, before this step's update
            optimizers.zero_grad()
            value.backward()  # lean: each parameter's Adam steps in here
            optimizers.step()
            step += 1
            loss = float(value.detach())
            running, count = running + loss, count + 1
            line_loss, line_count = line_loss + loss, line_count + 1
            for k, v in parts.items():
                line_parts[k] = line_parts.get(k, 0.0) + v
            at_check = step % config.every == 0
            if at_check or step == start + 1 or step == total:
                _progress(owner, step, total, line_loss / line_count, line_parts, line_count, clock, start)
                line_loss, line_parts, line_count = 0.0, {}, 0
            if at_check and config.patience is not None:
                stopped = _check(student, objective, holdout, metric, best, step, config, owner)
            if path is not None and (at_check or stopped):
                _save(path, _state(step, student, objective, optimizers, best, finished=False))
            if stopped:
                break
        if config.patience is not None and not stopped and step % config.every:
            _check(student, objective, holdout, metric, best, step, config, owner)
        if config.patience is not None and best.weights is not None and best.step != step:
            with torch.no_grad():
                for key, value in best.weights.items():
                    named[key].copy_(value)
            log.info("%s: kept the weights of step %d (best score %.6g)", owner, best.step, best.score)
        if path is not None:
            _save(path, _state(step, student, objective, optimizers, best, finished=True))
        optimizers.zero_grad()
        mean = running / max(count, 1)
        log.info("%s: %d steps, mean loss %.4g", owner, step - start, mean)
        return mean
    finally:
        optimizers.remove()
        last_good.close()
        for p in student.parameters():
            p.grad = None


def _progress(
    owner: str,
    step: int,
    total: int | None,
    loss: float,
    parts: dict[str, float],
    count: int,
    clock: float,
    start: int,
) -> None:
    elapsed = time.perf_counter() - clock
    left = ""
    if total is not None and step > start:
        left = f", ~{elapsed / (step - start) * (total - step):.0f} s left"
    detail = ", ".join(f"{k} {v / count:.4g}" for k, v in parts.items())
    log.info(
        "%s: step %d%s loss %.4g (%s) %.0f s%s",
        owner,
        step,
        f"/{total}" if total is not None else "",
        loss,
        detail,
        elapsed,
        left,
    )


def _diverged(
    value: torch.Tensor,
    item: Any,
    step: int,
    start: int,
    last_good: _Snapshot,
    config: DistillConfig,
    owner: str,
    where: str,
    path: Path | None,
) -> None:
    leaves = [t for t in output_tensors(item) if t.is_floating_point()]
    if step == start or not all(torch.isfinite(t).all() for t in leaves):
        raise DataError(
            f"{owner}: the loss is {float(value.detach())} on {where} "
            f"{'before any update' if step == start else 'whose inputs hold NaN or Inf'}; the weights are "
            "unchanged by it. Check the data, the labels and both models' fp32 outputs on it."
        )
    last_good.restore()
    resume = (
        f" A rerun with a lower lr resumes from the last checkpoint in '{path.parent}'."
        if path is not None
        else ""
    )
    raise RecipeError(
        f"{owner}: training diverged: the loss became {float(value.detach())} at step {step + 1} ({where}); "
        f"the weights of step {last_good.step} (the last check whose loss was finite) are put back. Lower lr "
        f"(now {config.lr}){' or the temperature' if config.loss == 'kl' and config.temperature > 1 else ''}."
        + resume
    )


def _check(
    student: nn.Module,
    objective: _Objective,
    holdout: list[Any],
    metric: Metric | None,
    best: _Best,
    step: int,
    config: DistillConfig,
    owner: str,
) -> bool:
    """Score the student (metric, or minus the held-out loss); True when it is time to stop."""
    with torch.no_grad():
        if metric is not None:
            score = float(metric(student))
            student.eval()
        else:
            losses = [float(objective(item, f"held-out item {i}")[0]) for i, item in enumerate(holdout)]
            score = -sum(losses) / max(len(losses), 1)
    if not math.isfinite(score):
        log.warning(
            "%s: the early-stopping score is %s at step %d; not counted as better", owner, score, step
        )
    elif score > best.score:
        best.score, best.step, best.bad = score, step, 0
        named = dict(student.named_parameters())
        trainable = {k: v for k, v in named.items() if v.requires_grad}
        proj = {f"projection.{k}": v for k, v in objective.projections.named_parameters()}
        best.weights = {k: v.detach().clone() for k, v in {**trainable, **proj}.items()}
        log.info("%s: step %d: score %.6g (best)", owner, step, score)
        return False
    best.bad += 1
    log.info(
        "%s: step %d: score %.6g, best %.6g at step %d (%d/%s checks without improvement)",
        owner,
        step,
        score,
        best.score,
        best.step,
        best.bad,
        config.patience,
    )
    return config.patience is not None and best.bad >= config.patience


def _state(
    step: int,
    student: nn.Module,
    objective: _Objective,
    optimizers: _Optimizers,
    best: _Best,
    *,
    finished: bool,
) -> dict[str, Any]:
    return {
        "format": _FORMAT,
        "step": step,
        "finished": finished,
        "fingerprint": _fingerprint(student, objective.projections),
        "student": student.state_dict(),
        "projections": objective.projections.state_dict(),
        "optimizers": optimizers.state_dict(),
        "best": {"score": best.score, "step": best.step, "bad": best.bad, "weights": best.weights},
    }


def _resume(
    path: Path,
    student: nn.Module,
    objective: _Objective,
    optimizers: _Optimizers,
    config: DistillConfig,
    owner: str,
) -> tuple[int, _Best, bool]:
    """Load the checkpoint at `path` when there is one: (step to start at, early-stopping state, finished)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        return 0, _Best(), False
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which and what to do
        raise RecipeError(
            f"{owner}: the checkpoint '{path}' cannot be read ({type(exc).__name__}); delete it to start over."
        ) from exc
    if state.get("format") != _FORMAT or state.get("fingerprint") != _fingerprint(
        student, objective.projections
    ):
        raise RecipeError(
            f"{owner}: the checkpoint '{path}' was saved from another model (its tensors' names or shapes "
            "differ from this student's); delete it, or set another checkpoint_dir."
        )
    student.load_state_dict(state["student"])
    objective.projections.load_state_dict(state["projections"])
    optimizers.load_state_dict(state["optimizers"], config.lr)
    saved = state["best"]
    best = _Best(saved["score"], saved["step"], saved["bad"], saved["weights"])
    step = int(state["step"])
    done = bool(state["finished"]) and (config.steps is None or step >= config.steps)
    log.info(
        "%s: resumed from the checkpoint '%s' at step %d%s",
        owner,
        path,
        step,
        " (finished: nothing left to train)" if done else "",
    )
    return step, best, done


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def distill_step(
    model: nn.Module,
    config: DistillConfig,
    data: Dataset | Any = None,
    *,
    teacher: nn.Module | None = None,
    tag: str = "distill",
) -> nn.Module:
    """The `distill` step of a recipe: `compress` passes the model before the recipe as `teacher`."""
    if teacher is None and config.needs_teacher:
        raise RecipeError(
            "distill: a distill step needs a teacher: in a recipe run by compress it is the model before the "
            "recipe; to distill into a model you built, call modelpress.distill(student, teacher, data, config)."
        )
    train(model, teacher, data, config, owner="distill", tag=tag)
    return model


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset | Any,
    config: DistillConfig | None = None,
    *,
    metric: Metric | None = None,
) -> nn.Module:
    """Train `student` (in place, and returned) to match `teacher` on `data` as `config` says.

    `metric(student) -> float` (higher is better) scores the student every `config.every` steps for early
    stopping when `config.patience` is set; without it the loss on the first 4 batches, held out, is used.

    >>> teacher = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> student = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    >>> batches = [torch.randn(16, 8) for _ in range(4)]
    >>> distill(student, teacher, batches, DistillConfig(steps=4, lr=1e-2)) is student
    True
    """
    config = DistillConfig() if config is None else config
    if not isinstance(config, DistillConfig):
        raise RecipeError(f"distill: config must be a DistillConfig, got {type(config).__name__}.")
    for role, model in (("student", student), ("teacher", teacher)):
        if not isinstance(model, nn.Module):
            raise RecipeError(f"distill: the {role} must be a torch nn.Module, got {type(model).__name__}.")
    if student is teacher:
        raise RecipeError(
            "distill: the student and the teacher are the same object; pass a copy as the teacher "
            "(copy.deepcopy) or a different model."
        )
    train(student, teacher, data, config, owner="distill", tag="distill", metric=metric)
    return student


__all__ = [
    "DistillConfig",
    "as_recover",
    "distill",
    "distill_step",
    "layer_map",
    "old_recover_error",
    "train",
]
