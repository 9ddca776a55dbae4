"""Evidence bundles: one self-contained page plus a tarball whose hashes verify offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from html import escape
from html import unescape as html_unescape
from pathlib import Path

import anyio
import pytest
from support.promotion_home import (
    CLUSTER,
    CORE_IDS,
    PromotionHome,
    Reviewer,
    allow_signers,
    engine_pool_for,
    make_reviewer,
)

from modelsmith.errors import NotFound
from modelsmith.loop.promotion.bundle import MANIFEST, TARBALL, failure_patterns, verify_bundle
from modelsmith.loop.promotion.bundle_html import BundlePage, render_page
from modelsmith.loop.promotion.service import PromotionService, Requester
from modelsmith.loop.records.approval import make_statement
from modelsmith.rpc.schema.evals import CriterionOutcome, ScenarioResult

ME = Requester(uid=os.getuid(), pid=os.getpid(), username="agent")


@pytest.fixture(scope="module")
def alice(tmp_path_factory: pytest.TempPathFactory) -> Reviewer:
    return make_reviewer(tmp_path_factory.mktemp("keys"), "alice")


async def _approved_bundle(tmp_path: Path, alice: Reviewer) -> tuple[PromotionService, Path, str]:
    home = PromotionHome(tmp_path / "home")
    allow_signers(home.home, f"alice {alice.public_line}")
    home.trained_candidate()
    fleet, runtime = home.open()
    pool, _ = engine_pool_for(runtime.cluster)
    service = PromotionService(fleet, pool, home.home)
    requested = await service.request(CLUSTER, ME, note="ready")
    statement = make_statement(cluster=CLUSTER, decision="approve", reason="ok",
                               request_id=requested.request_id, request_digest=requested.sha256)
    await service.decide(CLUSTER, requested.request_id, statement.decode(), alice.sign(statement))
    exported = await service.export_bundle(CLUSTER, requested.request_id)
    return service, Path(exported.directory), requested.request_id


async def test_the_bundle_holds_everything_it_shows_and_verifies(
    tmp_path: Path, alice: Reviewer
) -> None:
    service, directory, request_id = await _approved_bundle(tmp_path, alice)

    assert directory == tmp_path / "home" / CLUSTER / "bundles" / request_id
    expected = {"index.html", "record/promotion-request.json", "record/decision.json",
                "evals/candidate-summary.json", "evals/baseline-summary.json",
                "analysis/diff.json", "analysis/comparison.json", "analysis/failure-patterns.json",
                "analysis/training-curve.json", "analysis/composite-by-iteration.json",
                "charts/training-curve.svg", "charts/composite-by-iteration.svg",
                "analysis/receipts.json", "charts/receipts.svg", "analysis/judges.json",
                "training/training_manifest.json", "training/leakage-proof.json",
                "training/run.json", MANIFEST, "MANIFEST.sig", TARBALL}
    assert {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()} \
        == expected
    with tarfile.open(directory / TARBALL) as tar:
        members = {m.name for m in tar.getmembers()}
    assert members == {f"{request_id}/{name}" for name in expected - {TARBALL}}
    request_file = next((tmp_path / "home" / CLUSTER / "promotions").glob(f"*{request_id}.json"))
    assert (directory / "record/promotion-request.json").read_bytes() == request_file.read_bytes()
    diff = json.loads((directory / "analysis/diff.json").read_text())
    assert diff["fixed_count"] == 3 and diff["regressed_count"] == 0  # core-1, core-2, held-2
    curve = json.loads((directory / "analysis/training-curve.json").read_text())
    assert [p["step"] for p in curve] == list(range(1, 21))
    proof = json.loads((directory / "training/leakage-proof.json").read_text())
    assert proof["ok"] is True and proof["overlapping_ids"] == []
    assert verify_bundle(directory) == []
    assert verify_bundle(directory, service.key().public_key_b64) == []


async def test_the_bundle_carries_the_receipts_as_of_the_request(
    tmp_path: Path, alice: Reviewer
) -> None:
    home = PromotionHome(tmp_path / "home")
    home.trained_candidate()
    home.add_eval("frontier-full", None, set(), engine="frontier")  # a named engine: all fail
    home.add_eval("frontier-quick", None, set(), engine="frontier", quick=True)  # not a receipt
    home.add_eval("old-sets", None, set(), engine="oldie", scenario_sets={"core": "0" * 64,
                                                                        "held-out": "1" * 64})
    fleet, runtime = home.open()
    pool, _ = engine_pool_for(runtime.cluster)
    service = PromotionService(fleet, pool, home.home)
    requested = await service.request(CLUSTER, ME, note="ready")
    home.add_eval("later-full", None, set(), engine="later")  # after the request: not in it
    exported = await service.export_bundle(CLUSTER, requested.request_id)
    directory = Path(exported.directory)

    receipt = json.loads((directory / "analysis/receipts.json").read_text())
    rows = {r["subject"]: r for r in receipt["rows"]}
    assert set(rows) == {"base", "champion", "candidate iter-1", "frontier", "oldie"}
    assert rows["candidate iter-1"]["status"] == "current" and rows["candidate iter-1"]["rank"] == 1
    assert rows["candidate iter-1"]["tag"] == "iter-1-full"
    assert rows["base"]["status"] == "current" and rows["base"]["tag"] == "base-eval"
    assert rows["frontier"]["tag"] == "frontier-full" and rows["frontier"]["composite"] == 0.0
    assert rows["frontier"]["rank"] == 3
    assert rows["champion"]["status"] == "missing"
    assert rows["oldie"]["status"] == "stale" and rows["oldie"]["rank"] is None
    assert [r["rank"] for r in receipt["rows"]][:3] == [1, 2, 3]  # ranked rows first
    html = (directory / "index.html").read_text()
    assert "<h2>Receipts</h2>" in html and "frontier-full" in html and "later-full" not in html
    svg = (directory / "charts/receipts.svg").read_text()
    assert svg.startswith("<svg") and svg in html
    assert verify_bundle(directory) == []


async def test_the_page_is_self_contained_with_inline_svg_charts(
    tmp_path: Path, alice: Reviewer
) -> None:
    _, directory, request_id = await _approved_bundle(tmp_path, alice)

    html = (directory / "index.html").read_text()

    assert html.count("<svg") >= 2
    assert "<script" not in html
    for reference in ('src="http', "src='http", 'href="http', "url(http", "@import"):
        assert reference not in html
    assert request_id in html and "alice" in html


async def test_an_altered_file_fails_verification_in_the_directory_and_the_tarball(
    tmp_path: Path, alice: Reviewer
) -> None:
    _, directory, request_id = await _approved_bundle(tmp_path, alice)
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    summary = copy / "evals" / "candidate-summary.json"
    summary.write_bytes(summary.read_bytes().replace(b"0.888889", b"0.988889"))

    problems = verify_bundle(copy)
    assert any("evals/candidate-summary.json" in p and "altered" in p for p in problems)

    # Repack the altered tree as a tarball: the MANIFEST inside gives it away too.
    tarball = tmp_path / "altered.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for path in sorted(copy.rglob("*")):
            if path.is_file() and path.name != TARBALL:
                tar.add(path, arcname=f"{request_id}/{path.relative_to(copy).as_posix()}")
    assert any("candidate-summary.json" in p for p in verify_bundle(tarball))


async def test_a_rewritten_manifest_fails_the_daemon_signature(
    tmp_path: Path, alice: Reviewer
) -> None:
    _, directory, _ = await _approved_bundle(tmp_path, alice)
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    (copy / TARBALL).unlink()
    diff = copy / "analysis" / "diff.json"
    diff.write_text(diff.read_text().replace('"regressed_count": 0', '"regressed_count": 9'))
    # A forger who also fixes the MANIFEST still cannot re-sign it.
    lines = (copy / MANIFEST).read_text().splitlines()
    fixed = [f"{hashlib.sha256(diff.read_bytes()).hexdigest()}  analysis/diff.json"
             if line.endswith("  analysis/diff.json") else line for line in lines]
    (copy / MANIFEST).write_text("\n".join(fixed) + "\n")

    problems = verify_bundle(copy)

    assert problems and all("signature" in p for p in problems)


async def test_exporting_an_unknown_request_is_not_found(tmp_path: Path, alice: Reviewer) -> None:
    service, _, _ = await _approved_bundle(tmp_path, alice)
    with pytest.raises(NotFound):
        await service.export_bundle(CLUSTER, "no-such-request")


def test_failure_patterns_group_failed_criteria_by_type_and_error_kind() -> None:
    def result(scenario_id: str, *criteria: tuple[str, bool, str | None]) -> ScenarioResult:
        outcomes = [CriterionOutcome(name=t, type=t, weight=1.0, score=float(ok), passed=ok,
                                     detail="", error_kind=kind) for t, ok, kind in criteria]
        passed = all(ok for _, ok, _ in criteria)
        return ScenarioResult(
            scenario_id=scenario_id, set="core", domain="d", tags=[], weight=1.0,
            scenario_hash="0" * 64, prompt="p", response="r", reference=None,
            score=float(passed), passed=passed, pass_mark=0.5, judge_error=False,
            criteria=outcomes, finish_reason="stop", completion_tokens=1)

    patterns = failure_patterns([
        result("a", ("json_schema", False, "invalid_json"), ("length", True, None)),
        result("b", ("json_schema", False, "invalid_json")),
        result("c", ("numeric", False, "out_of_tolerance")),
        result("d", ("numeric", True, None)),
    ])

    assert [(p["criterion_type"], p["error_kind"], p["count"], p["examples"]) for p in patterns] == [
        ("json_schema", "invalid_json", 2, ["a", "b"]),
        ("numeric", "out_of_tolerance", 1, ["c"]),
    ]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Lays the page out in a frame of the given width (headless Chromium's window is at least
# 500 px wide), measures it and writes the numbers into the DOM for --dump-dom to return.
_PROBE = """<!DOCTYPE html><html><body style="margin:0">
<iframe id="page" style="width:WIDTHpx;height:1600px;border:0" srcdoc="SRCDOC"></iframe>
<script>
const frame = document.getElementById('page');
frame.onload = () => {
  const doc = frame.contentDocument, win = frame.contentWindow;
  const box = e => e.getBoundingClientRect();
  const cards = [...doc.querySelectorAll('.cards .card')].map(c => Math.round(box(c).top));
  const tables = [...doc.querySelectorAll('table')].map(t => {
    const cells = t.querySelectorAll('tbody tr:last-child > td');
    const last = cells[cells.length - 1];
    return {table: win.getComputedStyle(t).borderBottomStyle + ' ' +
              win.getComputedStyle(t).borderBottomWidth,
            lastCell: last ? win.getComputedStyle(last).borderBottomStyle : 'none'};
  });
  const chart = doc.querySelectorAll('.chart')[1];
  const legend = chart.querySelector('[id^="legend"]');
  const axes = chart.querySelector('[id^="axes"] [id^="patch"]');
  const out = {width: win.innerWidth, scrollWidth: doc.documentElement.scrollWidth,
               cards, tables, legendLeft: box(legend).left, axesRight: box(axes).right,
               details: doc.querySelectorAll('details').length};
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
};
</script></body></html>"""


async def _chromium_run(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    chromium = _chromium()
    assert chromium is not None
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    with anyio.fail_after(120):
        completed = await anyio.run_process(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", *args],
            check=False, env={**os.environ, "HOME": str(tmp_path)})
    return (completed.returncode, completed.stdout.decode(errors="replace"),
            completed.stderr.decode(errors="replace"))


def _rows(tops: list[int]) -> list[int]:
    """How many cards sit on each row, top to bottom."""
    return [tops.count(top) for top in sorted(set(tops))]


@pytest.mark.skipif(_chromium() is None,
                    reason="Debian's chromium package is not installed (apt-get install chromium)")
@pytest.mark.parametrize(("width", "columns"), [(1280, 4), (390, 2)])
async def test_the_page_lays_out_at_desktop_and_phone_width_in_headless_chromium(
    tmp_path: Path, alice: Reviewer, width: int, columns: int
) -> None:
    import matplotlib.image

    _, directory, _ = await _approved_bundle(tmp_path, alice)
    screenshot = tmp_path / f"page-{width}.png"
    _, _, stderr = await _chromium_run(tmp_path, f"--screenshot={screenshot}",
                                       f"--window-size={width},1600",
                                       (directory / "index.html").as_uri())
    assert screenshot.is_file(), stderr[-2000:]
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[:2] == (1600, width)
    assert float(pixels[..., :3].std()) > 0.05  # text, tables and charts, not a blank page

    probed = tmp_path / "probe.html"  # the bundle's own page has no script: a frame holds it
    probed.write_text(_PROBE.replace("WIDTH", str(width)).replace(
        "SRCDOC", escape((directory / "index.html").read_text(), quote=True)))
    _, dom, stderr = await _chromium_run(tmp_path, "--dump-dom", "--virtual-time-budget=5000",
                                         f"--window-size={width + 40},1700", probed.as_uri())
    assert '<pre id="probe">' in dom, stderr[-2000:]
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    layout = json.loads(html_unescape(dom[start:dom.index("</pre>", start)]))

    assert layout["width"] == width
    assert layout["scrollWidth"] <= width  # nothing widens the page past the screen
    assert _rows(layout["cards"]) == [columns] * (8 // columns)  # full rows: no card alone
    assert layout["tables"] and all(t["table"] == "solid 1px" and t["lastCell"] == "none"
                                    for t in layout["tables"])  # the table draws its bottom
    assert layout["legendLeft"] >= layout["axesRight"]  # the legend is beside the plot
    assert layout["details"] == 3  # core-1, core-2 and held-2 fixed, each collapsible


async def test_every_fixed_and_regressed_scenario_is_on_the_page_with_its_evidence(
    tmp_path: Path,
) -> None:
    home = PromotionHome(tmp_path / "home", max_regressions=1)
    (home.root / "models" / "tiny-llama").mkdir(parents=True)
    (home.root / "models" / "tiny-llama" / "config.json").write_text('{"model_type": "llama"}')
    spec_dir = home.root / "train" / "train-1"
    spec_dir.mkdir(parents=True)
    (spec_dir / "spec.json").write_text(json.dumps({
        "job_id": "train-1", "lora": {"r": 16, "alpha": 32},
        "grpo": {"max_steps": 20, "learning_rate": 0.002, "beta": 0.04}}))
    # core-3 passed in the base eval and fails now; core-1, core-2, held-2, held-3 are fixed.
    home.trained_candidate(passed=set(CORE_IDS) - {"core-3"} | {"held-1", "held-2", "held-3"})
    fleet, runtime = home.open()
    pool, _ = engine_pool_for(runtime.cluster)
    service = PromotionService(fleet, pool, home.home)
    requested = await service.request(CLUSTER, ME, note="one regression")
    exported = await service.export_bundle(CLUSTER, requested.request_id)
    directory = Path(exported.directory)
    html = (directory / "index.html").read_text()
    diff = json.loads((directory / "analysis/diff.json").read_text())
    run = json.loads((directory / "training/run.json").read_text())
    proof = json.loads((directory / "training/leakage-proof.json").read_text())
    request = json.loads((directory / "record/promotion-request.json").read_text())

    assert [s["scenario_id"] for s in diff["regressed"]] == ["core-3"]
    assert [s["scenario_id"] for s in diff["fixed"]] == ["core-1", "core-2", "held-2", "held-3"]
    regressed = diff["regressed"][0]
    assert (regressed["response_a"], regressed["response_b"]) == ("4", "five")
    assert regressed["criteria_b"][0]["detail"] == "expected 4"
    assert html.count("<details>") == 5
    section = html[html.index('id="regressed"'):html.index('id="fixed"')]
    for shown in ("core-3", "What is the floor price for core-3?", "five", "expected 4",
                  "wrong_answer"):
        assert escape(shown) in section
    assert (run["stop_reason"], run["steps"]) == ("completed", 20)
    assert run["hyperparameters"]["grpo"]["learning_rate"] == 0.002
    assert "grpo.learning_rate" in html and "completed" in html
    identity = request["model"]["base_model_sha256"]
    assert identity and identity in html
    # The hash the trainer recorded, not "—".
    assert proof["held_out_ids_sha256"] in html


def test_the_page_shows_intervals_the_paired_test_tags_and_how_much_is_format() -> None:
    summary = {"composite_ci95": [0.71, 0.86], "held_out_ci95": [0.55, 0.8],
               "format_score": 0.98, "substance_score": 0.7,
               "by_tag": {"unseen-type": {"score": 0.5, "count": 6, "passed": 2}},
               "by_tag_ci95": {"unseen-type": [0.33, 0.67]}}
    comparison = {"format_delta": 0.3, "substance_delta": 0.1,
                  "paired": {"n": 54, "fixed": 12, "regressed": 2, "mcnemar_p": 0.0129,
                             "sign_p": 0.02, "mean_delta": 0.2, "delta_ci95": [0.1, 0.3]}}
    page = BundlePage(
        request={"request_id": "r1", "cluster": "c", "eval": {"composite": 0.8}},
        status="pending", decision=None, candidate_summary=summary,
        baseline_summary={"by_tag": {"unseen-type": {"score": 0.4, "count": 6, "passed": 1}}},
        baseline_label="baseline eval b", diff={}, comparison=comparison, failure_patterns=[],
        training_manifest=None, training_run={}, leakage_proof={}, training_chart_svg="",
        composite_chart_svg="", files=[])

    html = render_page(page)

    assert "71.0–86.0%" in html and "55.0–80.0%" in html  # composite and held-out intervals
    assert "0.013" in html and "12 / 2" in html  # McNemar p and the discordant pairs
    assert "format is 75% of the summed rise" in html  # 0.3 of 0.3 + 0.1
    tags = html[html.index("Scores by tag"):]
    assert "unseen-type" in tags and "33.0–67.0%" in tags and "+10.0 pt" in tags
