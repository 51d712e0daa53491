"""PURE: a migration's story as a picture (``ferry report NAME --svg FILE``), plain SVG text.

From ``status.transfer.rounds``: remaining bytes over time (what was still to send at each
round's start and end), the guest's dirty rate per round, the throttle as steps, and the
pause (the final round, sent with the guest stopped) as a shaded band. No library: a few
dozen SVG elements are smaller than any dependency that would draw them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

from ferry.api.reports import RoundReport

WIDTH, HEIGHT = 900, 520
LEFT, RIGHT = 90, 100  # room for the two value axes
TOP, GAP = 64, 46
MAIN_H, THROTTLE_H = 260, 90
BLUE, ORANGE, RED, GREY = "#1f77b4", "#e6730e", "#c62828", "#9e9e9e"
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def short_bytes(n: float, suffix: str = "") -> str:
    value, unit = float(n), 0
    while abs(value) >= 1024 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    text = f"{value:.0f}" if unit == 0 or value >= 100 or value.is_integer() else f"{value:.1f}"
    return f"{text} {_UNITS[unit]}{suffix}"


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """0 and round steps (1, 2, 2.5, 5 x 10^k) up to at least ``top``."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    n = math.ceil(top / step - 1e-9)
    return [i * step for i in range(n + 1)]


def byte_ticks(top: float, count: int = 5) -> list[float]:
    """Ticks in powers of 1024 so the labels read as whole KiB/MiB/GiB."""
    scale = 1024 ** max(0, min(len(_UNITS) - 1, int(math.log(max(top, 1), 1024))))
    return [t * scale for t in nice_ticks(top / scale, count)]


def timeline(rounds: Sequence[RoundReport]) -> list[tuple[RoundReport, float, float]]:
    """(round, start s, end s); rounds an older agent wrote without ``startMs`` follow each other."""
    out = []
    t = 0.0
    for r in rounds:
        start = r.start_ms / 1000 if r.start_ms is not None else t
        end = start + max(r.ms, 0) / 1000
        out.append((r, start, end))
        t = end
    return out


def remaining_points(rounds: Sequence[RoundReport]) -> list[tuple[float, float]]:
    """(s, bytes still to send): round 1 starts with what it sent; each round ends with what the
    guest dirtied meanwhile, which is where the next one starts."""
    points: list[tuple[float, float]] = []
    before: float | None = None
    for r, start, end in timeline(rounds):
        points.append((start, float(r.bytes if before is None else before)))
        after = 0.0 if r.paused else float(r.dirty_bytes)
        points.append((end, after))
        before = after
    return points


def migration_svg(title: str, rounds: Sequence[RoundReport], downtime_ms: int | None = None,
                  subtitle: str = "") -> str:
    """The picture as SVG text. Without rounds: a frame saying so."""
    parts: list[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<text x="{LEFT}" y="24" font-size="{16 if len(title) <= 70 else 13}" font-weight="bold">'
        f"{escape(_elide(title, 110))}</text>",
    ]
    if subtitle:
        parts.append(f'<text x="{LEFT}" y="44" fill="#444">{escape(subtitle)}</text>')
    plot_w = WIDTH - LEFT - RIGHT
    main_top, thr_top = TOP, TOP + MAIN_H + GAP
    if not rounds:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="{GREY}">'
                     "no rounds reported (yet)</text></svg>")
        return "\n".join(parts) + "\n"

    spans = timeline(rounds)
    t_end = max(end for _, _, end in spans)
    t_ticks = nice_ticks(t_end if t_end > 0 else 1.0)
    t_max = t_ticks[-1]
    remaining = remaining_points(rounds)
    r_ticks = byte_ticks(max(v for _, v in remaining))
    rates = [float(r.dirty_rate_bps or 0) for r in rounds]
    d_ticks = byte_ticks(max(rates) if max(rates) > 0 else 1.0)

    def x(t: float) -> float:
        return LEFT + plot_w * t / t_max

    def y_main(v: float, ticks: list[float]) -> float:
        return main_top + MAIN_H * (1 - v / ticks[-1])

    def y_thr(pct: float) -> float:
        return thr_top + THROTTLE_H * (1 - pct / 100)

    # the pause: a shaded band across both panels
    for r, start, end in spans:
        if r.paused:
            x0, x1 = x(start), max(x(end), x(start) + 3)
            parts.append(f'<rect x="{x0:.1f}" y="{main_top}" width="{x1 - x0:.1f}" '
                         f'height="{thr_top + THROTTLE_H - main_top}" fill="#7e57c2" fill-opacity="0.25"/>')
            label = f"pause {downtime_ms} ms" if downtime_ms is not None else "pause"
            parts.append(f'<text x="{x1 - 4:.1f}" y="{main_top + 14}" text-anchor="end" fill="#5e35b1" '
                         f'font-weight="bold">{escape(label)} ▸</text>')

    # frames, grid and axes
    for top, h in ((main_top, MAIN_H), (thr_top, THROTTLE_H)):
        parts.append(f'<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{h}" fill="none" stroke="#333"/>')
        for t in t_ticks:
            parts.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{top + h}" stroke="#eee"/>')
    for t in t_ticks:
        parts.append(f'<text x="{x(t):.1f}" y="{thr_top + THROTTLE_H + 16}" text-anchor="middle">{t:g}</text>')
    parts.append(f'<text x="{LEFT + plot_w / 2}" y="{thr_top + THROTTLE_H + 36}" text-anchor="middle">'
                 "seconds since the copy began</text>")
    for v in r_ticks:
        yy = y_main(v, r_ticks)
        parts.append(f'<line x1="{LEFT}" y1="{yy:.1f}" x2="{LEFT + plot_w}" y2="{yy:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end" fill="{BLUE}">{short_bytes(v)}</text>')
    for v in d_ticks:
        yy = y_main(v, d_ticks)
        parts.append(f'<text x="{LEFT + plot_w + 6}" y="{yy + 4:.1f}" fill="{ORANGE}">{short_bytes(v, "/s")}</text>')
    for pct in (0, 50, 100):
        parts.append(f'<text x="{LEFT - 6}" y="{y_thr(pct) + 4:.1f}" text-anchor="end" fill="{RED}">{pct}%</text>')
    parts.append(f'<text x="{LEFT}" y="{thr_top - 8}" fill="{RED}">guest throttle</text>')

    # round boundaries, numbered
    for r, start, _ in spans:
        parts.append(f'<line x1="{x(start):.1f}" y1="{main_top + MAIN_H}" x2="{x(start):.1f}" '
                     f'y2="{main_top + MAIN_H - 6}" stroke="#666"/>')
    if len(spans) <= 25:
        for r, start, end in spans:
            if x(end) - x(start) >= 12:
                parts.append(f'<text x="{(x(start) + x(end)) / 2:.1f}" y="{main_top + MAIN_H - 8}" '
                             f'text-anchor="middle" fill="#666" font-size="10">{r.round}</text>')

    # dirty rate: one step per round
    steps = []
    for (r, start, end), rate in zip(spans, rates):
        steps += [(x(start), y_main(rate, d_ticks)), (x(end), y_main(rate, d_ticks))]
    parts.append(_polyline(steps, ORANGE, 2, dash="6 3"))
    # remaining bytes
    parts.append(_polyline([(x(t), y_main(v, r_ticks)) for t, v in remaining], BLUE, 2.5))
    for t, v in remaining:
        parts.append(f'<circle cx="{x(t):.1f}" cy="{y_main(v, r_ticks):.1f}" r="2.5" fill="{BLUE}"/>')
    # throttle: steps, filled
    thr = [(x(spans[0][1]), y_thr(0))]
    for r, start, end in spans:
        pct = float(r.throttle_percent or 0)
        thr += [(x(start), y_thr(pct)), (x(end), y_thr(pct))]
    thr.append((x(spans[-1][2]), y_thr(0)))
    pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in thr)
    parts.append(f'<polygon points="{pts}" fill="{RED}" fill-opacity="0.25" stroke="{RED}" stroke-width="1.5"/>')

    # legend: above the plot, right-aligned, clear of the curves
    lx, yy = LEFT + plot_w - 360, main_top - 8
    for color, text, dash in ((BLUE, "remaining bytes (left)", ""),
                              (ORANGE, "guest dirty rate (right)", ' stroke-dasharray="6 3"')):
        parts.append(f'<line x1="{lx}" y1="{yy - 4}" x2="{lx + 24}" y2="{yy - 4}" stroke="{color}" '
                     f'stroke-width="2.5"{dash}/>')
        parts.append(f'<text x="{lx + 30}" y="{yy}">{escape(text)}</text>')
        lx += 180
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _elide(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _polyline(points: Sequence[tuple[float, float]], color: str, width: float, dash: str = "") -> str:
    pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in points)
    extra = f' stroke-dasharray="{dash}"' if dash else ""
    return f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{width}"{extra}/>'
