"""Synthetic candidates are verified like hand-written files and governed as a third set: the
bundled rtb-pricing generator's scenarios are kept; a held-out paraphrase is refused as a
leakage attempt, copies and references that fail their rubric are dropped; the synthetic set
loads, is never in an eval's composite, and moves into core only by acceptance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelsmith.examples import rtb_pricing
from modelsmith.loop.eval.run import select_scenarios
from modelsmith.loop.scoring.scenarios import ScenarioCatalog, load_catalog, prompt_text
from modelsmith.loop.synth.generate import (
    candidates_from_generator,
    load_generator,
    parse_reply,
    pattern_sources,
)
from modelsmith.loop.synth.governance import (
    accept_into_core,
    publish,
    read_provenance,
    write_kept,
)
from modelsmith.loop.synth.similarity import PromptIndex
from modelsmith.loop.synth.verify import Candidate, verify
from modelsmith.rpc.schema.train import FailurePattern

THRESHOLD = 90.0


@pytest.fixture
def cluster(tmp_path: Path) -> Path:
    return rtb_pricing.write_cluster(tmp_path, tmp_path / "model")


def _catalog(cluster: Path) -> ScenarioCatalog:
    return load_catalog(cluster / "scenarios")


def _pattern(ids: list[str]) -> FailurePattern:
    return FailurePattern(pattern="choice/wrong_value", criterion="choice", kind="wrong_value",
                          count=len(ids), lost_score=1.0, tags={}, scenario_ids=ids, examples=[])


def _candidate(catalog: ScenarioCatalog, fields: Any, error: str | None = None) -> Candidate:
    return Candidate(fields=fields, source=catalog.require("core-000"), pattern="choice/wrong_value",
                     prompt_sha256="0" * 64, error=error)


def _fields(prompt: str, reference: str = "high", **rubric: Any) -> dict[str, Any]:
    return {"prompt": prompt, "reference": reference,
            "rubric": {"pass_mark": 0.75, **rubric, "criteria": rubric.get("criteria", [
                {"type": "choice", "name": "bucket", "labels": ["low", "mid", "high"], "weight": 3},
                {"type": "length", "name": "one_word", "max_words": 2, "weight": 1}])}}


def test_the_rtb_generator_makes_new_exact_scenarios_that_are_all_kept(cluster: Path) -> None:
    catalog = _catalog(cluster)
    held = catalog.held_out.ids()[0]
    pattern = _pattern(["core-000", "core-001", held])
    sources = pattern_sources(pattern, catalog)
    assert [s.id for s in sources] == ["core-000", "core-001"]  # a held-out one is never a source
    spec = "modelsmith.examples.rtb_pricing:synthesise"
    candidates = candidates_from_generator(load_generator(spec), spec, pattern, sources, 8)
    verified = verify(candidates, catalog, threshold=THRESHOLD)
    assert verified.counts.generated == 8 and verified.counts.kept == 8, verified.rejections
    for scenario, candidate in verified.kept:
        inventory = prompt_text(scenario).split(", ")[1].removesuffix(". bucket?")
        assert scenario.reference == rtb_pricing.INVENTORY[inventory]  # re-derived, and right
        assert scenario.set == "synthetic" and "synthetic" in scenario.tags
        assert scenario.rubric == candidate.source.rubric
    # Asked again, the generator makes the same scenarios: once kept they are duplicates.
    file, _ = write_kept(cluster / "scenarios", "job1", verified.kept, {"generator": spec})
    publish(cluster / "scenarios", file)
    again = verify(candidates_from_generator(load_generator(spec), spec, pattern, sources, 8),
                   _catalog(cluster), threshold=THRESHOLD)
    assert again.counts.dropped_duplicate == 8 and again.counts.kept == 0
    assert file == "synthetic/synth-job1.jsonl"


def test_a_held_out_paraphrase_is_refused_a_copy_and_a_failing_reference_dropped(
    cluster: Path,
) -> None:
    catalog = _catalog(cluster)
    held_prompt = prompt_text(catalog.held_out.scenarios[0])  # "us-east auction, x. bucket?"
    region, rest = held_prompt.split(" auction, ")
    paraphrase = f"{region.upper()} auction: {rest.replace('. bucket?', ' -- bucket?')}"
    # A core prompt no held-out one is near (most are: they differ from one by a region word).
    held_index = PromptIndex.of(catalog.held_out.scenarios, THRESHOLD)
    core_prompt = next(prompt_text(s) for s in catalog.core.scenarios if held_index.near(s) is None)
    candidates = [
        _candidate(catalog, _fields(held_prompt)),  # the held-out prompt itself
        _candidate(catalog, _fields(paraphrase)),  # a paraphrase of it
        _candidate(catalog, _fields(core_prompt)),  # a core prompt copied
        _candidate(catalog, _fields("pacific-islands auction, premium video. bucket?", pass_mark=1.0,
                                    criteria=[{"type": "choice", "labels": ["low", "mid", "high"]},
                                              {"type": "length", "min_words": 3}])),
        _candidate(catalog, _fields("pacific-islands auction, connected tv. bucket?")),  # valid
        _candidate(catalog, _fields("pacific-islands auction, connected tv. bucket?")),  # its twin
        _candidate(catalog, {**_fields("central-asia auction, native feed. bucket?"), "id": "x"}),
        _candidate(catalog, _fields("central-asia auction, native feed. bucket?", reference="maybe")),
        _candidate(catalog, _fields("central-asia auction, native feed. bucket?",
                                    criteria=[{"type": "exact"}])),  # other criteria kinds
        _candidate(catalog, {"prompt": "x", "rubric": {"criteria": [{"type": "length"}]}}),
        _candidate(catalog, None, error="malformed reply: not JSON"),
        _candidate(catalog, _fields("central-asia auction, native feed. bucket?" * 300)),
    ]
    verified = verify(candidates, catalog, threshold=THRESHOLD, max_prompt_bytes=1024)
    c = verified.counts
    assert (c.generated, c.refused_near_held_out, c.dropped_duplicate, c.dropped_reference_fails,
            c.dropped_invalid, c.kept) == (12, 2, 2, 1, 6, 1)
    reasons = [(r.index, r.reason) for r in verified.rejections]
    assert reasons[:5] == [(0, "near_held_out"), (1, "near_held_out"), (2, "duplicate"),
                           (3, "reference_fails"), (5, "duplicate")]
    held_id = catalog.held_out.scenarios[0].id
    assert verified.rejections[0].match == held_id and verified.rejections[1].match == held_id
    assert [prompt_text(s) for s, _ in verified.kept] == ["pacific-islands auction, connected tv. bucket?"]


def test_the_threshold_separates_a_paraphrase_from_a_new_region() -> None:
    catalog = ScenarioCatalog({})
    del catalog
    index = PromptIndex(threshold=THRESHOLD)
    from modelsmith.loop.scoring.scenarios import parse_scenarios

    def scenario(prompt: str) -> Any:
        line = msgspec.json.encode({"id": "a", "domain": "d", "prompt": prompt, "reference": "x",
                                    "rubric": {"criteria": [{"type": "exact"}]}})
        return parse_scenarios(line, filename="a.jsonl", default_set="core")[0]

    index.add(scenario("us-east auction, premium video. bucket?"))
    near = index.near(scenario("US-East auction: premium video -- bucket?"))
    assert near is not None and not near.exact and near.similarity >= THRESHOLD
    assert index.near(scenario("canada auction, premium video. bucket?")) is None


def test_a_teacher_reply_is_one_json_object_of_the_schema_or_nothing() -> None:
    good = '{"prompt": "p", "reference": "r", "rubric": {"criteria": []}}'
    assert parse_reply(f"  {good}\n")["prompt"] == "p"
    for bad in ("", "sure! " + good, f"```json\n{good}\n```", '{"prompt": "p"}',
                good[:-1] + ', "extra": 1}', "[" * 100_000, "x" * 70_000):
        with pytest.raises(ValueError):
            parse_reply(bad)


def test_the_synthetic_set_loads_apart_and_is_never_in_a_full_eval(cluster: Path) -> None:
    catalog = _catalog(cluster)
    assert "synthetic" not in catalog.versions()  # no folder, no set: old clusters unchanged
    spec = "modelsmith.examples.rtb_pricing:synthesise"
    pattern = _pattern(["core-000"])
    kept = verify(candidates_from_generator(load_generator(spec), spec, pattern,
                                            pattern_sources(pattern, catalog), 3),
                  catalog, threshold=THRESHOLD).kept
    publish(cluster / "scenarios",
            write_kept(cluster / "scenarios", "j2", kept, {"generator": spec, "teacher": None})[0])
    catalog = _catalog(cluster)
    assert len(catalog.sets["synthetic"]) == 3 and "synthetic" in catalog.versions()
    full = select_scenarios(catalog.all(), type="full", domain=None, quick=False, quick_size=8)
    assert all(s.set != "synthetic" for s in full) and len(full) == 36
    provenance = read_provenance(cluster / "scenarios")
    first = kept[0][0].id
    assert provenance[first]["source_ids"] == ["core-000"]
    assert provenance[first]["generator"] == spec and provenance[first]["job_id"] == "j2"

    file, _ = accept_into_core(cluster / "scenarios", [first], "ab" * 32, None)
    catalog = _catalog(cluster)
    assert catalog.require(first).set == "core" and len(catalog.sets["synthetic"]) == 2
    assert file == f"core/accepted-{'ab' * 6}.jsonl"
    assert not list((cluster / "scenarios" / "core").glob(".*"))  # nothing pending left


def boom(pattern: dict[str, Any], sources: list[dict[str, Any]], count: int) -> list[Any]:
    raise RuntimeError("generator bug")


def endless(pattern: dict[str, Any], sources: list[dict[str, Any]], count: int) -> Any:
    while True:
        yield {"source_id": "nope", "prompt": "x", "reference": "y", "rubric": {}}


def test_a_hostile_generator_is_a_typed_error_or_bounded_and_counted(cluster: Path) -> None:
    from modelsmith.errors import ValidationError

    catalog = _catalog(cluster)
    pattern = _pattern(["core-000"])
    sources = pattern_sources(pattern, catalog)
    with pytest.raises(ValidationError) as caught:
        candidates_from_generator(boom, "m:boom", pattern, sources, 2)
    assert caught.value.data["field"] == "synthesis.generator"
    with pytest.raises(ValidationError):
        load_generator("modelsmith.examples.rtb_pricing:no_such_function")
    produced = candidates_from_generator(endless, "m:endless", pattern, sources, 3)
    assert len(produced) == 12  # at most MAX_PER_COUNT per candidate asked for
    verified = verify(produced, catalog, threshold=THRESHOLD)
    assert verified.counts.dropped_invalid == 12 and verified.counts.kept == 0
    assert "source_id" in verified.rejections[0].detail
