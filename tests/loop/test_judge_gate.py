"""The gate's judge_agreement check, on a real home: a judge used by the eval needs a passing
check of its current identity (engine + model, template, calibration set) once
``[policy] min_judge_agreement`` is set."""

from __future__ import annotations

import json
from pathlib import Path

from support.promotion_home import PromotionHome

from modelsmith.loop.eval.judge_calibration import judge_identity, load_calibration
from modelsmith.loop.promotion.policy import check_policy
from modelsmith.loop.records.events import JudgeChecked, ScenariosChanged
from modelsmith.loop.scoring.scenarios import load_catalog

TEMPLATE = "Grade: {response} vs {reference}. SCORE: 0..{scale}"


def judged_home(tmp_path: Path, *, minimum: float | None, template: str = TEMPLATE) -> PromotionHome:
    home = PromotionHome(tmp_path)
    if minimum is not None:
        toml = home.root / "cluster.toml"
        toml.write_text(toml.read_text() + f"min_judge_agreement = {minimum}\n")
    core = home.root / "scenarios" / "core" / "s.jsonl"
    lines = [json.loads(line) for line in core.read_text().splitlines()]
    lines[0]["rubric"]["criteria"].append(
        {"type": "llm_judge", "engine": "cluster", "template": template, "scale": 5})
    core.write_text("".join(json.dumps(line) + "\n" for line in lines))
    home.catalog = load_catalog(home.root / "scenarios")
    home.ledger.append(ScenariosChanged(versions=home.catalog.versions(), counts={},
                                        changed=["core"]))
    (home.root / "judges").mkdir()
    (home.root / "judges" / "grader.yaml").write_text(
        f'judge: {{engine: cluster, template: "{TEMPLATE}", scale: 5}}\n'
        "examples:\n  - {id: a, prompt: p, response: r, human_score: 4, labeller: alice}\n")
    home.trained_candidate()
    return home


def record_check(home: PromotionHome, runtime_model: str, kappa: float | None) -> None:
    calibration = load_calibration(home.root / "judges" / "grader.yaml", cluster_root=home.root)
    home.ledger.append(JudgeChecked(
        judge="grader", job_id="j", engine="cluster", engine_model=runtime_model,
        template_sha256=calibration.template_sha256, calibration_version=calibration.version,
        identity=judge_identity(calibration, runtime_model), examples=1, answered=1, repeats=1,
        pass_mark=0.7, scale=5.0, exact_rate=1.0, within_one_rate=1.0, kappa=kappa, spearman=None))


def judge_check(home: PromotionHome) -> tuple[bool, str]:
    _, runtime = home.open()
    check = next(c for c in check_policy(runtime).report.checks if c.check == "judge_agreement")
    return check.passed, check.detail


def test_without_a_minimum_the_judge_check_is_off(tmp_path: Path) -> None:
    passed, detail = judge_check(judged_home(tmp_path, minimum=None))
    assert passed and "off" in detail


def test_a_judge_never_checked_is_refused(tmp_path: Path) -> None:
    passed, detail = judge_check(judged_home(tmp_path, minimum=0.5))
    assert not passed and "no check of the current judge" in detail


def test_a_passing_check_of_the_current_judge_passes_and_a_weak_one_does_not(tmp_path: Path) -> None:
    home = judged_home(tmp_path / "a", minimum=0.5)
    _, runtime = home.open()
    record_check(home, str(runtime.cluster.base_model), 0.8)
    assert judge_check(home)[0]

    weak = judged_home(tmp_path / "b", minimum=0.5)
    _, runtime = weak.open()
    record_check(weak, str(runtime.cluster.base_model), 0.3)
    passed, detail = judge_check(weak)
    assert not passed and "kappa 0.300 < 0.5" in detail


def test_a_check_of_another_model_or_calibration_set_does_not_count(tmp_path: Path) -> None:
    home = judged_home(tmp_path / "a", minimum=0.5)
    record_check(home, "some-other-model", 0.9)
    assert not judge_check(home)[0]

    changed = judged_home(tmp_path / "b", minimum=0.5)
    _, runtime = changed.open()
    record_check(changed, str(runtime.cluster.base_model), 0.9)
    grader = changed.root / "judges" / "grader.yaml"
    grader.write_text(grader.read_text() + "  - {id: b, prompt: p, response: q, human_score: 1, "
                      "labeller: bob}\n")
    assert not judge_check(changed)[0]


def test_a_judge_with_no_matching_calibration_set_is_refused(tmp_path: Path) -> None:
    home = judged_home(tmp_path, minimum=0.5, template="Another: {response}. SCORE: 0..{scale}")
    passed, detail = judge_check(home)
    assert not passed and "no calibration set" in detail


async def test_the_bundle_shows_each_judges_check_as_of_the_request(tmp_path: Path) -> None:
    import os

    from support.promotion_home import CLUSTER, engine_pool_for

    from modelsmith.loop.promotion.service import PromotionService, Requester

    home = judged_home(tmp_path, minimum=0.5)
    fleet, runtime = home.open()
    record_check(home, str(runtime.cluster.base_model), 0.8)
    pool, _ = engine_pool_for(runtime.cluster)
    service = PromotionService(fleet, pool, home.home)
    requested = await service.request(CLUSTER, Requester(uid=os.getuid(), pid=os.getpid(),
                                                         username="agent"), note="ready")
    record_check(home, "after-the-request", 0.1)  # not evidence of this request
    exported = await service.export_bundle(CLUSTER, requested.request_id)
    directory = Path(exported.directory)

    judges = json.loads((directory / "analysis/judges.json").read_text())
    assert [(j["judge"], j["kappa"], j["engine"]) for j in judges] == [("grader", 0.8, "cluster")]
    html = (directory / "index.html").read_text()
    assert "<h2>Judges</h2>" in html and "0.800" in html and "after-the-request" not in html
