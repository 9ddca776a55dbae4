"""Scenario files, sets, versions and quick subsets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from modelsmith.errors import NotFound, ValidationError
from modelsmith.loop.scoring.criteria import RegexCriterion
from modelsmith.loop.scoring.scenarios import (
    ChatMessage,
    Scenario,
    ScenarioCatalog,
    ScenarioSet,
    load_catalog,
    parse_scenarios,
    prompt_hash,
    prompt_messages,
    prompt_text,
    scenario_hash,
    set_version,
)
from modelsmith.loop.scoring.subsets import quick_subset

GOOD_YAML = """\
# Arithmetic for the tiny cluster.
scenarios:
  - id: add-1
    domain: math
    tags: [arith, easy]
    prompt: "What is 2+2? Answer with a number."
    reference: "4"
    rubric:
      pass_mark: 0.5
      criteria:
        - type: numeric
          abs_tol: 0.5
        - type: length
          max_words: 5
          weight: 0.5
  - id: chat-1
    domain: math
    tags: [chat]
    prompt:
      - {role: system, content: "Be brief."}
      - {role: user, content: "Say yes."}
    rubric:
      criteria:
        - {type: exact, value: "yes", strip_punctuation: true}
    weight: 2
"""


def scenario_dict(scenario_id: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": scenario_id,
        "domain": "math",
        "tags": ["arith"],
        "prompt": f"question {scenario_id}",
        "reference": "4",
        "rubric": {"criteria": [{"type": "exact"}]},
    }
    base.update(overrides)
    return base


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def refused(
    data: str, filename: str = "s.yaml", default_set: str | None = "core"
) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        parse_scenarios(data.encode(), filename=filename, default_set=default_set)
    assert info.value.data["file"] == filename
    return info.value


# ------------------------------------------------------------------------------- good files


def test_a_yaml_file_decodes_into_typed_scenarios_with_the_set_taken_from_its_folder(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "core" / "math.yaml", GOOD_YAML)
    first, second = parse_scenarios(path.read_bytes(), filename=str(path), default_set="core")
    assert first.id == "add-1" and first.set == "core" and first.tags == ("arith", "easy")
    assert first.rubric.pass_mark == 0.5 and first.rubric.criteria[1].weight == 0.5
    assert second.prompt == (
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Say yes."),
    )
    assert second.reference is None and second.weight == 2.0


def test_a_bare_yaml_list_and_a_jsonl_file_decode_like_the_mapping_form() -> None:
    items = [scenario_dict("a-1"), scenario_dict("a-2", set="core")]
    from_list = parse_scenarios(
        yaml.safe_dump(items).encode(), filename="x.yml", default_set="core"
    )
    jsonl = "\n".join(json.dumps(item) for item in items) + "\n\n"
    from_jsonl = parse_scenarios(jsonl.encode(), filename="x.jsonl", default_set="core")
    assert from_list == from_jsonl
    assert [s.id for s in from_list] == ["a-1", "a-2"]


def test_an_empty_yaml_file_holds_no_scenarios() -> None:
    assert parse_scenarios(b"# nothing yet\n", filename="empty.yaml") == []


def test_prompts_render_as_text_and_as_chat_messages() -> None:
    text, chat = parse_scenarios(GOOD_YAML.encode(), filename="m.yaml", default_set="core")
    assert prompt_text(text) == "What is 2+2? Answer with a number."
    assert prompt_messages(text) == [{"role": "user", "content": text.prompt}]
    assert prompt_text(chat) == "system: Be brief.\n\nuser: Say yes."
    assert prompt_messages(chat)[1] == {"role": "user", "content": "Say yes."}


def test_the_catalog_loads_both_sets_and_finds_scenarios_by_id(tmp_path: Path) -> None:
    root = tmp_path / "scenarios"
    write(root / "core" / "math.yaml", GOOD_YAML)
    write(root / "held-out" / "h.jsonl", json.dumps(scenario_dict("h-1")) + "\n")
    write(root / "core" / "README.md", "not a scenario file")
    write(root / "core" / ".math.yaml.tmp-123", "half-written: [")
    catalog = load_catalog(root)
    assert catalog.core.ids() == ("add-1", "chat-1")
    assert catalog.core.files == ("core/math.yaml",)
    assert catalog.held_out.ids() == ("h-1",)
    assert catalog.held_out.scenarios[0].set == "held-out"
    assert [s.id for s in catalog.all()] == ["add-1", "chat-1", "h-1"]
    assert catalog.get("h-1") is catalog.held_out.scenarios[0]
    assert catalog.get("nope") is None
    with pytest.raises(NotFound):
        catalog.require("nope")
    assert catalog.versions() == {
        "core": set_version(catalog.core.scenarios),
        "held-out": set_version(catalog.held_out.scenarios),
    }


def test_a_missing_set_folder_is_an_empty_set_and_a_missing_scenarios_folder_is_not_found(
    tmp_path: Path,
) -> None:
    write(tmp_path / "scenarios" / "core" / "math.yaml", GOOD_YAML)
    catalog = load_catalog(tmp_path / "scenarios")
    assert len(catalog.held_out) == 0 and catalog.held_out.version == set_version([])
    with pytest.raises(NotFound):
        load_catalog(tmp_path / "elsewhere")


# ------------------------------------------------------------------------------- bad files


def test_yaml_syntax_errors_name_the_line() -> None:
    error = refused("- id: a\n  domain: [unclosed\n  tags: x\n")
    assert error.data["kind"] == "syntax"
    assert error.data["line"] in (2, 3)


def test_jsonl_syntax_errors_name_the_line() -> None:
    good = json.dumps(scenario_dict("a-1"))
    error = refused(f"{good}\n\n{{not json\n", filename="s.jsonl")
    assert error.data["kind"] == "syntax" and error.data["line"] == 3
    assert error.data["field"] == "scenarios[1]"


def test_an_unknown_field_is_refused_with_its_path_and_line() -> None:
    text = GOOD_YAML.replace(
        "        - type: numeric\n", "        - type: numeric\n          tol: 1\n"
    )
    error = refused(text)
    assert error.data["kind"] == "unknown_field"
    assert error.data["field"] == "scenarios[0].rubric.criteria[0].tol"
    assert error.data["line"] == 12


def test_a_wrong_type_is_refused_with_its_path_and_line() -> None:
    error = refused(GOOD_YAML.replace("tags: [arith, easy]", "tags: [arith, 3]"))
    assert error.data["kind"] == "wrong_type"
    assert error.data["field"] == "scenarios[0].tags[1]"
    assert error.data["line"] == 5


def test_a_number_where_text_is_expected_is_a_wrong_type_in_jsonl() -> None:
    error = refused(json.dumps(scenario_dict("a-1", reference=4)) + "\n", filename="s.jsonl")
    assert error.data["kind"] == "wrong_type"
    assert error.data["field"] == "scenarios[0].reference" and error.data["line"] == 1


def test_a_missing_required_field_is_named() -> None:
    item = scenario_dict("a-1")
    del item["domain"]
    error = refused(yaml.safe_dump([item]))
    assert error.data["kind"] == "missing_field" and error.data["field"] == "scenarios[0].domain"
    assert error.data["line"] == 1


def test_a_missing_set_outside_a_set_folder_is_a_missing_field() -> None:
    error = refused(yaml.safe_dump([scenario_dict("a-1")]), default_set=None)
    assert error.data["field"] == "scenarios[0].set"


def test_a_bad_id_is_refused() -> None:
    error = refused(yaml.safe_dump([scenario_dict("has space")]))
    assert error.data["field"] == "scenarios[0].id"


def test_a_duplicate_id_within_a_file_is_refused() -> None:
    error = refused(yaml.safe_dump([scenario_dict("a-1"), scenario_dict("a-1")]))
    assert error.data["kind"] == "duplicate_id" and error.data["field"] == "scenarios[1].id"


def test_a_duplicate_id_across_files_is_refused_naming_both(tmp_path: Path) -> None:
    root = tmp_path / "scenarios"
    write(root / "core" / "a.yaml", yaml.safe_dump([scenario_dict("x-1")]))
    second = write(root / "core" / "b.jsonl", json.dumps(scenario_dict("x-1")) + "\n")
    with pytest.raises(ValidationError) as info:
        load_catalog(root)
    assert info.value.data["kind"] == "duplicate_id"
    assert info.value.data["file"] == str(second) and info.value.data["line"] == 1
    assert info.value.data["first_file"] == str(root / "core" / "a.yaml")


def test_a_duplicate_id_across_sets_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "scenarios"
    write(root / "core" / "a.yaml", yaml.safe_dump([scenario_dict("x-1")]))
    write(root / "held-out" / "a.yaml", yaml.safe_dump([scenario_dict("x-1")]))
    with pytest.raises(ValidationError) as info:
        load_catalog(root)
    assert info.value.data["kind"] == "duplicate_id"
    assert info.value.data["file"] == str(root / "held-out" / "a.yaml")


def test_a_set_that_does_not_match_its_folder_is_refused() -> None:
    error = refused(yaml.safe_dump([scenario_dict("a-1", set="held-out")]), default_set="core")
    assert error.data["kind"] == "set_mismatch" and error.data["field"] == "scenarios[0].set"


def test_an_unknown_criterion_type_is_refused() -> None:
    error = refused(GOOD_YAML.replace("type: numeric", "type: fuzzy"))
    assert error.data["kind"] == "unknown_criterion"
    assert error.data["field"] == "scenarios[0].rubric.criteria[0].type"
    assert error.data["line"] == 11


def test_a_regex_that_does_not_compile_is_refused_at_load_time() -> None:
    text = GOOD_YAML.replace("- type: length\n", "- type: regex\n          pattern: '(a'\n")
    text = text.replace("          max_words: 5\n", "")
    error = refused(text)
    assert error.data["kind"] == "bad_regex"
    assert error.data["field"] == "scenarios[0].rubric.criteria[1].pattern"
    assert error.data["line"] == 14


@pytest.mark.parametrize("weight", [0, -1, ".inf"])
def test_a_criterion_weight_that_is_not_positive_is_refused(weight: object) -> None:
    error = refused(GOOD_YAML.replace("weight: 0.5", f"weight: {weight}"))
    assert error.data["kind"] == "bad_weight"
    assert error.data["field"] == "scenarios[0].rubric.criteria[1].weight"
    assert error.data["line"] == 15


def test_a_scenario_weight_that_is_not_positive_is_refused() -> None:
    error = refused(GOOD_YAML.replace("weight: 2", "weight: 0"))
    assert error.data["kind"] == "bad_weight" and error.data["field"] == "scenarios[1].weight"
    assert error.data["line"] == 25


def test_an_invalid_json_schema_is_refused_at_load_time() -> None:
    rubric = {"criteria": [{"type": "json", "mode": "schema", "schema": {"type": "thing"}}]}
    error = refused(json.dumps(scenario_dict("a-1", rubric=rubric)) + "\n", filename="s.jsonl")
    assert error.data["kind"] == "bad_schema"
    assert error.data["field"] == "scenarios[0].rubric.criteria[0].schema"


def test_a_criterion_that_needs_a_reference_refuses_a_scenario_without_one() -> None:
    item = scenario_dict("a-1")
    del item["reference"]
    error = refused(yaml.safe_dump([item]))
    assert error.data["kind"] == "missing_reference"
    assert error.data["field"] == "scenarios[0].reference"


def test_a_numeric_criterion_refuses_a_reference_that_is_not_a_number() -> None:
    rubric = {"criteria": [{"type": "numeric"}]}
    error = refused(yaml.safe_dump([scenario_dict("a-1", reference="four", rubric=rubric)]))
    assert error.data["field"] == "scenarios[0].reference"


def test_a_duplicate_yaml_key_is_refused() -> None:
    error = refused("- id: a-1\n  id: a-2\n  domain: math\n")
    assert error.data["kind"] == "duplicate_key"
    assert error.data["field"] == "scenarios[0].id" and error.data["line"] == 2


def test_an_unknown_top_level_key_is_refused() -> None:
    error = refused("defaults: {}\nscenarios: []\n")
    assert error.data["kind"] == "unknown_field" and error.data["line"] == 1


def test_unsafe_yaml_tags_are_refused() -> None:
    error = refused("- !!python/object/apply:os.system ['true']\n")
    assert error.data["kind"] == "syntax"


def test_an_alias_bomb_is_refused_without_expanding_it() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    error = refused("\n".join(lines) + "\nscenarios: *a8\n")
    assert error.data["kind"] == "too_large"


def test_a_file_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ValidationError) as info:
        parse_scenarios(b"- id: \xff\n", filename="s.yaml")
    assert info.value.data["kind"] == "encoding"


def test_an_unsupported_file_suffix_is_refused() -> None:
    assert refused("[]", filename="s.json").data["kind"] == "unsupported_file"


def test_one_bad_file_makes_the_whole_catalog_load_fail(tmp_path: Path) -> None:
    root = tmp_path / "scenarios"
    write(root / "core" / "a.yaml", GOOD_YAML)
    write(root / "held-out" / "z.yaml", "- id: [\n")
    with pytest.raises(ValidationError) as info:
        load_catalog(root)
    assert info.value.data["file"] == str(root / "held-out" / "z.yaml")


def test_a_catalog_refuses_the_same_id_in_two_sets_even_when_built_by_hand() -> None:
    core = parse_scenarios(
        yaml.safe_dump([scenario_dict("a-1")]).encode(), filename="c.yaml", default_set="core"
    )
    held = parse_scenarios(
        yaml.safe_dump([scenario_dict("a-1")]).encode(), filename="h.yaml", default_set="held-out"
    )
    with pytest.raises(ValidationError):
        ScenarioCatalog(
            {"core": ScenarioSet.of("core", core), "held-out": ScenarioSet.of("held-out", held)}
        )


# ------------------------------------------------------------------------------- versions


def test_set_version_ignores_order_formatting_comments_and_spelled_out_defaults(
    tmp_path: Path,
) -> None:
    items = [scenario_dict(f"s-{i}") for i in range(5)]
    root_a = tmp_path / "a" / "scenarios"
    write(root_a / "core" / "all.yaml", "# comment\n" + yaml.safe_dump({"scenarios": items}))
    root_b = tmp_path / "b" / "scenarios"
    shuffled = [
        {**item, "set": "core", "weight": 1, "rubric": {**item["rubric"], "pass_mark": 0.7}}
        for item in reversed(items)
    ]
    write(root_b / "core" / "one.jsonl", "\n".join(json.dumps(i) for i in shuffled[:2]) + "\n")
    write(root_b / "core" / "two.yml", yaml.safe_dump(shuffled[2:], default_flow_style=True))
    assert load_catalog(root_a).core.version == load_catalog(root_b).core.version


def test_set_version_changes_with_any_content_change() -> None:
    items = [scenario_dict(f"s-{i}") for i in range(3)]
    base = parse_scenarios(yaml.safe_dump(items).encode(), filename="a.yaml", default_set="core")
    items[1]["reference"] = "5"
    changed = parse_scenarios(yaml.safe_dump(items).encode(), filename="a.yaml", default_set="core")
    assert set_version(base) != set_version(changed)
    assert scenario_hash(base[0]) == scenario_hash(changed[0])
    assert scenario_hash(base[1]) != scenario_hash(changed[1])
    assert set_version(base) == ScenarioSet.of("core", reversed(base)).version


def test_prompt_hash_recognises_a_held_out_prompt_under_another_id() -> None:
    held = parse_scenarios(
        yaml.safe_dump([scenario_dict("h-1", prompt="secret")]).encode(),
        filename="h.yaml",
        default_set="held-out",
    )[0]
    copy = parse_scenarios(
        yaml.safe_dump([scenario_dict("c-9", prompt="secret")]).encode(),
        filename="c.yaml",
        default_set="core",
    )[0]
    assert prompt_hash(held) == prompt_hash(copy)
    assert scenario_hash(held) != scenario_hash(copy)


def test_scenarios_round_trip_through_builtins_unchanged() -> None:
    scenarios = parse_scenarios(GOOD_YAML.encode(), filename="m.yaml", default_set="core")
    again = msgspec.convert(msgspec.to_builtins(scenarios), list[Scenario])
    assert again == scenarios
    assert [scenario_hash(s) for s in again] == [scenario_hash(s) for s in scenarios]


def test_a_decoded_rubric_keeps_its_regex_compiled() -> None:
    rubric = {"criteria": [{"type": "regex", "pattern": "^4$"}]}
    scenario = parse_scenarios(
        yaml.safe_dump([scenario_dict("a-1", rubric=rubric)]).encode(),
        filename="a.yaml",
        default_set="core",
    )[0]
    criterion = scenario.rubric.criteria[0]
    assert isinstance(criterion, RegexCriterion)
    assert criterion.compiled() is criterion.compiled()


# ------------------------------------------------------------------------------- quick subsets


def make_pool() -> list[Scenario]:
    items = []
    for tag, count in (("arith", 12), ("algebra", 6), ("geometry", 2)):
        items += [scenario_dict(f"{tag}-{i:02d}", tags=[tag]) for i in range(count)]
    items += [scenario_dict(f"untagged-{i}", tags=[], domain="logic") for i in range(3)]
    core = parse_scenarios(yaml.safe_dump(items).encode(), filename="c.yaml", default_set="core")
    held_items = [scenario_dict(f"held-{i}", tags=["arith"]) for i in range(4)]
    held = parse_scenarios(
        yaml.safe_dump(held_items).encode(), filename="h.yaml", default_set="held-out"
    )
    return core + held


def test_quick_subset_is_the_same_whatever_the_order_of_its_input() -> None:
    pool = make_pool()
    first = quick_subset(pool, size=8)
    assert first == quick_subset(list(reversed(pool)), size=8)
    assert first == quick_subset(sorted(pool, key=lambda s: s.prompt), size=8)
    assert len(first) == 8 and [s.id for s in first] == sorted(s.id for s in first)


def test_quick_subset_covers_every_stratum_when_the_size_allows() -> None:
    pool = make_pool()
    chosen = quick_subset(pool, size=6)
    strata = {(s.set, s.tags[0] if s.tags else s.domain) for s in chosen}
    assert (
        strata
        == {
            ("core", "arith"),
            ("core", "algebra"),
            ("core", "geometry"),
            ("core", "logic"),
            ("held-out", "arith"),
        }
        and len(chosen) == 6
    )


def test_quick_subset_shares_the_rest_in_proportion_to_stratum_size() -> None:
    chosen = quick_subset(make_pool(), size=14)
    arith = [s for s in chosen if s.set == "core" and s.tags and s.tags[0] == "arith"]
    geometry = [s for s in chosen if s.tags and s.tags[0] == "geometry"]
    assert len(arith) > len(geometry) >= 1


def test_quick_subset_depends_on_its_seed_and_returns_everything_when_size_is_large() -> None:
    pool = make_pool()
    assert quick_subset(pool, size=5, seed="a") != quick_subset(pool, size=5, seed="b")
    assert quick_subset(pool, size=1000) == sorted(pool, key=lambda s: s.id)
    with pytest.raises(ValidationError):
        quick_subset(pool, size=0)
