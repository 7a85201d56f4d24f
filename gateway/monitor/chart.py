"""A chart for people: one UTC day's risk events per hour, stacked by severity, as a PNG (matplotlib, Agg).

Drawn off the event loop (a worker thread) with matplotlib's object API — a ``Figure`` of its own per
chart, never pyplot's global figures — so charts drawn at once do not share state.
"""

from __future__ import annotations

import asyncio
import io
from datetime import date
from typing import Any

from gateway.ledger.store import Database, Tx
from gateway.monitor.report import day_bounds
from gateway.risk.events import SEVERITIES

#: Colours by severity, calm to alarming (the teller UI uses the same order).
COLOURS = {"info": "#9e9e9e", "low": "#4f83cc", "medium": "#e0b100", "high": "#ef6c00", "critical": "#c62828"}


def hourly_counts_in(tx: Tx, day: date) -> dict[str, list[int]]:
    """Events of ``day`` per severity and UTC hour (24 counts per severity, every severity present)."""
    start, end = day_bounds(day)
    counts: dict[str, list[int]] = {severity: [0] * 24 for severity in SEVERITIES}
    for row in tx.fetchall("SELECT ts, severity FROM risk_events WHERE ts >= ? AND ts < ?", (start, end)):
        hour = int(str(row["ts"])[11:13])
        counts.setdefault(str(row["severity"]), [0] * 24)[hour] += 1
    return counts


def render_png(day: date, counts: dict[str, list[int]]) -> bytes:
    """The stacked bar chart as PNG bytes (CPU-bound: run it in a thread)."""
    # matplotlib takes most of a second to import: only a process that draws a chart pays for it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes: Any = figure.add_subplot()
    hours = list(range(24))
    bottom = [0] * 24
    for severity, values in counts.items():
        axes.bar(hours, values, bottom=bottom, color=COLOURS.get(severity, "#607d8b"), label=severity, width=0.8)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    total = sum(bottom)
    axes.set_title(f"Risk events per hour, {day.isoformat()} (UTC) — {total} in all")
    axes.set_xlabel("hour (UTC)")
    axes.set_ylabel("events")
    axes.set_xticks(hours[::2])
    axes.set_xlim(-0.6, 23.6)
    axes.yaxis.get_major_locator().set_params(integer=True)
    axes.legend(loc="upper left", ncols=len(counts), fontsize="small", frameon=False)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    output = io.BytesIO()
    figure.savefig(output, format="png", metadata={"Software": "ecny-gateway"})
    return output.getvalue()


async def chart_png(database: Database, day: date) -> bytes:
    counts = await database.read(lambda tx: hourly_counts_in(tx, day))
    return await asyncio.to_thread(render_png, day, counts)
