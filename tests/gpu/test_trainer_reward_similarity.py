"""The GRPO reward scores the pure new criteria exactly as the eval does: a ``similarity``
criterion's metric value and a rubric ``formula`` reach TRL's reward function unchanged (no
judge, no engine: the trainer child computes them itself)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from modelsmith.daemon.config import DaemonConfig
from modelsmith.gpu.named_engines import NamedEngines
from modelsmith.gpu.trainer_control import StopState
from modelsmith.gpu.trainer_reward import RewardScorer, make_reward_function
from modelsmith.loop.cluster.config import load_cluster
from modelsmith.loop.scoring.rubric import score
from modelsmith.loop.scoring.scenarios import Scenario
from modelsmith.loop.train.reward_judges import JudgeUnreachable, reward_judges


def scenario(sid: str, rubric: dict[str, object]) -> Scenario:
    return msgspec.convert({"id": sid, "set": "core", "domain": "d", "prompt": f"prompt {sid}",
                            "reference": "the cat sat on the mat", "rubric": rubric}, Scenario)


SIMILAR = scenario("similar", {"criteria": [{"type": "similarity", "metric": "rouge_1",
                                             "pass_threshold": 0.9}]})
FORMULA = scenario("formula", {"formula": "min(a, b) ^ 2", "criteria": [
    {"type": "similarity", "name": "a", "metric": "fuzzy_match"},
    {"type": "contains", "name": "b", "value": "mat"}]})


def test_similarity_and_formula_rewards_are_the_evals_scores() -> None:
    scorer = RewardScorer(["prompt similar", "prompt formula"], [SIMILAR, FORMULA])
    reward = make_reward_function(scorer, StopState())
    answers = ["the cat is on the mat", "a dog on a mat", ""]
    for ids in (["similar"] * 3, ["formula"] * 3):
        values = reward(completions=answers, scenario_id=ids)
        expected = [score(scorer.by_id[ids[0]].rubric, a, scorer.by_id[ids[0]].reference).score
                    for a in answers]
        assert values == expected
    assert reward(completions=["the cat is on the mat"], scenario_id=["similar"]) == [
        pytest.approx(5 / 6)]
    assert reward(completions=[""], scenario_id=["formula"]) == [0.0]
    assert scorer.take_judge_failure_share() is None  # no judge in these rubrics


def test_train_start_refuses_a_structured_judge_it_cannot_reach_with_the_typed_error(
        tmp_path: Path) -> None:
    # label and rubric_judge are judge kinds too: refused by name like llm_judge, no crash.
    root = tmp_path / "shop"
    (root / "model").mkdir(parents=True)
    (root / "cluster.toml").write_text('domain = "d"\n[model]\nbase = "model"\n')
    labelled = scenario("labelled", {"criteria": [
        {"type": "contains", "value": "mat"},
        {"type": "label", "engine": "cluster", "labels": ["ok", "bad"], "passing_labels": ["ok"]}]})
    registry = NamedEngines.from_config(DaemonConfig.model_validate({"engines": {}}), home=tmp_path)
    with pytest.raises(JudgeUnreachable) as caught:
        reward_judges([labelled], load_cluster(root), registry)
    assert caught.value.data["field"] == "rubric.criteria[1].engine"
    assert caught.value.data["criterion"] == "label"
