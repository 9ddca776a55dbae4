"""What a ``similarity`` criterion or a rubric ``formula`` costs per scored answer (the GRPO
reward scores every completion), beside the ``exact`` criterion as the baseline, same run.

Run: ``.venv/bin/python bench/similarity_cost.py``. Prints, per metric, the mean time of
``rubric.score`` over a typical answer (about 40 words) and over the largest one a metric
compares (cut to ``MAX_TOKENS`` tokens / ``MAX_CHARS`` characters), and a two-criterion rubric
with the multi grader's formula against the same rubric's weighted mean. Also the time to
convert and load an import of 1,000 items through the grader importer.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from modelsmith.loop.graders.openai_import import ImportOptions, convert
from modelsmith.loop.scoring.criteria import Rubric
from modelsmith.loop.scoring.rubric import score
from modelsmith.loop.scoring.scenarios import parse_scenarios
from modelsmith.loop.scoring.similarity import MAX_TOKENS, METRICS

WORDS = ("the bid floor for this placement is two dollars and the second price auction "
         "clears at the next highest bid plus one cent unless the floor is higher").split()
REFERENCE = " ".join(WORDS[:40])
ANSWER = " ".join(reversed(WORDS[:40]))
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(MAX_TOKENS * 3))


def rubric(criteria: list[dict[str, Any]], formula: str | None = None) -> Rubric:
    body: dict[str, Any] = {"criteria": criteria}
    if formula:
        body["formula"] = formula
    return msgspec.convert(body, Rubric)


def per_answer(r: Rubric, answer: str, reference: str, seconds: float = 0.5) -> float:
    score(r, answer, reference)  # imports and caches outside the timing
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        score(r, answer, reference)
        runs += 1
    return (time.perf_counter() - started) / runs


def main() -> None:
    exact = rubric([{"type": "exact"}])
    base = per_answer(exact, ANSWER, REFERENCE)
    print(f"{'criterion':<24}{'40 words':>14}{'3,000 words (cut)':>20}")
    print(f"{'exact (baseline)':<24}{base * 1e6:>11.1f} us{per_answer(exact, LONG, LONG) * 1e6:>17.1f} us")
    for metric in METRICS:
        r = rubric([{"type": "similarity", "metric": metric}])
        short, long = per_answer(r, ANSWER, REFERENCE), per_answer(r, LONG, LONG)
        print(f"{'similarity ' + metric:<24}{short * 1e6:>11.1f} us{long * 1e6:>17.1f} us")
    pair = [{"type": "similarity", "name": "a", "metric": "fuzzy_match"},
            {"type": "contains", "name": "b", "value": "floor"}]
    mean = per_answer(rubric(pair), ANSWER, REFERENCE)
    formula = per_answer(rubric(pair, "(a + b) / 2 * min(1, a ^ 2)"), ANSWER, REFERENCE)
    print(f"{'weighted mean (2)':<24}{mean * 1e6:>11.1f} us")
    print(f"{'formula (2)':<24}{formula * 1e6:>11.1f} us  ({(formula - mean) * 1e6:+.1f} us)")

    grader = msgspec.json.encode({"type": "text_similarity", "name": "close",
                                  "evaluation_metric": "rouge_l", "pass_threshold": 0.6,
                                  "input": "{{sample.output_text}}",
                                  "reference": "{{item.answer}}"}).decode()
    items = "".join(msgspec.json.encode({"input": f"question {n}", "answer": REFERENCE}).decode()
                    + "\n" for n in range(1000))
    started = time.perf_counter()
    conversion = convert(grader, items, ImportOptions(name="bench", set="core"))
    data = b"".join(msgspec.json.encode(s) + b"\n" for s in conversion.scenarios)
    loaded = parse_scenarios(data, filename="bench.jsonl", default_set="core")
    print(f"import of {len(loaded)} items (convert + load): "
          f"{time.perf_counter() - started:.3f} s, {len(data) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
