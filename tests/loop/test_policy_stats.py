"""The gate's statistics on real eval files: a significant paired regression is refused by its own
check, apart from max_regressions, and gate_on = "lower_bound" judges the interval's low end."""

from __future__ import annotations

from pathlib import Path

from support.promotion_home import CORE_IDS, HELD_IDS, PromotionHome

from modelsmith.loop.promotion.policy import check_policy
from modelsmith.rpc.schema.promotion import PolicyReport

ALL = set(CORE_IDS + HELD_IDS)


def _failed(report: PolicyReport) -> set[str]:
    return {c.check for c in report.checks if not c.passed}


def _policy(home: PromotionHome, line: str) -> None:
    toml = home.root / "cluster.toml"
    toml.write_text(toml.read_text() + line + "\n")  # [policy] is the file's last table


def test_six_regressions_and_no_fix_are_refused_as_significant_even_within_max_regressions(
    tmp_path: Path,
) -> None:
    home = PromotionHome(tmp_path, max_regressions=9)
    home.add_eval("base-eval", None, ALL)
    home.trained_candidate(passed=set(CORE_IDS[:3]))  # six regressed: McNemar p = 2/64
    _, runtime = home.open()

    report = check_policy(runtime).report

    assert "paired_regression" in _failed(report) and "regressions" not in _failed(report)
    assert report.paired is not None and report.paired_baseline_tag == "base-eval"
    assert (report.paired.fixed, report.paired.regressed) == (0, 6)
    assert report.paired.mcnemar_p == 2 / 64


def test_a_regression_alpha_of_zero_turns_the_paired_check_off(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path, max_regressions=9)
    _policy(home, "regression_alpha = 0")
    home.add_eval("base-eval", None, ALL)
    home.trained_candidate(passed=set(CORE_IDS[:3]))
    _, runtime = home.open()

    assert "paired_regression" not in _failed(check_policy(runtime).report)


def test_a_few_regressions_among_many_fixes_are_not_significant(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path, max_regressions=1)
    home.trained_candidate(passed=set(CORE_IDS + HELD_IDS[:2]) - {"held-1"})
    _, runtime = home.open()

    report = check_policy(runtime).report

    assert "paired_regression" not in _failed(report)
    assert report.paired is not None and report.paired.regressed == 1


def test_gate_on_lower_bound_refuses_a_point_score_that_clears_the_threshold_only_by_luck(
    tmp_path: Path,
) -> None:
    home = PromotionHome(tmp_path, max_regressions=9)
    _policy(home, 'gate_on = "lower_bound"')
    # 8 of 9 pass: composite 0.889 >= 0.8, but its interval reaches well below 0.8.
    home.trained_candidate(passed=ALL - {"core-1"})
    _, runtime = home.open()

    report = check_policy(runtime).report
    composite = next(c for c in report.checks if c.check == "composite")

    assert "composite" in _failed(report)
    assert "lower bound" in composite.detail


def test_gate_on_point_passes_the_same_eval(tmp_path: Path) -> None:
    home = PromotionHome(tmp_path, max_regressions=9)
    home.trained_candidate(passed=ALL - {"core-1"})
    _, runtime = home.open()

    assert "composite" not in _failed(check_policy(runtime).report)
