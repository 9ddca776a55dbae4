"""How bounded is scoring, and how much does the largest accepted scenario file cost?

Run: ``.venv/bin/python bench/score_bound.py``. Prints the time to score a catastrophic regex
(``^(a|a)+$`` against a 32-token answer) with the per-answer bound, an ordinary regex as the
baseline in the same run, and the largest YAML scenario file the loader accepts (as many
scenarios as the size limit and the YAML node budget allow) with the peak memory (tracemalloc)
it took to load.
"""

from __future__ import annotations

import time
import tracemalloc

import msgspec

from modelsmith.loop.scoring.bounded import SCORE_TIME_LIMIT_S
from modelsmith.loop.scoring.criteria import Rubric
from modelsmith.loop.scoring.rubric import score
from modelsmith.loop.scoring.scenarios import MAX_SCENARIO_FILE_BYTES, parse_scenarios
from modelsmith.loop.scoring.yaml_lines import MAX_YAML_NODES

ANSWER = "a" * 32 + "!"


def timed_score(pattern: str, runs: int) -> tuple[float, str | None]:
    rubric = msgspec.convert({"criteria": [{"type": "regex", "pattern": pattern}]}, Rubric)
    started = time.perf_counter()
    result = score(rubric, ANSWER, None)
    for _ in range(runs - 1):
        result = score(rubric, ANSWER, None)
    return (time.perf_counter() - started) / runs, result.criteria[0].error_kind


def largest_file() -> bytes:
    one = (
        "  - id: s{n:07d}\n    set: core\n    domain: bench\n    prompt: what is two plus two?\n"
        "    reference: '4'\n    rubric: {{criteria: [{{type: numeric}}]}}\n"
    )
    size = len(one.format(n=0))
    nodes = 18  # YAML nodes per scenario above (mappings, keys, values, the criteria list)
    count = min((MAX_SCENARIO_FILE_BYTES - 20) // size, (MAX_YAML_NODES - 10) // nodes)
    return ("scenarios:\n" + "".join(one.format(n=n) for n in range(count))).encode()


def main() -> None:
    bounded, kind = timed_score(r"^(a|a)+$", runs=3)
    baseline, _ = timed_score(r"^a+!$", runs=1000)
    print(f"per-answer limit:            {SCORE_TIME_LIMIT_S:.3f} s")
    print(f"catastrophic regex (bounded): {bounded:.3f} s per answer -> {kind}")
    print(f"ordinary regex (baseline):    {baseline * 1e6:.1f} us per answer")
    data = largest_file()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        scenarios = parse_scenarios(data, filename="largest.yaml")
        outcome = f"accepted, {len(scenarios)} scenarios"
    except Exception as exc:  # the budget may refuse it: say so, with the reason
        outcome = f"refused: {exc}"
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"largest file: {len(data)} bytes (limit {MAX_SCENARIO_FILE_BYTES}) {outcome}")
    print(f"  load time {elapsed:.1f} s, peak traced memory {peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
