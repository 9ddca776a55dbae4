"""Evidence bundles: one self-contained page plus a tarball whose hashes verify offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import anyio
import pytest
from support.promotion_home import (
    CLUSTER,
    PromotionHome,
    Reviewer,
    allow_signers,
    engine_pool_for,
    make_reviewer,
)

from modelsmith.errors import NotFound
from modelsmith.loop.promotion.bundle import MANIFEST, TARBALL, failure_patterns, verify_bundle
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
                "analysis/diff.json", "analysis/failure-patterns.json",
                "analysis/training-curve.json", "analysis/composite-by-iteration.json",
                "charts/training-curve.svg", "charts/composite-by-iteration.svg",
                "training/training_manifest.json", "training/leakage-proof.json",
                MANIFEST, "MANIFEST.sig", TARBALL}
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


@pytest.mark.skipif(_chromium() is None,
                    reason="Debian's chromium package is not installed (apt-get install chromium)")
async def test_the_page_renders_in_headless_chromium_and_is_not_blank(
    tmp_path: Path, alice: Reviewer
) -> None:
    import matplotlib.image

    _, directory, _ = await _approved_bundle(tmp_path, alice)
    screenshot = tmp_path / "page.png"
    profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp_path))
    chromium = _chromium()
    assert chromium is not None
    with anyio.fail_after(120):
        completed = await anyio.run_process(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={screenshot}",
             "--window-size=1200,1600", (directory / "index.html").as_uri()],
            check=False, env={**os.environ, "HOME": str(tmp_path)})

    assert screenshot.is_file(), completed.stderr.decode(errors="replace")[-2000:]
    pixels = matplotlib.image.imread(screenshot)
    assert pixels.shape[0] == 1600 and pixels.shape[1] == 1200
    assert float(pixels[..., :3].std()) > 0.05  # text, tables and charts, not a blank page
