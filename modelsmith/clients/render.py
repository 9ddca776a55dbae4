"""Human-readable output of the CLI (the seed's layout). Standard library only at run time."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modelsmith.rpc.schema.daemon import ClusterStatus, FleetStatus
    from modelsmith.rpc.schema.evals import GateResult

LABEL_WIDTH = 15


def header(title: str) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return f"\n  {title}  ·  {stamp}\n"


def kv(label: str, value: object) -> str:
    return f"  {label:<{LABEL_WIDTH}}{value}"


def gate(label: str, value: float | None, threshold: float, passed: bool | None = None) -> str:
    if value is None:
        return kv(label, f"—        (threshold {threshold:.3f})")
    ok = value >= threshold if passed is None else passed
    return kv(label, f"{value:.3f}   {'PASS' if ok else 'FAIL'}  (threshold {threshold:.3f})")


def score(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def interval(ci95: Sequence[float] | None, *, signed: bool = False) -> str:
    """``[low, high]`` of a 95% interval; "" when there is none (older summaries)."""
    if not ci95:
        return ""
    low, high = ci95[0], ci95[1]
    return f"[{low:+.3f}, {high:+.3f}]" if signed else f"[{low:.3f}, {high:.3f}]"


def scored_gate(label: str, point: float | None, ci95: Sequence[float] | None, result: GateResult) -> str:
    """A score with its 95% interval and its gate; says when the gate judged the lower bound."""
    if point is None:
        return kv(label, f"—        (threshold {result.threshold:.3f})")
    shown = f"{point:.3f} {interval(ci95)}".rstrip()
    basis = ", on the lower bound" if result.basis == "lower_bound" else ""
    return kv(label, f"{shown}   {'PASS' if result.passed else 'FAIL'}  (threshold {result.threshold:.3f}{basis})")


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = round(seconds)
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def cluster_block(c: ClusterStatus) -> list[str]:
    lines = [
        kv("cluster", c.cluster),
        kv("model", c.model),
        kv("iteration", c.iteration),
        kv("scenarios", _scenario_line(c)),
        kv("phase", c.phase),
    ]
    if c.status_error:
        lines.append(kv("error", c.status_error))
    lines.append("")
    lines.append(gate("composite", c.composite, c.composite_threshold))
    lines.append(gate("held_out", c.held_out, c.held_out_threshold))
    if c.regressions is not None:
        lines.append(kv("regressions", f"{c.regressions} / {c.regressions_total or 0}"))
    if c.last_eval_tag:
        lines.append(kv("last eval", c.last_eval_tag))
    if c.champion:
        lines.append(kv("champion", c.champion))
    if c.pending_promotion:
        lines.append(kv("awaiting", f"approval of {c.pending_promotion}"))
    return lines


def _scenario_line(c: ClusterStatus) -> str:
    if not c.scenario_sets:
        return str(c.scenarios)
    return f"{c.scenarios} ({', '.join(sorted(c.scenario_sets))})"


def fleet(status: FleetStatus) -> str:
    out = [header("Modelsmith Fleet Status")]
    if not status.clusters:
        out.append("  no clusters found")
    for i, c in enumerate(status.clusters):
        if i:
            out.append("")
            out.append("  " + "─" * 40)
            out.append("")
        out.extend(cluster_block(c))
    for err in status.errors:
        out.append("")
        out.append(kv("not loaded", f"{err.cluster}: {err.message}"))
    return "\n".join(out) + "\n"


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  " + "  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip() for r in cells]
    lines.insert(1, "  " + "  ".join("─" * w for w in widths))
    return "\n".join(lines) + "\n"
