"""Order bias of a judge whose template shows two answers: each example with a reference is
asked again with the two swapped. A local HTTP judge that always scores the answer in the second
place (the process boundary; a real OpenAIEngine talks to it) has a bias known in advance."""

from __future__ import annotations

import re
from pathlib import Path

import anyio
from support.model_server import serve_model

from modelsmith.gpu.engine import Sampling
from modelsmith.gpu.openai_engine import OpenAIEngine
from modelsmith.loop.eval.judge_calibration import load_calibration
from modelsmith.loop.eval.judge_check import run_check

TWO = 'First: <<{reference}>> Second: [[{response}]] SCORE: 0..{scale}'
ONE = 'Only: [[{response}]] SCORE: 0..{scale}'


def second_place_judge(prompt: str, index: int) -> str:
    found = re.search(r"\[\[(\d)\]\]", prompt)
    return f"SCORE: {found.group(1)}" if found else "no score"


def calibration(root: Path, template: str) -> Path:
    path = root / "judges" / "pos.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"judge: {{engine: grader, template: '{template}', scale: 5}}\nrepeats: 1\nexamples:\n"
        "  - {id: a, prompt: p, response: '3', reference: '5', human_score: 3, labeller: x}\n"
        "  - {id: b, prompt: p, response: '4', reference: '4', human_score: 4, labeller: x}\n"
        "  - {id: c, prompt: p, response: '2', human_score: 2, labeller: x}\n")
    return path


async def check(root: Path, template: str) -> tuple[dict[str, object], list[dict[str, object]], int]:
    cal = load_calibration(calibration(root, template), cluster_root=root)
    with serve_model(second_place_judge) as server:
        engine = OpenAIEngine("grader", server.url, "tiny")
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            await engine.wait_ready(10)
            figures, rows = await run_check(cal, engine, Sampling(), repeats=1, resamples=100, seed=0)
            tg.cancel_scope.cancel()
        return figures, rows, len(server.requests)


async def test_a_judge_that_favours_the_second_place_shows_its_order_bias(tmp_path: Path) -> None:
    figures, rows, asked = await check(tmp_path, TWO)
    assert asked == 3 + 2  # one verdict each, and a swapped one for the two with a reference
    # a: 3 as shown, 5 swapped (-2); b: 4 and 4 (0); c has no reference to swap.
    assert figures["order_bias"] == -1.0 and figures["order_pairs"] == 2
    by_id = {row["id"]: row for row in rows}
    assert by_id["a"]["swapped_score"] == 5.0 and "swapped_score" not in by_id["c"]


async def test_a_template_with_one_answer_has_no_order_bias(tmp_path: Path) -> None:
    figures, _, asked = await check(tmp_path, ONE)
    assert asked == 3 and figures["order_bias"] is None
