"""``modelsmith report``: the receipts, base, champion, candidate and named engines ranked."""

from __future__ import annotations

import argparse
from typing import Any

from modelsmith.clients import render
from modelsmith.clients.common import ExitCode, call, emit_json
from modelsmith.rpc.schema.evals import EvalReport, ReportRow

MAX_TAG_COLUMNS = 6  # more tags than this go to a table of their own


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


def _secs(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}s"


def _usd(value: float | None) -> str:
    return "—" if value is None else f"${value:.4f}"


def _ordered(report: EvalReport) -> list[ReportRow]:
    return sorted(report.rows, key=lambda r: (r.rank is None, r.rank or 0))


def report_text(report: EvalReport) -> str:
    """The receipts as a table for people: ranked rows first, then stale and missing ones."""
    sets = ", ".join(f"{name} {version[:12]}" for name, version in sorted(report.scenario_sets.items()))
    lines = [render.header("Modelsmith Receipts"), render.kv("cluster", report.cluster),
             render.kv("sets", sets or "—"), render.kv("generated", report.generated_at), ""]
    rows = _ordered(report)
    inline_tags = report.tags if len(report.tags) <= MAX_TAG_COLUMNS else []
    table: list[list[object]] = []
    for row in rows:
        rank = row.rank if row.rank is not None else ("stale" if row.status == "stale" else "—")
        shown = row.status in ("current", "stale")
        table.append([
            rank, row.subject, row.tag or "—",
            render.score(row.composite) if shown else "—",
            render.score(row.held_out) if shown else "—",
            _pct(row.pass_rate) if shown else "—",
            *[render.score(row.by_tag.get(tag)) if shown else "—" for tag in inline_tags],
            _secs(row.latency_p50_s), _secs(row.latency_p95_s), _usd(row.cost_per_1k_scenarios_usd),
        ])
    lines.append(render.table(table, ["#", "subject", "eval", "composite", "held-out", "pass",
                                      *inline_tags, "p50", "p95", "$/1k"]).rstrip("\n"))
    if report.tags and not inline_tags:
        lines.append("")
        by_tag = [[row.subject, *[render.score(row.by_tag.get(tag)) for tag in report.tags]]
                  for row in rows if row.status == "current"]
        lines.append(render.table(by_tag, ["by tag", *report.tags]).rstrip("\n"))
    notes = [f"  {row.subject}: {row.note}" for row in rows if row.note]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def cmd_report(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"cluster": args.cluster}
    if args.engines:
        params["engines"] = [name.strip() for name in args.engines.split(",") if name.strip()]
    report = call(args, "eval.report", params, EvalReport)
    if args.json:
        emit_json(report)
    else:
        print(report_text(report), end="")
    return ExitCode.OK


def register(sub: Any, add: Any) -> None:
    p = add("report", cmd_report, "the receipts: base, champion, candidate and named engines on "
            "the current governed sets, ranked")
    p.add_argument("cluster", help="the cluster to report on")
    p.add_argument("--engines", help="only these named engines, comma-separated (default: every "
                   "configured one and every one with an eval)")
