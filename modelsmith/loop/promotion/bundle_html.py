"""The evidence bundle's ``index.html``: one self-contained page (inline CSS and SVG, no links
out, no scripts) that a reviewer opens before signing. Standard library only.

Statistics (intervals, the paired test, format and substance scores) are shown as the eval
summary and eval.compare carry them; a summary written before they existed shows "—" and says
so, and the page never computes a figure of its own that could disagree with the gate's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

__all__ = ["BundlePage", "render_page"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:#f6f7f9;color:#1d232b}
main{max-width:1100px;margin:0 auto;padding:24px 28px 48px}
h1{font-size:22px;margin:0 0 4px;overflow-wrap:anywhere}h2{font-size:17px;margin:28px 0 10px;
border-bottom:1px solid #d5dae1;padding-bottom:4px}h3{font-size:15px;margin:18px 0 8px}
.sub{color:#5b6674;margin:0 0 16px}
.cards{display:grid;grid-template-columns:repeat(4,minmax(0,1fr));gap:10px}
.card{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:10px 12px;min-width:0}
.card b{display:block;font-size:12px;color:#5b6674;font-weight:600;text-transform:uppercase}
.card span{font-size:18px;font-weight:600}.card small{display:block;font-weight:400}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:separate;border-spacing:0;width:100%;background:#fff;
border:1px solid #c9d0d8;border-radius:4px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eef1f4;vertical-align:top}
tbody tr:last-child>td{border-bottom:none}
th{background:#eef1f4;font-size:12px;text-transform:uppercase;color:#44505e}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;
word-break:break-all}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:2px 0 8px;background:#f6f7f9;
padding:6px 8px;border-radius:4px;font-size:12px}
details{background:#fff;border:1px solid #dde2e8;border-radius:6px;margin:6px 0;
padding:6px 10px}
summary{cursor:pointer;font-weight:600}details[open] summary{margin-bottom:6px}
.pass{color:#0b7a3e;font-weight:600}.fail{color:#b42318;font-weight:600}
.status{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;
background:#e8eefc;color:#1f4fbf}
.chart{background:#fff;border:1px solid #dde2e8;border-radius:8px;padding:8px;margin:8px 0}
.chart svg{width:100%;height:auto}
.muted{color:#5b6674}
@media (max-width:640px){main{padding:16px 12px 32px}
.cards{grid-template-columns:repeat(2,minmax(0,1fr))}}
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
    comparison: dict[str, Any] | None  # eval.compare of baseline vs candidate
    failure_patterns: list[dict[str, Any]]
    training_manifest: dict[str, Any] | None
    training_run: dict[str, Any]  # hyperparameters, stop reason, steps, base identity
    leakage_proof: dict[str, Any]
    training_chart_svg: str
    composite_chart_svg: str
    files: Sequence[tuple[str, str, int]]  # (path, sha256, size)
    receipts: dict[str, Any] | None = None  # bundle.receipts: base, champion, candidate, engines
    receipts_chart_svg: str = ""
    judges: list[dict[str, Any]] = field(default_factory=list)  # each judge's latest check


def _e(value: object) -> str:
    return escape("—" if value is None else str(value))


def _pct(value: object) -> str:
    return f"{float(value) * 100:.1f}%" if isinstance(value, int | float) else "—"


def _ci(value: object) -> str:
    """A [low, high] interval as percentages; "—" when the summary has none."""
    if (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int | float) for v in value)):
        return f"{float(value[0]) * 100:.1f}–{float(value[1]) * 100:.1f}%"
    return "—"


def _delta(value: object, scale: float = 100.0, unit: str = " pt") -> str:
    return f"{float(value) * scale:+.1f}{unit}" if isinstance(value, int | float) else "—"


def _p(value: object) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{float(value):.2g}" if value < 0.001 else f"{float(value):.3f}"


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
    # Wide tables scroll inside their box on a phone instead of widening the page.
    return f'<div class="scroll"><table>{thead}<tbody>{body}</tbody></table></div>'



def _overview(page: BundlePage) -> str:
    request = page.request
    summary = page.candidate_summary or {}
    policy = request.get("policy", {})
    adapter = request.get("adapter", {})
    evaluation = request.get("eval", {})
    paired = (page.comparison or {}).get("paired") or {}
    diff = page.diff
    # Eight cards: four columns at desktop width and two on a phone, so no row is left with
    # a card alone.
    cards = [
        _card("Status", f'<span class="status">{_e(page.status)}</span>'),
        _card("Iteration", _e(request.get("iteration"))),
        _card("Composite", f"{_pct(evaluation.get('composite'))} "
              f"<small class='muted'>95% {_ci(summary.get('composite_ci95'))} · "
              f"gate ≥ {_pct(policy.get('composite_threshold'))}</small>"),
        _card("Held-out", f"{_pct(evaluation.get('held_out'))} "
              f"<small class='muted'>95% {_ci(summary.get('held_out_ci95'))} · "
              f"gate ≥ {_pct(policy.get('held_out_threshold'))}</small>"),
        _card("Fixed / regressed", f"{_e(diff.get('fixed_count'))} / "
              f"{_e(diff.get('regressed_count'))} <small class='muted'>gate counts "
              f"{_e((request.get('regressions') or {}).get('count'))} regressions</small>"),
        _card("Paired test", f"p = {_p(paired.get('mcnemar_p'))} "
              "<small class='muted'>McNemar, exact, on pass/fail</small>"),
        _card("Substance Δ", f"{_delta((page.comparison or {}).get('substance_delta'))} "
              f"<small class='muted'>format Δ "
              f"{_delta((page.comparison or {}).get('format_delta'))}</small>"),
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


def _format_share(format_delta: object, substance_delta: object) -> str:
    """One sentence on how much of the gain is format (both deltas from eval.compare)."""
    if not (isinstance(format_delta, int | float) and isinstance(substance_delta, int | float)):
        return ("This eval does not split format from substance (its summary predates the "
                "split), so how much of the gain is format is not known.")
    gains = max(float(format_delta), 0.0) + max(float(substance_delta), 0.0)
    if gains <= 0:
        return (f"Neither score rose (format {_delta(format_delta)}, substance "
                f"{_delta(substance_delta)}).")
    share = max(float(format_delta), 0.0) / gains
    return (f"Format {_delta(format_delta)}, substance {_delta(substance_delta)}: format is "
            f"{share * 100:.0f}% of the summed rise. A gain that is mostly format (a valid "
            "label, the right length) says little about whether the answers got right.")


def _numbers(page: BundlePage) -> str:
    base = page.baseline_summary or {}
    cand = page.candidate_summary or {}
    compared = page.comparison or {}
    rows = []
    for label, key, ci_key in (("composite", "composite", "composite_ci95"),
                               ("held-out", "held_out", "held_out_ci95"),
                               ("format", "format_score", None),
                               ("substance", "substance_score", None)):
        a, b = base.get(key), cand.get(key)
        change = (b - a) if isinstance(a, int | float) and isinstance(b, int | float) else None
        rows.append((f"<b>{label}</b>", _pct(a), _ci(base.get(ci_key)) if ci_key else "",
                     _pct(b), _ci(cand.get(ci_key)) if ci_key else "", _delta(change)))
    table = _table(["score", "baseline", "95% interval", "candidate", "95% interval", "Δ"],
                   rows, "")
    paired = compared.get("paired") or {}
    if paired:
        facts = [("Scenarios paired", _e(paired.get("n"))),
                 ("Fixed / regressed (discordant pairs)",
                  f"{_e(paired.get('fixed'))} / {_e(paired.get('regressed'))}"),
                 ("McNemar exact p (pass/fail)", _p(paired.get("mcnemar_p"))),
                 ("Sign test p (score deltas)", _p(paired.get("sign_p"))),
                 ("Mean score Δ per scenario",
                  f"{_delta(paired.get('mean_delta'))} (95% {_ci(paired.get('delta_ci95'))})")]
        paired_html = _table(["", ""], [(f"<b>{escape(k)}</b>", v) for k, v in facts], "")
    else:
        paired_html = ('<p class="muted">No paired test: the comparison of these two evals '
                       "carries none (written before eval.compare reported it).</p>")
    repeats = cand.get("repeats")
    flaky = cand.get("flaky")
    trials = (f"<p>Each scenario sampled {_e(repeats)} times; pass^k {_pct(cand.get('pass_at_k'))}"
              f"; flaky: {_e(len(flaky) if isinstance(flaky, list) else flaky)}.</p>"
              if isinstance(repeats, int) and repeats > 1 else "")
    return ("<h2>The decision in numbers</h2>"
            f"<p class='muted'>Baseline: {_e(page.baseline_label)}. Intervals are the eval's "
            "own (bootstrap over scenarios with their weights).</p>" + table
            + "<h3>Paired test, candidate vs baseline on the same scenarios</h3>" + paired_html
            + "<h3>Format versus substance</h3>"
            + f"<p>{escape(_format_share(compared.get('format_delta'), compared.get('substance_delta')))}</p>"
            + trials)


def _by_tag(page: BundlePage) -> str:
    cand = page.candidate_summary or {}
    base = page.baseline_summary or {}
    intervals = cand.get("by_tag_ci95") or {}
    before = base.get("by_tag") or {}
    rows = []
    for tag, group in sorted((cand.get("by_tag") or {}).items()):
        prior = before.get(tag) or {}
        score, old = group.get("score"), prior.get("score")
        change = (score - old) if isinstance(score, int | float) and isinstance(
            old, int | float) else None
        rows.append((f"<code>{escape(tag)}</code>", _e(group.get("count")),
                     f"{_e(group.get('passed'))}/{_e(group.get('count'))}", _pct(old),
                     _pct(score), _ci(intervals.get(tag)), _delta(change)))
    return "<h2>Scores by tag</h2>" + _table(
        ["tag", "scenarios", "passed", "baseline", "candidate", "95% interval", "Δ"], rows,
        "the candidate's summary has no tags")


def _receipts(page: BundlePage) -> str:
    receipt = page.receipts or {}
    rows = []
    for row in receipt.get("rows", []):
        shown = row.get("status") in ("current", "stale")
        status = row.get("status")
        rows.append((_e(row.get("rank")), escape(str(row.get("subject"))),
                     f"<code>{_e(row.get('tag'))}</code>", _e(status),
                     _pct(row.get("composite")) if shown else "—",
                     _ci(row.get("composite_ci95")) if shown else "—",
                     _pct(row.get("held_out")) if shown else "—",
                     _pct(row.get("pass_rate")) if shown else "—",
                     _e(row.get("latency_p50_s")), _e(row.get("latency_p95_s")),
                     _e(row.get("cost_per_1k_scenarios_usd")), _e(row.get("note"))))
    sets = ", ".join(f"{k} {str(v)[:12]}" for k, v in sorted((receipt.get("scenario_sets") or {}).items()))
    return ("<h2>Receipts</h2><p class='muted'>The base model, champion, candidate and each named "
            "engine on the sets the candidate was evaluated on (" + escape(sets or "—") + "), as of "
            "the request; ranked by composite. Stale rows ran on older set versions and are not "
            "ranked.</p>"
            + (f'<div class="chart">{page.receipts_chart_svg}</div>' if page.receipts_chart_svg else "")
            + _table(["#", "subject", "eval", "status", "composite", "95% interval", "held-out",
                      "pass", "p50 s", "p95 s", "$ / 1k", "note"], rows, "no receipts"))


def _gate(page: BundlePage) -> str:
    rows = [(f"<code>{_e(c.get('check'))}</code>", _mark(c.get("passed")), _e(c.get("detail")))
            for c in page.request.get("gate", [])]
    return "<h2>Policy gate</h2>" + _table(["check", "result", "detail"], rows, "no checks")


def _judges(page: BundlePage) -> str:
    def figure(check: dict[str, Any], name: str) -> str:
        value = check.get(name)
        return "—" if value is None else f"{float(value):.3f}{_ci(check.get(name + '_ci95'))}"

    rows = [(_e(c.get("judge")), f"{_e(c.get('engine'))} <span class='muted'>({_e(c.get('engine_model'))})</span>",
             figure(c, "kappa"), figure(c, "spearman"), _pct(c.get("exact_rate")),
             _pct(c.get("within_one_rate")), f"{_e(c.get('answered'))} / {_e(c.get('examples'))}",
             _e(c.get("consistency_mean_spread")), _e(c.get("checked_at")),
             f"<code>{_e(str(c.get('identity', ''))[:12])}</code>") for c in page.judges]
    return ("<h2>Judges</h2><p class='muted'>Each judge's latest check against its human-labelled "
            "calibration set before this request (docs/judges.md); the gate's "
            "<code>judge_agreement</code> check says whether it is the current judge.</p>"
            + _table(["judge", "engine", "kappa", "spearman", "exact", "within one", "answered",
                      "spread", "checked", "identity"], rows, "no judge was checked"))


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


def _criteria_table(criteria: Sequence[dict[str, Any]]) -> str:
    rows = [(f"<code>{_e(c.get('name'))}</code>", _e(c.get("type")), _e(c.get("weight")),
             f"{float(c.get('score') or 0.0):.2f}", _mark(c.get("passed")),
             _e(c.get("error_kind") or ""), _e(c.get("detail")))
            for c in criteria]
    return _table(["criterion", "type", "weight", "score", "result", "error", "detail"], rows,
                  "no criteria recorded")


def _scenario_details(entry: dict[str, Any]) -> str:
    head = (f"<code>{_e(entry['scenario_id'])}</code> · {_e(entry['set'])} · "
            f"{entry['score_a']:.2f} → {entry['score_b']:.2f}")
    if "prompt" not in entry:
        return f"<details><summary>{head}</summary><p class='muted'>no details</p></details>"
    tags = ", ".join(escape(str(t)) for t in entry.get("tags", []))
    return (f"<details><summary>{head}</summary>"
            f"<p class='muted'>tags: {tags or '—'}</p>"
            f"<b>Prompt</b><pre>{_e(entry.get('prompt'))}</pre>"
            f"<b>Reference</b><pre>{_e(entry.get('reference'))}</pre>"
            f"<b>Baseline response</b><pre>{_e(entry.get('response_a'))}</pre>"
            + _criteria_table(entry.get("criteria_a", []))
            + f"<b>Candidate response</b><pre>{_e(entry.get('response_b'))}</pre>"
            + _criteria_table(entry.get("criteria_b", [])) + "</details>")


def _diff(page: BundlePage) -> str:
    diff = page.diff
    out = [f"<h2>Scenario diff vs {_e(page.baseline_label)}</h2>",
           f"<p>{_e(diff.get('fixed_count'))} fixed, {_e(diff.get('regressed_count'))} "
           f"regressed, {_e(diff.get('unchanged_count'))} unchanged. Open a scenario for its "
           "prompt, both responses, the reference and each criterion.</p>"]
    for status in ("regressed", "fixed"):
        entries = diff.get(status, [])
        out.append(f'<h3 id="{status}">{status.capitalize()} ({len(entries)})</h3>')
        out.append("".join(_scenario_details(e) for e in entries)
                   or f'<p class="muted">none {status}</p>')
    return "".join(out)


def _patterns(page: BundlePage) -> str:
    rows = [(f"<code>{_e(p['criterion_type'])}</code>", _e(p["error_kind"]), _e(p["count"]),
             ", ".join(f"<code>{escape(x)}</code>" for x in p["examples"]))
            for p in page.failure_patterns]
    return "<h2>Failure patterns of the candidate</h2>" + _table(
        ["failing criterion", "error kind", "count", "examples"], rows, "no failures")


def _identity(page: BundlePage) -> str:
    recorded = page.request.get("model", {}).get("base_model_sha256")
    trained = page.training_run.get("base_model_sha256")
    if recorded and trained:
        verdict = (_mark(recorded == trained)
                   + (" the adapter was trained on this base" if recorded == trained
                      else " the adapter was trained on another base"))
    else:
        verdict = '<span class="muted">not recorded on both sides</span>'
    return (f"<code>{_e(recorded)}</code> in the promotion record; <code>{_e(trained)}</code> "
            f"in the training manifest: {verdict}")


def _hyperparameters(run: dict[str, Any]) -> str:
    hyper = run.get("hyperparameters") or {}
    if not hyper:
        return '<p class="muted">The trainer\'s spec.json is gone; no hyperparameters.</p>'
    rows = [(f"<code>{escape(block)}.{escape(name)}</code>", f"<code>{_e(value)}</code>")
            for block, values in sorted(hyper.items()) if isinstance(values, dict)
            for name, value in sorted(values.items())]
    return (f"<p class='muted'>From {_e(run.get('hyperparameters_source'))}, the spec the "
            "trainer ran with.</p>" + _table(["hyperparameter", "value"], rows, ""))


def _training(page: BundlePage) -> str:
    manifest = page.training_manifest or {}
    run = page.training_run
    proof = page.leakage_proof
    own = manifest.get("leakage_check") or {}
    trained_hash = own.get("held_out_ids_sha256") if isinstance(own, dict) else None
    today_hash = proof.get("held_out_ids_sha256")
    same = (f" ({'same as' if trained_hash == today_hash else 'differs from'} today's set)"
            if trained_hash and today_hash else "")
    facts = [
        ("Job", _e(run.get("train_job") or manifest.get("job_id"))),
        ("Stop reason", f"<b>{_e(run.get('stop_reason'))}</b> after {_e(run.get('steps'))} "
                        "steps (ledger iteration.advanced)"),
        ("Trained on failures of", _e(manifest.get("eval_tag"))),
        ("Training scenarios", _e(len(manifest.get("scenarios", [])))),
        ("Near-miss margin", _e(manifest.get("near_miss_margin"))),
        ("Init adapter", _e(manifest.get("init_adapter"))),
        ("Base model", f"<code>{_e(manifest.get('base_model'))}</code>"),
        ("Base model identity (sha256)", _identity(page)),
        ("Held-out ids sha256 at training", f"<code>{_e(trained_hash)}</code>{same}"),
        ("Trainer's leakage check", _mark(proof.get("trainer_check_ok"))),
        ("Re-check vs today's held-out set",
         f"{_mark(proof.get('ok'))} {_e(proof.get('held_out_count'))} held-out scenarios, "
         f"{_e(len(proof.get('overlapping_ids', [])))} shared ids, "
         f"{_e(len(proof.get('overlapping_hashes', [])))} shared hashes"),
    ]
    return ("<h2>Training and leakage proof</h2>"
            + _table(["", ""], [(f"<b>{escape(k)}</b>", v) for k, v in facts], "")
            + "<h3>Hyperparameters</h3>" + _hyperparameters(run))


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
        _numbers(page),
        _gate(page),
        _judges(page),
        _decision(page),
        "<h2>Training curve</h2>",
        f'<div class="chart">{page.training_chart_svg}</div>',
        "<h2>Composite by iteration</h2>",
        f'<div class="chart">{page.composite_chart_svg}</div>',
        _by_tag(page),
        _receipts(page),
        _diff(page),
        _patterns(page),
        _training(page),
        _files(page),
    ]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>"
            + "\n".join(sections) + "</main></body></html>\n")
