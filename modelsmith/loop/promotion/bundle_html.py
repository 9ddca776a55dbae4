"""The evidence bundle's ``index.html``: one self-contained page (inline CSS and SVG, no links
out, no scripts) that a reviewer opens before signing. Standard library only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

__all__ = ["BundlePage", "render_page"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:#f6f7f9;color:#1d232b}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;
border-bottom:1px solid #d5dae1;padding-bottom:4px}
.sub{color:#5b6674;margin:0 0 16px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:10px 12px}
.card b{display:block;font-size:12px;color:#5b6674;font-weight:600;text-transform:uppercase}
.card span{font-size:18px;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde2e8}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eef1f4;vertical-align:top}
th{background:#eef1f4;font-size:12px;text-transform:uppercase;color:#44505e}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;
word-break:break-all}
.pass{color:#0b7a3e;font-weight:600}.fail{color:#b42318;font-weight:600}
.status{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;
background:#e8eefc;color:#1f4fbf}
.chart{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:8px;margin:8px 0}
.chart svg{width:100%;height:auto}
.muted{color:#5b6674}
"""


@dataclass(frozen=True)
class BundlePage:
    """Everything the page shows; the same data lies as JSON files in the bundle."""

    request: dict[str, Any]
    status: str
    decision: dict[str, Any] | None
    candidate_summary: dict[str, Any] | None
    baseline_summary: dict[str, Any] | None
    baseline_label: str
    diff: dict[str, Any]
    failure_patterns: list[dict[str, Any]]
    training_manifest: dict[str, Any] | None
    leakage_proof: dict[str, Any]
    training_chart_svg: str
    composite_chart_svg: str
    files: Sequence[tuple[str, str, int]]  # (path, sha256, size)


def _e(value: object) -> str:
    return escape("—" if value is None else str(value))


def _pct(value: object) -> str:
    return f"{float(value) * 100:.1f}%" if isinstance(value, int | float) else "—"


def _card(label: str, value: str) -> str:
    return f'<div class="card"><b>{escape(label)}</b><span>{value}</span></div>'


def _mark(passed: object) -> str:
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{escape(empty)}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    thead = f"<thead><tr>{head}</tr></thead>" if any(headers) else ""
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{thead}<tbody>{body}</tbody></table>"


def _overview(page: BundlePage) -> str:
    request = page.request
    summary = page.candidate_summary or {}
    policy = request.get("policy", {})
    adapter = request.get("adapter", {})
    evaluation = request.get("eval", {})
    cards = [
        _card("Status", f'<span class="status">{_e(page.status)}</span>'),
        _card("Iteration", _e(request.get("iteration"))),
        _card("Composite", f"{_pct(evaluation.get('composite'))} "
              f"<small class='muted'>≥ {_pct(policy.get('composite_threshold'))}</small>"),
        _card("Held-out", f"{_pct(evaluation.get('held_out'))} "
              f"<small class='muted'>≥ {_pct(policy.get('held_out_threshold'))}</small>"),
        _card("Regressions", _e((request.get("regressions") or {}).get("count"))),
        _card("Approvals needed", _e(policy.get("required_approvals"))),
    ]
    facts = [
        ("Cluster", _e(request.get("cluster"))),
        ("Model", f"{_e(request.get('model', {}).get('name'))} "
                  f"<code>{_e(request.get('model', {}).get('base_model'))}</code>"),
        ("Base model sha256", f"<code>{_e(request.get('model', {}).get('base_model_sha256'))}"
                              "</code> (config.json + weights index)"),
        ("Adapter", f"{_e(adapter.get('name'))} <code>{_e(adapter.get('sha256'))}</code>"),
        ("Eval tag", f"{_e(evaluation.get('tag'))} ({_e(summary.get('scenarios'))} scenarios, "
                     f"type {_e(evaluation.get('type'))})"),
        ("Eval summary sha256", f"<code>{_e(evaluation.get('summary_sha256'))}</code>"),
        ("Scenario sets", "<br>".join(f"{escape(k)} <code>{escape(str(v))}</code>" for k, v in
                                      sorted(request.get("scenario_sets", {}).items()))),
        ("Compared with", _e(page.baseline_label)),
        ("Requested by", f"{_e(request.get('requested_by', {}).get('username'))} (uid "
                         f"{_e(request.get('requested_by', {}).get('uid'))}) at "
                         f"{_e(request.get('created_at'))}"),
        ("Note", _e(request.get("note"))),
        ("Daemon key", f"<code>{_e(request.get('signature', {}).get('key_id'))}</code>"),
    ]
    rows = [(f"<b>{escape(k)}</b>", v) for k, v in facts]
    return f'<div class="cards">{"".join(cards)}</div><h2>Request</h2>' + _table(
        ["", ""], rows, "")


def _gate(page: BundlePage) -> str:
    rows = [(f"<code>{_e(c.get('check'))}</code>", _mark(c.get("passed")), _e(c.get("detail")))
            for c in page.request.get("gate", [])]
    return "<h2>Policy gate</h2>" + _table(["check", "result", "detail"], rows, "no checks")


def _decision(page: BundlePage) -> str:
    if page.decision is None:
        return ('<h2>Decision</h2><p class="muted">Not decided yet: a reviewer approves with '
                f"<code>modelsmith approve {_e(page.request.get('cluster'))} "
                f"{_e(page.request.get('request_id'))}</code>.</p>")
    rows = [(_e(a.get("principal")), _e(a.get("decision")), f"<code>{_e(a.get('key_fingerprint'))}"
             "</code>", _e(a.get("time")), _e(a.get("reason")))
            for a in page.decision.get("approvals", [])]
    return (f"<h2>Decision: {_e(page.decision.get('decision'))}</h2>"
            + _table(["principal", "decision", "key", "time", "reason"], rows, "no signatures"))


def _diff(page: BundlePage) -> str:
    diff = page.diff
    out = [f"<h2>Scenario diff vs {_e(page.baseline_label)}</h2>",
           f"<p>{_e(diff.get('fixed_count'))} fixed, {_e(diff.get('regressed_count'))} "
           f"regressed, {_e(diff.get('unchanged_count'))} unchanged.</p>"]
    for status in ("regressed", "fixed"):
        rows = [(f"<code>{_e(s['scenario_id'])}</code>", _e(s["set"]), f"{s['score_a']:.2f}",
                 f"{s['score_b']:.2f}") for s in diff.get(status, [])]
        out.append(f"<h3>{status.capitalize()}</h3>")
        out.append(_table(["scenario", "set", "before", "after"], rows, f"none {status}"))
    return "".join(out)


def _patterns(page: BundlePage) -> str:
    rows = [(f"<code>{_e(p['criterion_type'])}</code>", _e(p["error_kind"]), _e(p["count"]),
             ", ".join(f"<code>{escape(x)}</code>" for x in p["examples"]))
            for p in page.failure_patterns]
    return "<h2>Failure patterns of the candidate</h2>" + _table(
        ["failing criterion", "error kind", "count", "examples"], rows, "no failures")


def _training(page: BundlePage) -> str:
    manifest = page.training_manifest or {}
    proof = page.leakage_proof
    facts = [
        ("Job", _e(manifest.get("job_id"))),
        ("Trained on failures of", _e(manifest.get("eval_tag"))),
        ("Training scenarios", _e(len(manifest.get("scenarios", [])))),
        ("Init adapter", _e(manifest.get("init_adapter"))),
        ("Held-out ids sha256", f"<code>{_e(manifest.get('held_out_ids_sha256'))}</code>"),
        ("Trainer's leakage check", _mark(proof.get("trainer_check_ok"))),
        ("Re-check vs today's held-out set",
         f"{_mark(proof.get('ok'))} {_e(proof.get('held_out_count'))} held-out scenarios, "
         f"{_e(len(proof.get('overlapping_ids', [])))} shared ids, "
         f"{_e(len(proof.get('overlapping_hashes', [])))} shared hashes"),
    ]
    return ("<h2>Training and leakage proof</h2>"
            + _table(["", ""], [(f"<b>{escape(k)}</b>", v) for k, v in facts], ""))


def _files(page: BundlePage) -> str:
    rows = [(f"<code>{escape(path)}</code>", f"<code>{escape(digest)}</code>", str(size))
            for path, digest, size in page.files]
    return ("<h2>Files in this bundle</h2><p class='muted'>Check them offline with "
            "<code>modelsmith bundle verify bundle.tar.gz</code> (or <code>sha256sum -c "
            "MANIFEST</code>).</p>" + _table(["file", "sha256", "bytes"], rows, "no files"))


def render_page(page: BundlePage) -> str:
    """The whole HTML document."""
    request = page.request
    title = f"Promotion {request.get('request_id')} · {request.get('cluster')}"
    sections = [
        f"<h1>{escape(title)}</h1>",
        '<p class="sub">Evidence bundle for a promotion request of Modelsmith. Everything '
        "shown here is in bundle.tar.gz with its sha256.</p>",
        _overview(page),
        _gate(page),
        _decision(page),
        "<h2>Training curve</h2>",
        f'<div class="chart">{page.training_chart_svg}</div>',
        "<h2>Composite by iteration</h2>",
        f'<div class="chart">{page.composite_chart_svg}</div>',
        _diff(page),
        _patterns(page),
        _training(page),
        _files(page),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>"
            + "\n".join(sections) + "</main></body></html>\n")
