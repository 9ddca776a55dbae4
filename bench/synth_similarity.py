"""Near-duplicate similarity on the bundled rtb-pricing cluster, and the cost of verification.

    .venv/bin/python bench/synth_similarity.py [--candidates 500]

Prints, on the scale of ``[synthesis] near_duplicate_threshold`` (rapidfuzz ``fuzz.ratio`` on
normalised prompts, 0-100), the highest similarity to any held-out prompt of:

- the hand-written core prompts (the baseline: same inventory, another region, by design);
- the generator's synthetic prompts (``modelsmith.examples.rtb_pricing:synthesise``);
- a held-out prompt re-punctuated and re-cased (a copy: must be >= the threshold);
- a held-out prompt with its region swapped for another hand-written region;

then the time to verify N generated candidates (load, held-out and duplicate checks, reference
scoring) against it, per candidate, beside the time to load the hand-written sets. It prints;
it never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rapidfuzz import fuzz  # noqa: E402

from modelsmith.examples import rtb_pricing  # noqa: E402
from modelsmith.loop.scoring.scenarios import load_catalog, prompt_text  # noqa: E402
from modelsmith.loop.synth.similarity import NEAR_DUPLICATE_THRESHOLD, normalise  # noqa: E402
from modelsmith.loop.synth.verify import Candidate, verify  # noqa: E402


def nearest(prompts: list[str], held: list[str]) -> float:
    return max(fuzz.ratio(normalise(p), normalise(h)) for p in prompts for h in held if p != h)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = rtb_pricing.write_cluster(Path(tmp), Path(tmp) / "model", core=36, held_out=18)
        started = time.perf_counter()
        catalog = load_catalog(root / "scenarios")
        load_s = time.perf_counter() - started
        held = [prompt_text(s) for s in catalog.held_out.scenarios]
        core = [prompt_text(s) for s in catalog.core.scenarios]
        synthetic = [rtb_pricing.bid_prompt(i, r) for i in rtb_pricing.INVENTORY
                     for r in rtb_pricing.SYNTH_REGIONS]
        region, rest = held[0].split(" auction, ")
        copy = f"{region.upper()} auction: {rest.replace('. bucket?', ' -- bucket?')}"
        other = next(r for r in rtb_pricing.REGIONS if r != region)
        swapped = f"{other} auction, {rest}"
        print(f"threshold (default)                          {NEAR_DUPLICATE_THRESHOLD:6.1f}")
        print(f"hand-written core vs held-out (baseline)     {nearest(core, held):6.1f}")
        print(f"generator's synthetic vs held-out            {nearest(synthetic, held):6.1f}")
        print(f"generator's synthetic vs core                {nearest(synthetic, core):6.1f}")
        print(f"held-out re-punctuated, re-cased (a copy)    {nearest([copy], held):6.1f}")
        print(f"held-out with another hand-written region    {nearest([swapped], held):6.1f}")

        source = catalog.core.scenarios[0]
        rubric = {"pass_mark": 0.75, "criteria": [
            {"type": "choice", "name": "bucket", "labels": ["low", "mid", "high"], "weight": 3},
            {"type": "length", "name": "one_word", "max_words": 2, "weight": 1}]}
        inventories = sorted(rtb_pricing.INVENTORY)
        candidates = [Candidate(fields={"prompt": rtb_pricing.bid_prompt(
                                            inventories[i % 9], f"region-{i:05d}"),
                                        "reference": rtb_pricing.INVENTORY[inventories[i % 9]],
                                        "rubric": rubric},
                                source=source, pattern="choice/wrong_value", prompt_sha256="0" * 64)
                      for i in range(args.candidates)]
        started = time.perf_counter()
        verified = verify(candidates, catalog, threshold=NEAR_DUPLICATE_THRESHOLD)
        verify_s = time.perf_counter() - started
        print(f"\nverify {args.candidates} candidates: {verify_s:.3f} s "
              f"({1000 * verify_s / args.candidates:.2f} ms each; kept {verified.counts.kept}, "
              f"duplicate {verified.counts.dropped_duplicate}, near held-out "
              f"{verified.counts.refused_near_held_out})")
        print(f"baseline: load the {len(catalog)} hand-written scenarios: {load_s:.3f} s "
              f"({1000 * load_s / len(catalog):.2f} ms each)")


if __name__ == "__main__":
    main()
