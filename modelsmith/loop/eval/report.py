"""The receipts: base, champion, candidate and each named engine on the same governed sets.

Each subject's row is its latest *full* eval (type full, not quick, every scenario) whose set
versions are the current ones; when only evals of older versions exist, the latest of those is
shown as ``stale`` and never ranked; a subject with no full eval is ``missing``. Every summary
is checked against the digest its ``eval.finished`` entry holds before a number of it is shown
(``unverified`` otherwise). Current rows are ranked by composite, then held-out.

Only the sets the gate scores (core and held-out) decide whether an eval is current: a change to
another set (synthetic scenarios) does not make the receipts stale.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
from msgspec.structs import replace

from modelsmith.hashing import sha256_hex
from modelsmith.loop.records.events import (
    EvalFinished,
    EvalStarted,
    LedgerEvent,
    ScenariosChanged,
)
from modelsmith.loop.records.ledger import Recorded
from modelsmith.rpc.schema.evals import EvalReport, EvalSummary, ReportRole, ReportRow

__all__ = ["GOVERNED_SETS", "FullEval", "build_report", "full_evals", "report_table"]

GOVERNED_SETS = ("core", "held-out")
_decoder = msgspec.json.Decoder(EvalSummary)


@dataclass(frozen=True)
class FullEval:
    """A finished full eval, from its two ledger entries."""

    tag: str
    adapter: str | None
    engine: str | None
    scenario_sets: dict[str, str]
    finished_at: str
    summary_sha256: str

    def governed_versions(self) -> dict[str, str]:
        return {k: v for k, v in self.scenario_sets.items() if k in GOVERNED_SETS}


def full_evals(entries: Iterable[Recorded[LedgerEvent]]) -> list[FullEval]:
    """Every finished full eval in ledger order (a resumed eval counts once: its finish).

    Full: type full, not quick, and every governed scenario of its set versions scored; a
    domain filter that happened to select them all (one-domain clusters) still is.
    """
    started: dict[str, tuple[EvalStarted, int | None]] = {}
    governed_count: int | None = None  # core + held-out scenarios, from the last scenarios.changed
    out: list[FullEval] = []
    for recorded in entries:
        event = recorded.event
        if isinstance(event, ScenariosChanged):
            governed_count = sum(n for name, n in event.counts.items() if name in GOVERNED_SETS)
        elif isinstance(event, EvalStarted):
            started[event.tag] = (event, governed_count)
        elif isinstance(event, EvalFinished):
            start, total = started.get(event.tag, (None, None))
            if start is None or start.type != "full" or start.quick:
                continue
            if start.domain is not None and start.scenarios != total:
                continue
            out.append(FullEval(tag=event.tag, adapter=event.adapter, engine=event.engine,
                                scenario_sets=dict(start.scenario_sets), finished_at=recorded.ts,
                                summary_sha256=event.summary_sha256))
    return out


def _latest(evals: Sequence[FullEval], current: dict[str, str]) -> tuple[FullEval | None, bool]:
    """The latest eval on the current versions, else the latest at all (stale)."""
    for ev in reversed(evals):
        if ev.governed_versions() == current:
            return ev, True
    return (evals[-1], False) if evals else (None, False)


def _row(subject: str, role: ReportRole, evals: Sequence[FullEval], current: dict[str, str],
         evals_dir: Path, *, adapter: str | None = None, engine: str | None = None,
         absent: str = "no full eval yet") -> ReportRow:
    chosen, is_current = _latest(evals, current)
    if chosen is None:
        return ReportRow(subject=subject, role=role, status="missing", adapter=adapter,
                         engine=engine, note=absent)
    head = ReportRow(subject=subject, role=role, status="unverified", tag=chosen.tag,
                     adapter=chosen.adapter, engine=chosen.engine, finished_at=chosen.finished_at,
                     scenario_sets=chosen.governed_versions())
    path = evals_dir / chosen.tag / "summary.json"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return replace(head, note=f"summary.json cannot be read: {exc.strerror or exc}")
    if sha256_hex(data) != chosen.summary_sha256:
        return replace(head, note="summary.json does not match the digest in the ledger")
    try:
        summary = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:  # pragma: no cover - digest matched
        return replace(head, note=f"summary.json does not decode: {exc}")
    count = sum(group.count for group in summary.by_set.values())
    passed = sum(group.passed for group in summary.by_set.values())
    note = None if is_current else "evaluated on older set versions: rerun it to compare"
    return replace(
        head, status="current" if is_current else "stale", model=summary.model,
        scenarios=summary.scenarios, composite=summary.composite,
        composite_ci95=summary.composite_ci95, held_out=summary.held_out,
        pass_rate=passed / count if count else None,
        by_tag={tag: group.score for tag, group in sorted(summary.by_tag.items())},
        latency_p50_s=summary.latency_p50_s, latency_p95_s=summary.latency_p95_s,
        cost_per_1k_scenarios_usd=summary.cost_per_1k_scenarios_usd, note=note)


def _rank(rows: list[ReportRow]) -> None:
    """Competition ranking of the current rows: by composite, then held-out (higher first)."""
    def key(row: ReportRow) -> tuple[float, float]:
        return (-(row.composite or 0.0), -(row.held_out if row.held_out is not None else -1.0))

    ranked = sorted((r for r in rows if r.status == "current"), key=key)
    for position, row in enumerate(ranked, start=1):
        previous = ranked[position - 2] if position > 1 else None
        row.rank = previous.rank if previous is not None and key(previous) == key(row) else position


def build_report(cluster: str, evals_dir: Path, entries: Iterable[Recorded[LedgerEvent]], *,
                 versions: dict[str, str], champion: str | None, candidate: str | None,
                 engines: Sequence[str], generated_at: str) -> EvalReport:
    """The receipts of ``cluster`` from its ledger ``entries`` and the summaries under
    ``evals_dir``. ``versions``: the current set versions; ``engines``: the named engines to
    show, in that order. Blocking (reads summaries)."""
    current = {k: v for k, v in versions.items() if k in GOVERNED_SETS}
    evals = full_evals(entries)
    own = [e for e in evals if e.engine is None]
    rows = [_row("base", "base", [e for e in own if e.adapter is None], current, evals_dir)]
    roles: tuple[tuple[ReportRole, str | None], ...] = (("champion", champion),
                                                         ("candidate", candidate))
    for role, adapter in roles:
        if adapter is None:
            rows.append(ReportRow(subject=role, role=role, status="missing", note=f"no {role} yet"))
            continue
        rows.append(_row(f"{role} {adapter}", role, [e for e in own if e.adapter == adapter],
                         current, evals_dir, adapter=adapter))
    for name in engines:
        rows.append(_row(name, "engine", [e for e in evals if e.engine == name], current,
                         evals_dir, engine=name,
                         absent=f"no full eval yet: modelsmith eval --cluster {cluster} --engine {name}"))
    _rank(rows)
    tags = sorted({tag for row in rows if row.status == "current" for tag in row.by_tag})
    return EvalReport(cluster=cluster, generated_at=generated_at, scenario_sets=current,
                      tags=tags, rows=rows)


def report_table(report: EvalReport) -> list[dict[str, object]]:
    """The rows as plain dicts (for the bundle's JSON file and page), ranked rows first."""
    def order(row: ReportRow) -> tuple[int, int]:
        return (0 if row.rank is not None else 1, row.rank or 0)

    return [msgspec.to_builtins(row) for row in sorted(report.rows, key=order)]
