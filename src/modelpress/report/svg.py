"""Small inline-SVG charts for the HTML report: horizontal bars and dot strips. No script, no fonts, no network.

Each chart is one `<svg>` string sized by its viewBox, so it scales down with the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Colours by role; the baseline is grey so that it never reads as a result.
COLOURS = {
    "baseline": "#98a2b3",
    "subject": "#4f6bed",
    "good": "#0a7d32",
    "bad": "#b3261e",
    "warn": "#c77700",
}
_FONT = "font-family='system-ui,sans-serif' font-size='12'"
_CHAR_W = 7.6  # generous average advance of a 12px sans-serif character, to size the label column
_ROW_H = 22
_TOP = 30  # title line
_AXIS_H = 24  # tick labels under the plot area


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    role: str = "subject"  # a key of COLOURS
    note: str = ""  # printed after the value


@dataclass(frozen=True)
class Strip:
    label: str
    points: Sequence[float]  # one value per round
    median: float
    low: float  # p10
    high: float  # p90
    role: str = "subject"


@dataclass
class _Frame:
    """Maps data values to x pixels inside the plot area of one chart."""

    lo: float
    hi: float
    left: float
    right: float
    ticks: list[float] = field(default_factory=list)

    def x(self, value: float) -> float:
        span = self.hi - self.lo or 1.0
        return self.left + (min(max(value, self.lo), self.hi) - self.lo) / span * (self.right - self.left)


def _e(value: object) -> str:
    return html.escape(str(value))


def _short(label: str, limit: int) -> str:
    """Keep the end of a long dotted name (the part that tells layers apart)."""
    return label if len(label) <= limit else "…" + label[-(limit - 1) :]


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [lo, hi].

    >>> nice_ticks(0.0, 1.0)
    [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    """
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


def _frame(
    values: Sequence[float],
    *,
    left: float,
    right: float,
    reference: float | None,
    fmt: Callable[[float], str],
    from_zero: bool = False,
    tick_scale: float = 1.0,
) -> _Frame:
    """The axis for `values`: padded, ending on round ticks (round in units of `tick_scale`), from zero for
    bars of non-negative values, with as many ticks as fit their labels."""
    finite = [v for v in values if math.isfinite(v)]
    if reference is not None:
        finite.append(reference)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    zero_based = from_zero and lo >= 0
    if zero_based:
        lo, hi = 0.0, hi or 1.0
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    pad = 0.06 * (hi - lo)
    # a positive quantity (a ratio, a time) never gets an axis below zero
    lo, hi = (lo if zero_based else max(lo - pad, 0.0) if lo >= 0 else lo - pad), hi + pad
    widest = max(len(fmt(lo)), len(fmt(hi)), 3)
    count = max(2, min(6, int((right - left) / (widest * _CHAR_W + 16))))
    ticks = [t * tick_scale for t in nice_ticks(lo / tick_scale, hi / tick_scale, count)]
    # widen to the outer ticks so the axis ends on round numbers
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    if ticks[0] > lo + 1e-12 * step:
        ticks.insert(0, ticks[0] - step)
    if ticks[-1] < hi - 1e-12 * step:
        ticks.append(ticks[-1] + step)
    return _Frame(lo=ticks[0], hi=ticks[-1], left=left, right=right, ticks=[round(t, 10) for t in ticks])


def _tick_text(t: float) -> str:
    return f"{t:g}"


def _axis(frame: _Frame, top: float, bottom: float, fmt: Callable[[float], str]) -> list[str]:
    out = []
    for t in frame.ticks:
        x = frame.x(t)
        out.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{top}' y2='{bottom}' stroke='#e6e8ee'/>")
        out.append(
            f"<text x='{x:.1f}' y='{bottom + 15}' text-anchor='middle' fill='#667085'>{_e(fmt(t))}</text>"
        )
    return out


def _reference_line(frame: _Frame, value: float | None, label: str, top: float, bottom: float) -> list[str]:
    if value is None:
        return []
    x = frame.x(value)
    out = [
        f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{top - 4}' y2='{bottom}' stroke='#1d2330' stroke-dasharray='4 3'/>"
    ]
    if label:
        out.append(f"<text x='{x:.1f}' y='{top - 7}' text-anchor='middle' fill='#1d2330'>{_e(label)}</text>")
    return out


def _svg(width: int, height: float, title: str, body: list[str], desc: str) -> str:
    return (
        f"<svg class='chart' role='img' aria-label='{_e(title)}' viewBox='0 0 {width} {height:.0f}' "
        f"width='{width}' height='{height:.0f}' {_FONT}><title>{_e(desc or title)}</title>"
        f"<text x='0' y='14' font-weight='600' fill='#1d2330'>{_e(title)}</text>" + "".join(body) + "</svg>"
    )


def bars(
    title: str,
    items: Sequence[Bar],
    *,
    fmt: Callable[[float], str] = _tick_text,
    tick_fmt: Callable[[float], str] | None = None,
    reference: float | None = None,
    reference_label: str = "",
    width: int = 520,
    label_chars: int = 26,
    tick_scale: float = 1.0,
    desc: str = "",
) -> str:
    """Horizontal bars, one per item, from zero (or the axis start) to its value; a dashed reference line.

    >>> "<svg" in bars("size", [Bar("fp32", 1.0, "baseline"), Bar("int8", 0.26)], reference=1.0)
    True
    """
    label_w = min(max((len(b.label) for b in items), default=4), label_chars) * _CHAR_W + 8
    value_w = 8 + _CHAR_W * max((len(fmt(b.value) + b.note) for b in items), default=4)
    values = [b.value for b in items] + [0.0]
    width = max(width, int(label_w + 150 + value_w))  # at least 150 px of plot between labels and values
    frame = _frame(
        values,
        left=label_w,
        right=width - value_w,
        reference=reference,
        fmt=tick_fmt or fmt,
        from_zero=True,
        tick_scale=tick_scale,
    )
    top = _TOP + (10 if reference_label else 0)
    bottom = top + _ROW_H * len(items)
    body = _axis(frame, top, bottom, tick_fmt or fmt)
    body += _reference_line(frame, reference, reference_label, top, bottom)
    zero = frame.x(max(frame.lo, min(0.0, frame.hi)))
    for i, b in enumerate(items):
        y = top + i * _ROW_H
        body.append(
            f"<text x='{label_w - 8:.1f}' y='{y + 15}' text-anchor='end' fill='#1d2330'>"
            f"<title>{_e(b.label)}</title>{_e(_short(b.label, label_chars))}</text>"
        )
        if not math.isfinite(b.value):
            body.append(f"<text x='{zero + 4:.1f}' y='{y + 15}' fill='#667085'>{_e(fmt(b.value))}</text>")
            continue
        x = frame.x(b.value)
        x0, x1 = sorted((zero, x))
        body.append(
            f"<rect x='{x0:.1f}' y='{y + 4}' width='{max(x1 - x0, 1.0):.1f}' height='{_ROW_H - 8}' rx='2' "
            f"fill='{COLOURS.get(b.role, COLOURS['subject'])}'/>"
        )
        body.append(f"<text x='{x1 + 4:.1f}' y='{y + 15}' fill='#1d2330'>{_e(fmt(b.value) + b.note)}</text>")
    return _svg(width, bottom + _AXIS_H, title, body, desc)


def strips(
    title: str,
    rows: Sequence[Strip],
    *,
    fmt: Callable[[float], str] = _tick_text,
    reference: float | None = 1.0,
    reference_label: str = "",
    width: int = 520,
    label_chars: int = 30,
    desc: str = "",
) -> str:
    """One row per series: every round as a dot, the p10-p90 interval as a box, the median as a bar.

    A round far outside every box is drawn hollow at the edge of the axis.

    >>> "<circle" in strips("b1", [Strip("int8 / fp32", [0.9, 1.0, 1.1], 1.0, 0.92, 1.08)])
    True
    """
    label_w = min(max((len(r.label) for r in rows), default=4), label_chars) * _CHAR_W + 8
    boxes = [r.low for r in rows] + [r.high for r in rows] + [r.median for r in rows]
    if reference is not None:
        boxes.append(reference)
    # rounds far outside every box would squeeze the boxes into a corner: the axis reaches one box-span beyond
    # them, and rounds past that are drawn hollow at its edge
    span = max(max(boxes) - min(boxes), 0.05 * max(abs(v) for v in boxes) or 0.05)
    lo_cap, hi_cap = min(boxes) - span, max(boxes) + span
    points = [p for r in rows for p in r.points if math.isfinite(p)]
    values = boxes + [min(max(p, lo_cap), hi_cap) for p in points]
    frame = _frame(values, left=label_w, right=width - 16, reference=reference, fmt=fmt)
    top = _TOP + (10 if reference_label else 0)
    row_h = _ROW_H + 4
    bottom = top + row_h * len(rows)
    body = _axis(frame, top, bottom, fmt)
    for i, r in enumerate(rows):
        y = top + i * row_h
        mid = y + row_h / 2
        colour = COLOURS.get(r.role, COLOURS["subject"])
        body.append(
            f"<text x='{label_w - 8:.1f}' y='{mid + 4:.1f}' text-anchor='end' fill='#1d2330'>"
            f"<title>{_e(r.label)}</title>{_e(_short(r.label, label_chars))}</text>"
        )
        x0, x1 = frame.x(r.low), frame.x(r.high)
        body.append(
            f"<rect x='{x0:.1f}' y='{mid - 7:.1f}' width='{max(x1 - x0, 1.0):.1f}' height='14' rx='2' "
            f"fill='{colour}' fill-opacity='0.18' stroke='{colour}'/>"
        )
        for j, p in enumerate(r.points):
            if math.isfinite(p):
                # a small vertical jitter (by round index) keeps coincident rounds visible
                dy = ((j % 3) - 1) * 3
                inside = frame.lo <= p <= frame.hi
                fill = f"fill='{colour}' fill-opacity='0.75'" if inside else f"fill='none' stroke='{colour}'"
                body.append(
                    f"<circle cx='{frame.x(p):.1f}' cy='{mid + dy:.1f}' r='2.6' {fill}>"
                    f"<title>{_e(fmt(p))}</title></circle>"
                )
        xm = frame.x(r.median)
        body.append(
            f"<line x1='{xm:.1f}' x2='{xm:.1f}' y1='{mid - 9:.1f}' y2='{mid + 9:.1f}' stroke='#1d2330' "
            "stroke-width='2'/>"
        )
    body += _reference_line(frame, reference, reference_label, top, bottom)
    return _svg(width, bottom + _AXIS_H, title, body, desc)


@dataclass(frozen=True)
class Point:
    label: str  # the x tick (a strength such as "0.5" or "int4")
    value: float
    role: str = "subject"  # a key of COLOURS
    ring: bool = False  # drawn with a ring (the point that was kept)


def line(
    title: str,
    points: Sequence[Point],
    *,
    fmt: Callable[[float], str] = _tick_text,
    reference: float | None = None,
    reference_label: str = "",
    x_title: str = "",
    width: int = 460,
    height: int = 220,
    desc: str = "",
) -> str:
    """A line through `points` in their order (x is categorical: the steps as taken), a dashed horizontal
    reference line (a floor), each point coloured by its role.

    >>> "<polyline" in line("quality", [Point("0.3", 0.99), Point("0.5", 0.97, "bad")], reference=0.98)
    True
    """
    values = [p.value for p in points]
    widest = max([len(fmt(v)) for v in values if math.isfinite(v)] + [len(fmt(reference or 0.0)), 3])
    left, right = widest * _CHAR_W + 12, width - 16
    top, bottom = _TOP + 8, height - _AXIS_H - (16 if x_title else 0)
    # the vertical axis: the same padded round ticks as the bars, laid out along y
    frame = _frame(values, left=top, right=bottom, reference=reference, fmt=fmt)

    def y(v: float) -> float:
        return bottom - (frame.x(v) - top)

    def x(i: int) -> float:
        return left + (i + 0.5) * (right - left) / max(len(points), 1)

    body = []
    for t in frame.ticks:
        body.append(f"<line x1='{left}' x2='{right}' y1='{y(t):.1f}' y2='{y(t):.1f}' stroke='#e6e8ee'/>")
        body.append(
            f"<text x='{left - 6:.1f}' y='{y(t) + 4:.1f}' text-anchor='end' fill='#667085'>{_e(fmt(t))}</text>"
        )
    if reference is not None:
        ry = y(reference)
        body.append(
            f"<line x1='{left}' x2='{right}' y1='{ry:.1f}' y2='{ry:.1f}' stroke='{COLOURS['bad']}' "
            "stroke-dasharray='5 3'/>"
        )
        if reference_label:
            body.append(
                f"<text x='{right:.1f}' y='{ry - 5:.1f}' text-anchor='end' fill='{COLOURS['bad']}'>"
                f"{_e(reference_label)}</text>"
            )
    finite = [(x(i), y(p.value)) for i, p in enumerate(points) if math.isfinite(p.value)]
    if len(finite) > 1:
        coords = " ".join(f"{a:.1f},{b:.1f}" for a, b in finite)
        body.append(
            f"<polyline points='{coords}' fill='none' stroke='{COLOURS['subject']}' stroke-width='1.5'/>"
        )
    for i, p in enumerate(points):
        body.append(
            f"<text x='{x(i):.1f}' y='{bottom + 15}' text-anchor='middle' fill='#667085'>{_e(p.label)}</text>"
        )
        if not math.isfinite(p.value):
            continue
        colour = COLOURS.get(p.role, COLOURS["subject"])
        if p.ring:
            body.append(
                f"<circle cx='{x(i):.1f}' cy='{y(p.value):.1f}' r='7' fill='none' stroke='{colour}' "
                "stroke-width='2'/>"
            )
        body.append(
            f"<circle cx='{x(i):.1f}' cy='{y(p.value):.1f}' r='3.5' fill='{colour}'>"
            f"<title>{_e(p.label)}: {_e(fmt(p.value))}</title></circle>"
        )
    if x_title:
        body.append(
            f"<text x='{(left + right) / 2:.1f}' y='{bottom + 32}' text-anchor='middle' fill='#1d2330'>"
            f"{_e(x_title)}</text>"
        )
    return _svg(width, height, title, body, desc)


def _heat(share: float) -> str:
    """White (no loss) to the 'bad' red (the largest loss), by `share` in [0, 1]."""
    share = min(max(share, 0.0), 1.0)
    low, high = (255, 255, 255), (0xB3, 0x26, 0x1E)
    r, g, b = (round(a + (z - a) * share) for a, z in zip(low, high, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(
    title: str,
    rows: Sequence[str],
    columns: Sequence[str],
    cells: Callable[[str, str], float | None],
    *,
    fmt: Callable[[float], str] = _tick_text,
    label_chars: int = 30,
    cell_w: int = 84,
    desc: str = "",
) -> str:
    """A grid, one row per `rows` entry and one column per `columns` entry, each cell shaded by its value
    (white 0 to red at the largest) with the value written in it; None cells are grey and read '-'.

    >>> "<rect" in heatmap("drop", ["fc1"], ["bits@4"], lambda r, c: 0.01)
    True
    """
    label_w = min(max((len(r) for r in rows), default=4), label_chars) * _CHAR_W + 8
    cell_w = max(cell_w, int(max((len(c) for c in columns), default=4) * _CHAR_W) + 10)  # headers fit
    values = [v for r in rows for c in columns if (v := cells(r, c)) is not None and math.isfinite(v)]
    peak = max([v for v in values if v > 0], default=1.0)
    top = _TOP + 8
    body = []
    for j, c in enumerate(columns):
        cx = label_w + j * cell_w + cell_w / 2
        body.append(f"<text x='{cx:.1f}' y='{top + 10}' text-anchor='middle' fill='#667085'>{_e(c)}</text>")
    top += 18
    for i, r in enumerate(rows):
        y = top + i * _ROW_H
        body.append(
            f"<text x='{label_w - 8:.1f}' y='{y + 15}' text-anchor='end' fill='#1d2330'>"
            f"<title>{_e(r)}</title>{_e(_short(r, label_chars))}</text>"
        )
        for j, c in enumerate(columns):
            v = cells(r, c)
            x = label_w + j * cell_w
            known = v is not None and math.isfinite(v)
            fill = _heat(v / peak) if known and v is not None else "#eef0f4"
            text = fmt(v) if known and v is not None else "-"
            ink = "#ffffff" if known and v is not None and v / peak > 0.6 else "#1d2330"
            body.append(
                f"<rect x='{x + 1:.1f}' y='{y + 1}' width='{cell_w - 2}' height='{_ROW_H - 2}' fill='{fill}'>"
                f"<title>{_e(r)} {_e(c)}: {_e(text)}</title></rect>"
            )
            body.append(
                f"<text x='{x + cell_w / 2:.1f}' y='{y + 15}' text-anchor='middle' fill='{ink}'>{_e(text)}</text>"
            )
    width = int(label_w + cell_w * max(len(columns), 1) + 8)
    return _svg(width, top + _ROW_H * len(rows) + 8, title, body, desc)
