"""Does the artifact compute what the torch model computes? Compared output by output, sample by sample."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.deploy.runtime import Session
from modelpress.errors import ParityError
from modelpress.loading import Inputs, as_inputs
from modelpress.outputs import output_tensors


@dataclass
class OutputParity:
    name: str
    max_abs: float
    mean_abs: float
    cosine: float  # mean over samples of the cosine between flattened per-item outputs
    min_cosine: float
    top1_agreement: float | None  # argmax over the last dim, for outputs that look like logits
    # With a reference (the uncompressed model): mean cosine of the artifact and of the torch model to it.
    artifact_fidelity: float | None = None
    torch_fidelity: float | None = None


@dataclass
class ParityReport:
    runtime: str
    samples: int
    outputs: list[OutputParity] = field(default_factory=list)
    passed: bool = True
    message: str = ""
    skipped_samples: int = 0  # samples whose shapes a static artifact does not take

    @property
    def worst(self) -> OutputParity:
        return min(self.outputs, key=lambda o: o.min_cosine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_outputs(model: nn.Module, inputs: Inputs) -> list[np.ndarray]:
    """Run the torch model and flatten its outputs in the order the ONNX exporter uses (pytree order)."""
    with torch.no_grad():
        out = model(*inputs)
    leaves = output_tensors(out)
    return [leaf.detach().float().numpy() if leaf.is_floating_point() else leaf.numpy() for leaf in leaves]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a2 = a.reshape(a.shape[0], -1).astype(np.float64) if a.ndim else a.reshape(1, 1).astype(np.float64)
    b2 = b.reshape(b.shape[0], -1).astype(np.float64) if b.ndim else b.reshape(1, 1).astype(np.float64)
    num = (a2 * b2).sum(1)
    den = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    # Two all-zero rows agree perfectly; one zero row against a non-zero one does not.
    return np.where(den > 0, num / np.maximum(den, 1e-30), np.where(np.abs(a2 - b2).max(1) == 0, 1.0, 0.0))


def check_parity(
    model: nn.Module,
    session: Session,
    samples: Iterable[Any],
    *,
    min_cosine: float = 0.999,
    min_top1: float | None = None,
    max_abs: float | None = None,
    reference: nn.Module | None = None,
    fidelity_tolerance: float = 0.002,
    raise_on_failure: bool = True,
    memo: dict[tuple[int, int], list[np.ndarray]] | None = None,
) -> ParityReport:
    """Compare `session` with `model` on `samples` (each a tensor or tuple of tensors).

    Fails when any output's worst per-item cosine is below `min_cosine` (or top-1 agreement / max abs
    error break their bounds, when given), naming the worst output.

    With quantized activations an exact match is not to be had: a runtime's integer kernels round a few
    values to the neighbouring code, and a deep model amplifies that into a visibly different output even
    though it is no worse. Given `reference` (the uncompressed model), an output whose direct cosine falls
    short still passes when the artifact is as faithful to the reference as the torch model is: its mean
    cosine to the reference is at most `fidelity_tolerance` below the torch model's.

    `memo` (a dict the caller keeps) shares the torch outputs between calls on the same `samples` list, so
    checking several runtimes runs each torch model once per sample.

    >>> report = check_parity(model, open_session("m.onnx"), [example_inputs])  # doctest: +SKIP
    """

    def expected(module: nn.Module, index: int, inputs: Inputs) -> list[np.ndarray]:
        if memo is None:
            return torch_outputs(module, inputs)
        key = (id(module), index)
        if key not in memo:
            memo[key] = torch_outputs(module, inputs)
        return memo[key]

    acc: dict[int, dict[str, list[Any]]] = {}
    n = skipped = 0
    for index, sample in enumerate(samples):
        inputs = as_inputs(sample, where="parity sample")
        if not _fits(inputs, session):
            skipped += 1  # a static artifact (export fell back from dynamic shapes) takes only its own shapes
            continue
        ref = expected(model, index, inputs)
        got = session.run([t.numpy() for t in inputs])
        base = expected(reference, index, inputs) if reference is not None else None
        if len(ref) != len(got):
            raise ParityError(
                f"The artifact has {len(got)} outputs but the torch model returns {len(ref)}; re-export it "
                "from this model."
            )
        for i, (r, g) in enumerate(zip(ref, got, strict=True)):
            if r.shape != g.shape:
                raise ParityError(
                    f"Output '{session.output_names[i]}' has shape {g.shape} in {session.runtime} but "
                    f"{r.shape} in torch; the artifact does not match this model or these inputs."
                )
            slot = acc.setdefault(i, {"abs": [], "cos": [], "top1": [], "art_fid": [], "sim_fid": []})
            if base is not None and base[i].shape == r.shape:
                slot["art_fid"].append(_cosines(g, base[i]))
                slot["sim_fid"].append(_cosines(r, base[i]))
            diff = np.abs(r.astype(np.float64) - g.astype(np.float64))
            slot["abs"].append(diff.reshape(-1))
            slot["cos"].append(_cosines(r, g))
            if np.issubdtype(r.dtype, np.floating) and r.ndim >= 2 and r.shape[-1] > 1:
                slot["top1"].append((r.argmax(-1) == g.argmax(-1)).reshape(-1))
        n += 1
    if n == 0:
        if skipped:
            raise ParityError(
                f"None of the {skipped} parity samples fits the artifact's fixed input shapes "
                f"{_shapes_text(session)} in {session.runtime}; give samples of those shapes."
            )
        raise ParityError("No samples were given to the parity check; pass at least one input batch.")
    report = ParityReport(runtime=session.runtime, samples=n, skipped_samples=skipped)
    for i, slot in acc.items():
        diffs = np.concatenate(slot["abs"])
        cos = np.concatenate(slot["cos"])
        top1 = float(np.concatenate(slot["top1"]).mean()) if slot["top1"] else None
        report.outputs.append(
            OutputParity(
                name=session.output_names[i],
                max_abs=float(diffs.max()) if diffs.size else 0.0,
                mean_abs=float(diffs.mean()) if diffs.size else 0.0,
                cosine=float(cos.mean()),
                min_cosine=float(cos.min()),
                top1_agreement=top1,
                artifact_fidelity=float(np.concatenate(slot["art_fid"]).mean()) if slot["art_fid"] else None,
                torch_fidelity=float(np.concatenate(slot["sim_fid"]).mean()) if slot["sim_fid"] else None,
            )
        )
    failures = []
    for o in report.outputs:
        as_faithful = (
            o.artifact_fidelity is not None
            and o.torch_fidelity is not None
            and o.artifact_fidelity >= o.torch_fidelity - fidelity_tolerance
        )
        if o.min_cosine < min_cosine and not as_faithful:
            detail = (
                f" and its cosine to the uncompressed model {o.artifact_fidelity:.6f} is more than "
                f"{fidelity_tolerance} below the torch model's {o.torch_fidelity:.6f}"
                if o.artifact_fidelity is not None and o.torch_fidelity is not None
                else ""
            )
            failures.append(f"output '{o.name}': worst cosine {o.min_cosine:.6f} < {min_cosine}{detail}")
        if min_top1 is not None and o.top1_agreement is not None and o.top1_agreement < min_top1:
            failures.append(f"output '{o.name}': top-1 agreement {o.top1_agreement:.4f} < {min_top1}")
        if max_abs is not None and o.max_abs > max_abs:
            failures.append(f"output '{o.name}': max abs error {o.max_abs:.3g} > {max_abs}")
    if failures:
        report.passed = False
        report.message = (
            f"Parity check failed in {session.runtime} over {n} samples: {'; '.join(failures)}. The artifact "
            "does not compute what the torch model does: re-export it from this model, or check for ops the "
            "runtime implements differently (compare with --runtime onnxruntime)."
        )
        if raise_on_failure:
            raise ParityError(report.message)
    return report


def _fits(inputs: Inputs, session: Session) -> bool:
    shapes = getattr(session, "input_shapes", None)
    if shapes is None or len(shapes) != len(inputs):
        return True  # the runtime will say what is wrong
    return all(
        len(want) == t.ndim and all(w is None or w == d for w, d in zip(want, t.shape, strict=True))
        for want, t in zip(shapes, inputs, strict=True)
    )


def _shapes_text(session: Session) -> str:
    return ", ".join(
        f"{name} {tuple('?' if d is None else d for d in shape)}"
        for name, shape in zip(session.input_names, session.input_shapes, strict=True)
    )


def parity_inputs(example: Inputs, *, count: int = 4, seed: int = 0) -> list[Inputs]:
    """Samples for a parity check when the user gives no data: the example plus seeded perturbations.

    Float inputs get Gaussian noise of their own scale; integer inputs (token ids, masks) are kept. The
    last sample has one more item in the batch, so a batch dim that was fixed at export is caught.
    """
    gen = torch.Generator().manual_seed(seed)
    out: list[Inputs] = [example]
    count -= 1
    for _ in range(count - 1):
        sample = []
        for t in example:
            if t.is_floating_point():
                scale = t.float().std().clamp(min=1e-3) if t.numel() > 1 else torch.tensor(1.0)
                t = t + 0.1 * scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            sample.append(t)
        out.append(tuple(sample))
    out.append(tuple(torch.cat([t, t[:1]]) if t.ndim else t for t in example))
    return out


def summary_line(report: ParityReport) -> str:
    w = report.worst
    top1 = f", top-1 {w.top1_agreement:.4f}" if w.top1_agreement is not None else ""
    status = "ok" if report.passed else "FAILED"
    return f"{report.runtime}: parity {status} (worst output '{w.name}': cosine {w.min_cosine:.6f}, max abs {w.max_abs:.3g}{top1})"


__all__: Sequence[str] = ["OutputParity", "ParityReport", "check_parity", "parity_inputs", "torch_outputs"]
