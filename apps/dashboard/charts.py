"""Geometry of the dashboard's SVG charts, drawn server-side.

These functions turn numbers into coordinates and plain-text labels. The
templates under templates/dashboard/charts/ draw them, so Django's autoescape
covers every label, model and node names included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# The SVG coordinate system; the browser scales it to the page width.
WIDTH = 480
HEIGHT = 200
LEFT = 64
RIGHT = 12
TOP = 14
BOTTOM = 30
Y_TICKS = 5


@dataclass(frozen=True)
class Tick:
    position: float
    label: str
    # SVG text-anchor: the first and last x labels align inwards to stay inside.
    anchor: str = "middle"


@dataclass(frozen=True)
class Line:
    """One series, as polyline point lists split wherever a value is missing."""

    name: str
    css: str
    segments: list[str]
    # Points with no neighbour, drawn as dots because a one-point polyline is invisible.
    dots: list[tuple[float, float]]
    latest: str
    peak: str


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    label: str
    value: str
    css: str

    @property
    def center(self) -> float:
        return self.x + self.width / 2


@dataclass(frozen=True)
class Chart:
    """Everything a chart template draws."""

    title: str
    description: str
    lines: list[Line]
    bars: list[Bar]
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    empty: bool
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    baseline: int = HEIGHT - BOTTOM

    @property
    def right_edge(self) -> int:
        return self.width - RIGHT


def nice_ceiling(value: float) -> float:
    """Round ``value`` up to Y_TICKS steps of 1, 2 or 5 times a power of ten.

    Every tick is then a round number. Zero gives one step per unit.
    """
    if value <= 0:
        return float(Y_TICKS)
    smallest_step = value / Y_TICKS
    power = 10 ** math.floor(math.log10(smallest_step))
    for step in (1, 2, 5, 10):
        if smallest_step <= step * power * (1 + 1e-9):
            return step * power * Y_TICKS
    return 10 * power * Y_TICKS


def format_value(value: float, unit: str) -> str:
    """Format a number for a tick or a tooltip: integers plain, others to two or three digits."""
    if unit == "ms" and value >= 1000:
        return f"{value / 1000:.3g} s"
    text = (
        f"{value:.0f}" if value == int(value) or abs(value) >= 100 else f"{value:.3g}"
    )
    return f"{text} {unit}".strip()


def _y_ticks(top_value: float, unit: str) -> list[Tick]:
    plot = HEIGHT - BOTTOM - TOP
    return [
        Tick(
            HEIGHT - BOTTOM - plot * i / Y_TICKS,
            format_value(top_value * i / Y_TICKS, unit),
        )
        for i in range(Y_TICKS + 1)
    ]


def line_chart(
    *,
    title: str,
    xs: Sequence[float],
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    x_label: Callable[[float], str],
    unit: str,
    width: int = WIDTH,
) -> Chart:
    """Lay out series of (name, CSS class, values) against shared x values.

    A None value breaks its line, so gaps in the data show as gaps.
    """
    values = [v for _, _, vs in series for v in vs if v is not None]
    top_value = nice_ceiling(max(values, default=0.0))
    plot_width = width - LEFT - RIGHT
    plot_height = HEIGHT - BOTTOM - TOP
    x_min, x_max = (min(xs), max(xs)) if xs else (0.0, 1.0)
    x_span = (x_max - x_min) or 1.0

    def x_at(x: float) -> float:
        return LEFT + plot_width * (x - x_min) / x_span

    def y_at(v: float) -> float:
        return HEIGHT - BOTTOM - plot_height * v / top_value

    lines = []
    for name, css, series_values in series:
        runs: list[list[tuple[float, float]]] = [[]]
        for x, v in zip(xs, series_values, strict=True):
            if v is None:
                runs.append([])
            else:
                runs[-1].append((x_at(x), y_at(v)))
        segments = [
            " ".join(f"{px:.1f},{py:.1f}" for px, py in run)
            for run in runs
            if len(run) > 1
        ]
        dots = [run[0] for run in runs if len(run) == 1]
        present = [v for v in series_values if v is not None]
        latest = format_value(present[-1], unit) if present else "none"
        peak = format_value(max(present), unit) if present else "none"
        lines.append(Line(name, css, segments, dots, latest, peak))

    description = "; ".join(
        f"{line.name}: latest {line.latest}, highest {line.peak}" for line in lines
    )
    x_ticks = _x_ticks([(x_at(x), x_label(x)) for x in xs])
    return Chart(
        title,
        description,
        lines,
        [],
        x_ticks,
        _y_ticks(top_value, unit),
        not values,
        width=width,
    )


def _x_ticks(positions: list[tuple[float, str]], count: int = 4) -> list[Tick]:
    """Pick ``count`` evenly spaced labels, the first and the last included."""
    if not positions:
        return []
    step = (len(positions) - 1) / max(1, count - 1)
    indexes = sorted({round(i * step) for i in range(min(count, len(positions)))})
    ticks = []
    for i in indexes:
        anchor = "middle"
        if i == 0:
            anchor = "start"
        elif i == len(positions) - 1:
            anchor = "end"
        ticks.append(Tick(positions[i][0], positions[i][1], anchor))
    return ticks


def bar_chart(
    *,
    title: str,
    items: Sequence[tuple[str, float]],
    unit: str,
    css: Callable[[str], str] = lambda label: "",
    width: int = WIDTH,
) -> Chart:
    """Lay out one bar per (label, value), in the given order."""
    top_value = nice_ceiling(max((value for _, value in items), default=0.0))
    plot_width = width - LEFT - RIGHT
    plot_height = HEIGHT - BOTTOM - TOP
    slot = plot_width / max(1, len(items))
    bars = []
    for index, (label, value) in enumerate(items):
        height = plot_height * value / top_value
        bars.append(
            Bar(
                x=LEFT + index * slot + slot * 0.15,
                y=HEIGHT - BOTTOM - height,
                width=slot * 0.7,
                height=height,
                label=label,
                value=format_value(value, unit),
                css=css(label),
            )
        )
    description = "; ".join(f"{bar.label}: {bar.value}" for bar in bars)
    empty = not any(value for _, value in items)
    return Chart(
        title, description, [], bars, [], _y_ticks(top_value, unit), empty, width=width
    )
