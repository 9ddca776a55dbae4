"""OpenAI grader JSON into native criteria: every supported grader kind imported from one file
and scored on known answers to the values OpenAI's graders guide gives them (string_check 1/0
by its operation's rule, text_similarity the metric's value passed at ``pass_threshold``,
score_model the judge's number on its ``range``, label_model pass by ``passing_labels``, multi
its ``calculate_output`` over the sub-graders' scores), and hostile grader files refused with a
typed error that names the grader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from modelsmith.errors import ValidationError
from modelsmith.loop.graders.openai_import import ImportOptions, convert
from modelsmith.loop.scoring.rubric import RubricScore, score, score_with_judge
from modelsmith.loop.scoring.scenarios import Scenario, parse_scenarios

DATA = Path(__file__).parent / "data"
EVERY_KIND = (DATA / "openai_graders_every_kind.json").read_text()
MULTI = (DATA / "openai_multi_grader.json").read_text()
ITEMS = (DATA / "openai_items.jsonl").read_text()
CONTACT = '{"name": "John Doe", "email": "john.doe@gmail.com", "input": "Write the contact."}\n'


def imported(graders: str = EVERY_KIND, items: str = ITEMS, **options: Any) -> list[Scenario]:
    settings: dict[str, Any] = {"name": "capitals", "set": "core", "judge_engine": "judge",
                                "prompt": "{{item.question}}"} | options
    conversion = convert(graders, items, ImportOptions(**settings))
    data = b"".join(msgspec.json.encode(s) + b"\n" for s in conversion.scenarios)
    return parse_scenarios(data, filename="capitals.jsonl", default_set="core",
                           judge_engines={"judge"})


def by_name(result: RubricScore) -> dict[str, Any]:
    return {c.name: c for c in result.criteria}


def judged(scenario: Scenario, answer: str, reply: str) -> RubricScore:
    async def judge(text: str) -> str:
        assert answer in text  # the judge is shown the answer in place of {{sample.output_text}}
        return reply

    return anyio.run(lambda: score_with_judge(scenario.rubric, answer, scenario.reference,
                                              prompt_text="q", judge={"judge": judge}))


def test_every_supported_grader_kind_imports_into_one_native_criterion_each() -> None:
    first, second = imported()
    kinds = [c.kind for c in first.rubric.criteria]
    assert kinds == ["exact", "regex", "contains", "contains", *["similarity"] * 9,
                     "rubric_judge", "label"]
    assert first.id == "capitals-0001" and first.prompt == "What is the capital of France?"
    assert first.reference == "Paris" and second.reference == "Rome"  # the first grader's reference
    assert [c.name for c in first.rubric.criteria][:2] == ["exact_city", "not_london"]


def test_string_check_scores_one_or_zero_by_its_operation() -> None:
    paris = imported()[0]
    exact = by_name(score(paris.rubric, "Paris", paris.reference))
    assert [exact[n].score for n in ("exact_city", "not_london", "mentions_city",
                                     "mentions_city_any_case")] == [1.0, 1.0, 1.0, 1.0]
    # eq and like are case-sensitive, ilike is not; ne is 1 unless the answer equals its reference
    lower = by_name(score(paris.rubric, "paris is the capital", paris.reference))
    assert [lower[n].score for n in ("exact_city", "not_london", "mentions_city",
                                     "mentions_city_any_case")] == [0.0, 1.0, 0.0, 1.0]
    london = by_name(score(paris.rubric, "London", paris.reference))
    assert london["not_london"].score == 0.0 and london["exact_city"].score == 0.0


def test_text_similarity_scores_the_metric_value_and_passes_at_its_threshold() -> None:
    cat, fuzzy = imported()
    # "the cat is on the mat" vs "the cat sat on the mat": 5 of 6 unigrams, 3 of 5 bigrams,
    # 1 of 4 trigrams, an LCS of 5 tokens; GLEU = min(9/18 matches, 9/18) over 1..4-grams.
    results = by_name(score(cat.rubric, "the cat is on the mat", cat.reference))
    assert results["rouge_1"].score == pytest.approx(5 / 6)
    assert results["rouge_2"].score == pytest.approx(3 / 5)
    assert results["rouge_3"].score == pytest.approx(1 / 4)
    assert results["rouge_4"].score == 0.0 and results["rouge_5"].score == 0.0
    assert results["rouge_l"].score == pytest.approx(5 / 6)
    assert results["gleu"].score == pytest.approx(0.5)
    assert results["rouge_1"].passed and not results["rouge_3"].passed
    same = by_name(score(cat.rubric, "the cat sat on the mat", cat.reference))
    assert same["bleu"].score == pytest.approx(1.0) and same["fuzzy"].score == pytest.approx(1.0)
    assert by_name(score(cat.rubric, "zebra", cat.reference))["bleu"].score == 0.0
    # The guide's rapidfuzz example pair: WRatio with default_process, / 100.
    wuzzy = by_name(score(fuzzy.rubric, "fuzzy wuzzy was a bear", fuzzy.reference))["fuzzy"]
    assert wuzzy.score == pytest.approx(0.7555555555) and not wuzzy.passed  # threshold 0.8


def test_score_model_becomes_a_rubric_judge_on_its_range_and_label_model_a_label() -> None:
    paris = imported()[0]
    reply_score = '{"scores": {"result": 8}, "reasoning": "close, misses the country"}'
    result = by_name(judged(paris, "Paris", reply_score))
    quality = result["quality"]
    assert quality.score == pytest.approx(0.8) and quality.passed  # 8 of 0..10, pass at 7
    assert quality.reasoning == "close, misses the country" and quality.parts == {"result": 0.8}
    assert "misses" not in quality.detail  # the reasoning is kept apart from what is shown
    assert result["verdict"].error_kind == "judge_failure"  # a score reply is no label reply
    labelled = by_name(judged(paris, "Paris", '{"label": "correct"}'))
    assert labelled["verdict"].score == 1.0 and labelled["verdict"].passed
    unsure = by_name(judged(paris, "Paris", '```json\n{"label": "unsure", "reasoning": "?"}\n```'))
    assert unsure["verdict"].score == 0.0 and not unsure["verdict"].passed


@pytest.mark.parametrize("reply", [
    "SCORE: 8",
    '{"scores": {"result": 11}}',  # outside the range: a judge failure, never clipped to a pass
    '{"scores": {"result": "8"}}',
    '{"scores": {"result": 8, "extra": 1}}',
    '{"scores": {}}',
    'Sure! {"scores": {"result": 8}}',
    '{"scores": {"result": 8}} {"scores": {"result": 1}}',
    "[" * 10_000,
    '{"a":' * 100_000,
    "",
])
def test_a_malformed_structured_reply_is_a_judge_failure_not_a_zero(reply: str) -> None:
    paris = imported()[0]
    result = judged(paris, "Paris", reply)
    quality = by_name(result)["quality"]
    assert quality.error_kind == "judge_failure" and result.judge_error and not result.passed
    assert 0.0 < result.score  # the other criteria still count; the judge's fault charges nothing


def test_multi_combines_the_sub_graders_by_calculate_output_on_their_own_ranges() -> None:
    (contact,) = imported(MULTI, CONTACT, name="contact", prompt="{{item.input}}")
    assert contact.rubric.formula is not None and [c.name for c in contact.rubric.criteria] == [
        "name", "email", "tone"]
    right = '{"name": "John Doe", "email": "john.doe@gmail.com"}'
    typo = '{"name": "Jon Doe", "email": "john.doe@gmail.com"}'
    wrong_email = '{"name": "John Doe", "email": "jd@example.com"}'
    polite = '{"scores": {"result": 5}}'  # tone 5 of 10: min(1, 5 / 5) = 1
    assert judged(contact, right, polite).score == pytest.approx(1.0)
    # The guide: with the email wrong the score lies in 0..0.5, with it right in 0.5..1.
    assert 0.5 <= judged(contact, typo, polite).score < 1.0
    assert judged(contact, wrong_email, polite).score == pytest.approx(0.5)
    rude = '{"scores": {"result": 2.5}}'  # tone on its own range in the formula: 2.5 / 5
    assert judged(contact, right, rude).score == pytest.approx(0.5)


def _refused(graders: Any, items: str = ITEMS, **options: Any) -> ValidationError:
    text = graders if isinstance(graders, str) else msgspec.json.encode(graders).decode()
    with pytest.raises(ValidationError) as caught:
        imported(text, items, **options)
    return caught.value


STRING_CHECK = {"type": "string_check", "name": "s", "operation": "eq",
                "input": "{{sample.output_text}}", "reference": "{{item.city}}"}


def test_a_python_grader_is_refused_saying_why_and_how_to_express_the_check() -> None:
    error = _refused({"type": "python", "name": "p", "source": "def grade(s, i): return 1.0"})
    assert error.data["grader"] == "grader" and error.data["field"] == "type"
    assert "arbitrary code" in error.message and "string_check" in error.message
    nested = _refused({"type": "multi", "calculate_output": "a", "graders": {
        "a": {"type": "python", "source": "import os"}}})
    assert nested.data["grader"] == "grader.graders.a"


@pytest.mark.parametrize(("graders", "grader", "field"), [
    ("{not json", None, None),
    ([], None, None),
    ({"type": "regex_check", "name": "x"}, "grader", "type"),
    ([STRING_CHECK, {**STRING_CHECK, "operation": "startswith"}], "[1]", "operation"),
    ({**STRING_CHECK, "input": "The answer: {{sample.output_text}}"}, "grader", "input"),
    ({**STRING_CHECK, "input": "{{item.city}}"}, "grader", "input"),
    ({**STRING_CHECK, "input": "{{sample.output_tools[0].function.name}}"}, "grader", "input"),
    ({**STRING_CHECK, "reference": "{{ env.HOME }}"}, "grader", "reference"),
    ({**STRING_CHECK, "reference": "{{item.city"}, "grader", "reference"),
    ({**STRING_CHECK, "type": "text_similarity", "evaluation_metric": "cosine"}, "grader",
     "evaluation_metric"),
    ({**STRING_CHECK, "type": "text_similarity", "evaluation_metric": "fuzzy_match",
      "pass_threshold": 2}, "grader", "pass_threshold"),
    ({"type": "score_model", "name": "q", "model": "m", "range": [1, 1],
      "input": [{"role": "user", "content": "{{sample.output_text}}"}]}, "grader", "range"),
    ({"type": "score_model", "name": "q", "model": "m",
      "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "grader", "input[0].content"),
    ({"type": "label_model", "name": "l", "model": "m", "labels": ["a"], "passing_labels": ["b"],
      "input": [{"role": "user", "content": "{{sample.output_text}}"}]}, "grader",
     "passing_labels"),
    ({"type": "multi", "graders": {"a": STRING_CHECK}, "calculate_output": "a + b"}, "grader",
     "calculate_output"),
    ({"type": "multi", "graders": {"a": STRING_CHECK}, "calculate_output": "a.__class__"},
     "grader", "calculate_output"),
    ({"type": "multi", "graders": {"a": STRING_CHECK}, "calculate_output": "a ^ 100000"},
     None, None),  # read fine; bounded when it is evaluated (below)
    ({"type": "multi", "graders": {"a": {"type": "multi", "graders": {}, "calculate_output": "1"}},
      "calculate_output": "a"}, "grader.graders.a", "type"),
    ({"type": "multi", "graders": {"min": STRING_CHECK}, "calculate_output": "min"},
     "grader.graders", "min"),
])
def test_a_hostile_grader_file_is_a_typed_error_naming_the_grader_and_field(
        graders: Any, grader: str | None, field: str | None) -> None:
    if grader is None and field is None and isinstance(graders, dict):
        (scenario, _) = imported(msgspec.json.encode(graders).decode())
        result = score(scenario.rubric, "Paris", scenario.reference)
        assert result.scoring_error and not result.passed and "exponent" in (
            result.formula_error or "")
        return
    error = _refused(graders)
    assert error.code == ValidationError.code
    if grader is not None:
        assert error.data["grader"].endswith(grader)
        assert error.data["field"] == field


def test_a_template_naming_an_unknown_item_field_names_the_grader_and_the_item_line() -> None:
    error = _refused({**STRING_CHECK, "reference": "{{item.capital}}"})
    assert error.data == {"file": "graders", "grader": "grader", "field": "reference", "line": 1,
                          "grader_name": "s"}
    assert "capital" in error.message and "grader grader ('s')" in error.message
    nested = _refused(MULTI.replace("{{item.email}}", "{{item.mail}}"), CONTACT)
    assert nested.data["grader"] == "grader.graders.email"
    assert nested.data["grader_name"] == "email_grader"


def test_model_graders_need_a_judge_engine_and_items_must_be_objects() -> None:
    error = _refused(EVERY_KIND, judge_engine=None)
    assert error.data["grader"] == "testing_criteria[13]" and "--judge-engine" in error.message
    bad_items = _refused(STRING_CHECK, items='{"city": "Paris"}\n[1, 2]\n')
    assert bad_items.data == {"file": "items", "line": 2}
    assert _refused(STRING_CHECK, items="\n\n").data == {"file": "items"}


def test_item_values_with_braces_stay_literal_in_a_judge_template() -> None:
    grader = {"type": "label_model", "name": "l", "model": "m", "labels": ["a", "b"],
              "passing_labels": ["a"],
              "input": [{"role": "user", "content": "{{item.city}}: {{sample.output_text}}"}]}
    (scenario, _) = imported(msgspec.json.encode(grader).decode(),
                             '{"city": "{response.__class__} {0}", "question": "q"}\n{"city": "x", "question": "q"}\n')
    seen: list[str] = []

    async def judge(text: str) -> str:
        seen.append(text)
        return '{"label": "a"}'

    anyio.run(lambda: score_with_judge(scenario.rubric, "ANSWER", None, prompt_text="q",
                                       judge={"judge": judge}))
    assert seen[0].startswith("[user]\n{response.__class__} {0}: ANSWER")


def test_one_multi_grader_holding_every_kind_scores_known_answers_through_its_formula() -> None:
    (paris,) = imported((DATA / "openai_multi_every_kind.json").read_text(),
                        '{"question": "Capital of France?", "city": "Paris"}\n')
    assert [c.kind for c in paris.rubric.criteria] == [
        "exact", "regex", "contains", "contains", "similarity", "similarity", "similarity",
        "similarity", "rubric_judge", "label"]

    async def judge(text: str) -> str:
        return '{"label": "right"}' if '"label"' in text else '{"scores": {"result": 0.5}}'

    def scored(answer: str) -> RubricScore:
        return anyio.run(lambda: score_with_judge(paris.rubric, answer, paris.reference,
                                                  prompt_text="q", judge={"judge": judge}))

    # Every sub-grader scores 1 on the exact answer; the score_model's 0.5 on -1..1 enters the
    # formula as 0.5 (not its normalised 0.75): (9 / 9) * max(0, 0.5).
    right = scored("Paris")
    assert {c.name: c.score for c in right.criteria}["score"] == pytest.approx(0.75)
    assert right.score == pytest.approx(0.5)
    # "paris": eq 0, ne 1, like 0, ilike 1, the metrics on their own values.
    lower = scored("paris")
    values = {c.name: c.score for c in lower.criteria}
    assert [values[n] for n in ("eq", "ne", "like", "ilike")] == [0.0, 1.0, 0.0, 1.0]
    expected = (sum(values[n] for n in ("eq", "ne", "like", "ilike", "fuzzy", "bleu", "gleu",
                                        "rouge", "label")) / 9) * 0.5
    assert lower.score == pytest.approx(expected)
