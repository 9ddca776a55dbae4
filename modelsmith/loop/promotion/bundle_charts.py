"""The evidence bundle's charts: matplotlib figures as reproducible inline SVG.

Legends sit outside the axes (right of the plot) so they never cover a line, and a summary's
95% interval, where it has one, is drawn as an error bar on its point.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

__all__ = ["composite_chart", "receipts_chart", "training_chart"]


def _svg(figure: Any, salt: str) -> str:
    import matplotlib

    buffer = io.StringIO()
    # A fixed salt and no date keep the SVG reproducible; text as paths needs no fonts.
    with matplotlib.rc_context({"svg.hashsalt": salt, "svg.fonttype": "path"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buffer.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def training_chart(points: Sequence[dict[str, Any]]) -> str:
    """Reward and KL by step, side by side."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2), layout="constrained")
    reward_axis, kl_axis = figure.subplots(1, 2)
    steps = [p["step"] for p in points]
    for axis, key, color in ((reward_axis, "reward_mean", "#1f6feb"), (kl_axis, "kl", "#d4552b")):
        pairs = [(s, p[key]) for s, p in zip(steps, points, strict=True) if p.get(key) is not None]
        if pairs:
            axis.plot([s for s, _ in pairs], [v for _, v in pairs], color=color, linewidth=1.6)
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes)
        axis.set_title("reward (mean)" if key == "reward_mean" else "KL to the base model")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    return _svg(figure, "training")


def _interval(point: dict[str, Any], key: str) -> tuple[float, float] | None:
    value = point.get(key)
    if isinstance(value, list | tuple) and len(value) == 2 and all(
            isinstance(v, int | float) for v in value):
        return float(value[0]), float(value[1])
    return None


def composite_chart(points: Sequence[dict[str, Any]], threshold: float | None) -> str:
    """Composite and held-out of the newest eval of each iteration, with their intervals."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.2), layout="constrained")
    axis = figure.subplots()
    latest: dict[int, dict[str, Any]] = {}
    for point in points:
        latest[int(point["iteration"])] = point  # the newest eval of each iteration
    xs = sorted(latest)
    series = (("composite", "composite_ci95", "o", "#1f6feb", "composite"),
              ("held_out", "held_out_ci95", "s", "#8250df", "held-out"))
    for key, ci_key, marker, color, label in series:
        shown = [x for x in xs if latest[x].get(key) is not None]
        if not shown:
            continue
        axis.plot(shown, [latest[x][key] for x in shown], marker=marker, color=color,
                  label=label)
        bars = [(x, float(latest[x][key]), ci) for x in shown
                if (ci := _interval(latest[x], ci_key)) is not None]
        if bars:
            # Error bars, not a band: an iteration may have a single eval point.
            axis.errorbar([x for x, _, _ in bars], [y for _, y, _ in bars],
                          yerr=[[max(0.0, y - ci[0]) for _, y, ci in bars],
                                [max(0.0, ci[1] - y) for _, y, ci in bars]],
                          fmt="none", ecolor=color, elinewidth=1.2, capsize=4, alpha=0.7,
                          label=f"{label} 95% interval")
    if threshold is not None:
        axis.axhline(threshold, color="#b42318", linestyle="--", linewidth=1, label="threshold")
    axis.set_xlabel("iteration")
    axis.set_ylim(0, 1.05)
    axis.grid(alpha=0.3)
    if xs:
        axis.set_xticks(xs)
    if axis.get_legend_handles_labels()[0]:
        # Outside the axes: a legend inside covers the points it explains.
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                    frameon=False)
    return _svg(figure, "composite")


def receipts_chart(rows: Sequence[dict[str, Any]], threshold: float | None) -> str:
    """Composite (with its interval) and held-out of each ranked subject of the receipts, best
    first; stale, missing and unverified rows are in the table only."""
    from matplotlib.figure import Figure

    ranked = [r for r in rows if r.get("rank") is not None and r.get("composite") is not None]
    figure = Figure(figsize=(9, 0.5 + 0.45 * max(2, len(ranked))), layout="constrained")
    axis = figure.subplots()
    labels = [f"{r['rank']}. {r['subject']}" for r in ranked]
    ys = list(range(len(ranked)))[::-1]  # the best at the top
    composite = [float(r["composite"]) for r in ranked]
    axis.barh([y + 0.18 for y in ys], composite, height=0.36, color="#1f6feb", label="composite")
    bars = [(y + 0.18, c, ci) for y, c, r in zip(ys, composite, ranked, strict=True)
            if (ci := _interval(r, "composite_ci95")) is not None]
    if bars:
        axis.errorbar([c for _, c, _ in bars], [y for y, _, _ in bars],
                      xerr=[[max(0.0, c - ci[0]) for _, c, ci in bars],
                            [max(0.0, ci[1] - c) for _, c, ci in bars]],
                      fmt="none", ecolor="#0b3d91", elinewidth=1.1, capsize=3,
                      label="composite 95% interval")
    held = [(y - 0.18, float(r["held_out"])) for y, r in zip(ys, ranked, strict=True)
            if r.get("held_out") is not None]
    if held:
        axis.barh([y for y, _ in held], [v for _, v in held], height=0.36, color="#8250df",
                  label="held-out")
    if threshold is not None:
        axis.axvline(threshold, color="#b42318", linestyle="--", linewidth=1, label="threshold")
    if not ranked:
        axis.text(0.5, 0.5, "no subject has a full eval of these sets", ha="center",
                  va="center", transform=axis.transAxes)
    axis.set_yticks(ys, labels)
    axis.set_xlim(0, 1.05)
    axis.set_xlabel("score")
    axis.grid(axis="x", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)
    return _svg(figure, "receipts")
