"""The network page's charts: a y axis of round values with gridlines, readable time
labels, and nothing but numbers and our own labels in the markup."""

from __future__ import annotations

import itertools
import math
import re

from hypothesis import given
from hypothesis import strategies as st

from routecat.web.charts import bar_chart, compact, nice_ticks


def test_ticks_are_round_and_cover_the_top() -> None:
    assert nice_ticks(0) == [0.0, 1.0]
    assert nice_ticks(7) == [0, 2, 4, 6, 8]
    assert nice_ticks(30) == [0, 10, 20, 30]
    assert nice_ticks(1234) == [0, 500, 1000, 1500]
    assert compact(1500) == "1.5k" and compact(2_000_000) == "2M" and compact(40) == "40"


@given(st.floats(min_value=0.001, max_value=1e12, allow_nan=False))
def test_ticks_always_cover_the_top_in_a_few_round_steps(top: float) -> None:
    ticks = nice_ticks(top)
    assert ticks[0] == 0 and ticks[-1] >= top * (1 - 1e-9) and 2 <= len(ticks) <= 6
    step = ticks[1]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert any(abs(mantissa - m) < 1e-9 for m in (1, 2, 2.5, 5, 10))
    assert all(abs(b - a - step) < step * 1e-9 for a, b in itertools.pairwise(ticks))


def test_a_day_chart_has_an_axis_gridlines_and_time_labels() -> None:
    hours = [f"{h:02d}:00" for h in range(24)]
    svg = str(bar_chart([h * 10 for h in range(24)], hours, "Jobs per hour"))
    assert svg.count("<rect") == 24
    assert re.findall(r'class="tick"[^>]*>([^<]+)<', svg) == ["0", "100", "200", "300"]
    assert svg.count('class="grid"') == 4 and svg.count('class="axis"') == 2
    # Every third hour labelled: readable, not only the two ends.
    assert re.findall(r'class="when"[^>]*>([^<]+)<', svg) == hours[::3]


def test_labels_are_escaped() -> None:
    svg = str(bar_chart([1], ["<script>"], "a <b> title"))
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "&lt;b&gt;" in svg
