"""Scenarios scored per second for a rubric-only run over stored answers (no engine).

    .venv/bin/python bench/score_throughput.py [--answers 100000]

The answers are generated from the bundled rtb-pricing scenarios (a mix of right, wrong,
wordy and empty answers) and scored with ``score_batch``, the same code an eval runs in its
worker threads; the results are encoded as results.jsonl lines to count that cost too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import msgspec

from modelsmith.examples import rtb_pricing
from modelsmith.loop.eval.run import score_batch
from modelsmith.loop.scoring.scenarios import Scenario, load_catalog

ANSWERS = ("low", "mid", "high", "probably mid", "", "the price is high because of demand", "LOW")


def stored_answers(scenarios: tuple[Scenario, ...], count: int) -> list[tuple[Scenario, str, str | None, int | None]]:
    return [(scenarios[i % len(scenarios)], ANSWERS[i % len(ANSWERS)], "stop", 2) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = rtb_pricing.write_cluster(Path(scratch), Path(scratch) / "model")
        scenarios = load_catalog(root / "scenarios").all()
    items = stored_answers(scenarios, args.answers)
    encoder = msgspec.json.Encoder()
    started = time.perf_counter()
    results = score_batch(items)
    scored = time.perf_counter() - started
    encoded = b"".join(encoder.encode(r) + b"\n" for r in results)
    total = time.perf_counter() - started
    print(f"answers scored        {len(results)}")
    print(f"scoring               {scored:.2f} s   {len(results) / scored:,.0f} scenarios/s")
    print(f"scoring + jsonl lines {total:.2f} s   {len(results) / total:,.0f} scenarios/s ({len(encoded) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
