"""A judge check with the real vLLM engine on the tiny model as the judge. Its replies are
(almost all) malformed: the figures must say so - failures counted against the judge, answered
examples counted from the replies themselves - not be tuned to look better."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelsmith.gpu.engine import Sampling
from modelsmith.gpu.vllm_engine import VllmEngine
from modelsmith.loop.eval.judge_calibration import load_calibration
from modelsmith.loop.eval.judge_check import run_check
from modelsmith.loop.eval.judge_stats import agreement, cohen_kappa
from modelsmith.loop.scoring.rubric import parse_judge_reply

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="session")]

EXAMPLES = [("What is CPM?", "Cost per mille.", 5), ("What is CTR?", "Clicks over views.", 4),
            ("What is a bid floor?", "The lowest price.", 4), ("What is pacing?", "No idea.", 0),
            ("What is eCPM?", "A fruit.", 0), ("What is viewability?", "Pixels seen.", 3)]


def calibration_file(root: Path) -> Path:
    lines = ["judge:", "  engine: cluster", "  scale: 5", "pass_mark: 0.6", "repeats: 2", "examples:"]
    for index, (prompt, response, human) in enumerate(EXAMPLES):
        lines += [f"  - id: ex-{index}", f"    prompt: {prompt}", f"    response: {response}",
                  f"    human_score: {human}", "    labeller: alice"]
    path = root / "judges" / "tiny.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_the_tiny_model_as_judge_is_reported_as_it_is(
    vllm_engine: VllmEngine, tmp_path: Path
) -> None:
    calibration = load_calibration(calibration_file(tmp_path), cluster_root=tmp_path)
    sampling = Sampling(temperature=0.8, max_tokens=24, seed=0)
    figures, rows = await run_check(calibration, vllm_engine, sampling, repeats=2,
                                    resamples=200, seed=0)

    # Every reply is read by the rubric's own parser; the report's scores are those readings.
    for row in rows:
        assert len(row["replies"]) == 2
        for reply, score in zip(row["replies"], row["judge_scores"], strict=True):
            verdict = parse_judge_reply(reply, scale=5)
            assert score == (None if verdict.score is None else verdict.score * 5)
    first = [row["judge_scores"][0] for row in rows]
    assert figures["examples"] == len(EXAMPLES)
    assert figures["answered"] == sum(score is not None for score in first)
    assert figures["repeat_failures"] == sum(s is None for row in rows for s in row["judge_scores"])
    assert figures["repeat_failures"] > 0  # the tiny model is not a judge: its failures show
    # The kappa is the one the rule gives for these verdicts (failures as the opposite label).
    human_pass = [h / 5 >= 0.6 for _, _, h in EXAMPLES]
    said = [(s / 5 >= 0.6) if s is not None else not hp for s, hp in zip(first, human_pass, strict=True)]
    expected = cohen_kappa(human_pass, said)
    assert figures["kappa"] == (None if expected is None else round(expected, 6))
    assert figures == {**figures, **{k: getattr(agreement(
        [h for *_, h in EXAMPLES], first, scale=5, pass_mark=0.6, resamples=200, seed=0), k)
        for k in ("exact_rate", "within_one_rate", "kappa", "spearman")}}
