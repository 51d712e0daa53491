"""The report's picture (ferry.cli.chart): a pure function from rounds to SVG text."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from ferry.api.reports import RoundReport
from ferry.cli import chart

NS = {"s": "http://www.w3.org/2000/svg"}
KIB = 1024
ROUNDS = [RoundReport(1, 5000 * KIB, 900 * KIB, 2600, 0, 350 * KIB, 0),
          RoundReport(2, 900 * KIB, 500 * KIB, 400, 2600, 1200 * KIB, 40),
          RoundReport(3, 500 * KIB, 0, 60, 3000, 0, 40, paused=True)]


def test_remaining_bytes_fall_from_the_bulk_copy_to_zero_after_the_pause() -> None:
    assert chart.remaining_points(ROUNDS) == [(0.0, 5000 * KIB), (2.6, 900 * KIB), (2.6, 900 * KIB),
                                              (3.0, 500 * KIB), (3.0, 500 * KIB), (3.06, 0.0)]
    # rounds written without startMs (an older agent) follow one another
    old = [RoundReport(1, 10, 5, 1000), RoundReport(2, 5, 1, 500)]
    assert [(s, e) for _, s, e in chart.timeline(old)] == [(0.0, 1.0), (1.0, 1.5)]


def test_the_svg_is_well_formed_and_marks_the_pause_and_the_throttle() -> None:
    root = ET.fromstring(chart.migration_svg("ns/move <a&b>", ROUNDS, 87, "attempt 1"))
    texts = ["".join(t.itertext()) for t in root.iterfind(".//s:text", NS)]
    assert "ns/move <a&b>" in texts and any(t.startswith("pause 87 ms") for t in texts)
    assert "4.9 MiB" in " ".join(texts) or "5 MiB" in texts  # the remaining-bytes axis reaches the bulk copy
    pause = [r for r in root.iterfind(".//s:rect", NS) if r.get("fill") == "#7e57c2"]
    assert len(pause) == 1
    throttle = root.find(".//s:polygon", NS)
    ys = {float(p.split(",")[1]) for p in throttle.get("points").split()}
    assert len(ys) == 2  # 0 % and the 40 % step


def test_ticks_are_round_and_cover_the_top() -> None:
    assert chart.nice_ticks(3.93) == [0, 1, 2, 3, 4]
    assert chart.byte_ticks(5 << 20)[-1] >= 5 << 20 and chart.short_bytes(1 << 20) == "1 MiB"
    assert "no rounds" in chart.migration_svg("x", [])
