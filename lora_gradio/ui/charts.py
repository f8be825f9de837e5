"""The loss chart as inline SVG: raw and smoothed loss, the held-out (validation) loss, the learning rate and epoch
boundaries, each point with its values in the page (a hover title, ``data-`` attributes), so people and tests read
the same numbers."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence

SMOOTHING = 0.9
MAX_POINTS = 500  # the curve keeps its shape; the page gets at most this many points
WIDTH, HEIGHT = 480, 240  # about the chart's width on a 1024 px screen, so its 12 px text stays 12 px there
LEFT, RIGHT, TOP, BOTTOM = 50, 52, 24, 36  # room for the axes' numbers and titles
FONT_PX = 12
Point = tuple[int, float, float | None]  # step, loss, learning rate
Score = tuple[int, int, float]  # step, epoch, held-out loss
VALIDATION_COLOUR = "#15803d"


def smoothed(losses: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the early steps are averages of what was seen, not pulled to zero."""
    values, average = [], 0.0
    for index, loss in enumerate(losses, start=1):
        average = weight * average + (1 - weight) * loss
        values.append(average / (1 - weight ** index))
    return values


def ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About ``count`` round numbers from ``low`` to ``high``."""
    span = high - low
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def padded(values: list[float]) -> tuple[float, float]:
    """A value range with a margin, never empty."""
    low, high = min(values), max(values)
    margin = (high - low) * 0.05 or abs(high) * 0.1 or 1.0
    return low - margin, high + margin


def thinned(points: list[Point], limit: int = MAX_POINTS) -> list[Point]:
    """Every n-th point of a long run, and always the last."""
    every = max(1, math.ceil(len(points) / limit))
    return [p for i, p in enumerate(points) if i % every == 0 or i == len(points) - 1]


def loss_chart(points: list[Point], steps_per_epoch: int = 0, scores: Sequence[Score] = ()) -> str:
    """The chart for the Train tab, with the held-out ``scores`` on the same axes; an explanation instead while
    there is no step yet."""
    if not points:
        return ('<div id="loss-chart-empty" class="loss-chart-empty">The loss curve appears here with the first '
                'training step.</div>')
    steps = [p[0] for p in points]
    smooth = dict(zip(steps, smoothed([p[1] for p in points]), strict=True))
    shown_points = thinned(points)
    x_low, x_high = min(steps[0], 1) - 0.5, steps[-1] + 0.5
    y_low, y_high = padded([p[1] for p in shown_points] + [score[2] for score in scores])
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(step: float) -> float:
        return LEFT + (step - x_low) / (x_high - x_low) * plot_w

    def y(value: float, low: float = y_low, high: float = y_high) -> float:
        return TOP + (high - value) / (high - low) * plot_h

    parts = [f'<svg id="loss-chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" '
             f'aria-label="Loss over {len(points)} steps" style="max-height:{HEIGHT * 1.5:.0f}px;'
             f'font:{FONT_PX}px sans-serif">']
    for value in ticks(y_low, y_high):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                     f'stroke="#8884" /><text x="{LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end" '
                     f'fill="currentColor">{value:.3g}</text>')
    for value in ticks(max(x_low, 0), x_high):
        parts.append(f'<text x="{x(value):.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle" '
                     f'fill="currentColor">{value:g}</text>')
    if steps_per_epoch:
        for boundary in range(steps_per_epoch, steps[-1] + 1, steps_per_epoch):
            epoch = boundary // steps_per_epoch
            parts.append(f'<line class="epoch-mark" data-epoch="{epoch}" x1="{x(boundary + 0.5):.1f}" '
                         f'x2="{x(boundary + 0.5):.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" stroke="#8888" '
                         f'stroke-dasharray="3 3"><title>end of epoch {epoch}</title></line>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 4}" text-anchor="middle" fill="currentColor">step'
                 f'{" (dashed lines: epoch ends)" if steps_per_epoch else ""}</text>')
    parts.append(f'<text x="12" y="{TOP + plot_h / 2}" transform="rotate(-90 12 {TOP + plot_h / 2})" '
                 'text-anchor="middle" fill="currentColor">loss</text>')
    rates = [(p[0], p[2]) for p in shown_points if p[2] is not None]
    if rates:
        r_low, r_high = padded([r for _, r in rates])
        line = " ".join(f"{x(s):.1f},{y(r, r_low, r_high):.1f}" for s, r in rates)
        parts.append(f'<polyline id="lr-line" points="{line}" fill="none" stroke="#e8890c" stroke-width="1.2" '
                     f'stroke-dasharray="5 3"><title>learning rate</title></polyline>')
        for value in ticks(r_low, r_high, 3):
            parts.append(f'<text x="{WIDTH - RIGHT + 4}" y="{y(value, r_low, r_high) + 4:.1f}" fill="#e8890c">'
                         f'{value:.2g}</text>')
    raw = " ".join(f"{x(s):.1f},{y(loss):.1f}" for s, loss, _ in shown_points)
    parts.append(f'<polyline points="{raw}" fill="none" stroke="#3b82f688" stroke-width="1" />')
    trend = " ".join(f"{x(s):.1f},{y(smooth[s]):.1f}" for s, _, _ in shown_points)
    parts.append(f'<polyline id="loss-smoothed" points="{trend}" fill="none" stroke="#1d4ed8" stroke-width="2.2">'
                 '<title>smoothed loss</title></polyline>')
    for step, loss, rate in shown_points:
        rate_text = f" · learning rate {rate:.3g}" if rate is not None else ""
        parts.append(f'<circle class="loss-point" data-step="{step}" data-loss="{loss!r}" cx="{x(step):.1f}" '
                     f'cy="{y(loss):.1f}" r="2" fill="#3b82f6"><title>step {step} · loss {loss:.4f} · smoothed '
                     f'{smooth[step]:.4f}{rate_text}</title></circle>')
    parts += validation_line(scores, x, y)
    legend = ("● loss per step  ━ smoothed" + ("  ◆ validation" if scores else "") +
              ("  ╌ learning rate (right axis)" if rates else ""))
    parts.append(f'<text x="{LEFT}" y="{TOP - 8}" fill="currentColor">{html.escape(legend)}</text></svg>')
    return "".join(parts)


def validation_line(scores: Sequence[Score], x: Callable[[float], float], y: Callable[[float], float]) -> list[str]:
    """The held-out loss at each evaluation: a line with a marked point for each, the lowest ringed."""
    if not scores:
        return []
    lowest = min(score[2] for score in scores)
    parts = [f'<polyline id="validation-line" points="{" ".join(f"{x(s):.1f},{y(v):.1f}" for s, _, v in scores)}" '
             f'fill="none" stroke="{VALIDATION_COLOUR}" stroke-width="2"><title>validation loss</title></polyline>']
    for step, epoch, loss in scores:
        best = " · the lowest" if loss == lowest else ""
        parts.append(f'<rect class="validation-point" data-step="{step}" data-epoch="{epoch}" data-loss="{loss!r}" '
                     f'x="{x(step) - 4:.1f}" y="{y(loss) - 4:.1f}" width="8" height="8" '
                     f'transform="rotate(45 {x(step):.1f} {y(loss):.1f})" fill="{VALIDATION_COLOUR}" '
                     f'stroke="{"#facc15" if best else "none"}" stroke-width="2"><title>epoch {epoch} (step {step}) · '
                     f'validation loss {loss:.4f}{best}</title></rect>')
    return parts
