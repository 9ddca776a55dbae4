"""Hostile inputs to scoring, the scenario loader and the inbox: each is refused or bounded with a
typed error that says where, and nothing stored changes. Real files, a real cluster runtime."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelsmith.errors import ValidationError
from modelsmith.examples import rtb_pricing
from modelsmith.loop.autonomy import inbox
from modelsmith.loop.autonomy.inbox import MAX_STORED_NAME_BYTES, ingest, stored_name
from modelsmith.loop.cluster.config import load_cluster
from modelsmith.loop.cluster.fleet import ClusterRuntime
from modelsmith.loop.eval.run import check_tag, score_batch, scoring_errors
from modelsmith.loop.scoring.bounded import SCORE_TIME_LIMIT_S
from modelsmith.loop.scoring.criteria import Rubric
from modelsmith.loop.scoring.rubric import score
from modelsmith.loop.scoring.scenarios import (
    MAX_SCENARIO_FILE_BYTES,
    Scenario,
    load_catalog,
    parse_scenarios,
    prompt_byte_limit,
)
from modelsmith.loop.scoring.yaml_lines import MAX_YAML_NODES

CATASTROPHIC = r"^(a|a)+$"
ANSWER_32_TOKENS = "a" * 32 + "!"


def scenario_yaml(criterion: str, *, scenario_id: str = "hostile-1", prompt: str = "hi") -> str:
    return (
        "scenarios:\n"
        f"  - id: {scenario_id}\n"
        "    set: core\n"
        "    domain: adtech\n"
        f"    prompt: {json.dumps(prompt)}\n"
        "    rubric:\n"
        "      criteria:\n"
        f"        - {criterion}\n"
    )


def refused(text: str, *, filename: str = "hostile.yaml", **kwargs: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        parse_scenarios(text.encode(), filename=filename, **kwargs)
    return caught.value


def rubric_of(*criteria: dict[str, Any]) -> Rubric:
    return msgspec.convert({"criteria": list(criteria)}, Rubric)


# -- scoring bounded in time ----------------------------------------------------------------


def test_a_catastrophic_regex_is_a_scoring_timeout_within_the_limit_not_a_freeze() -> None:
    rubric = rubric_of(
        {"type": "regex", "pattern": CATASTROPHIC}, {"type": "length", "max_chars": 99}
    )
    started = time.monotonic()
    result = score(rubric, ANSWER_32_TOKENS, None)
    assert time.monotonic() - started < SCORE_TIME_LIMIT_S + 0.5
    regex_result, length_result = result.criteria
    assert regex_result.error_kind == "scoring_timeout"
    assert length_result.passed
    assert result.scoring_error and not result.passed


def test_a_catastrophic_json_schema_pattern_is_bounded_too() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": CATASTROPHIC}}}
    rubric = rubric_of({"type": "json", "mode": "schema", "schema": schema})
    started = time.monotonic()
    result = score(rubric, json.dumps({"a": ANSWER_32_TOKENS}), None)
    assert time.monotonic() - started < SCORE_TIME_LIMIT_S + 0.5
    assert result.criteria[0].error_kind == "scoring_timeout"


def test_one_timed_out_scenario_is_its_own_error_and_the_rest_of_the_batch_is_scored() -> None:
    slow, fast = parse_scenarios(
        (
            scenario_yaml(f"{{type: regex, pattern: '{CATASTROPHIC}'}}", scenario_id="slow")
            + scenario_yaml("{type: regex, pattern: '^a+!$'}", scenario_id="fast").split("\n", 1)[1]
        ).encode(),
        filename="two.yaml",
    )
    results = score_batch(
        [(slow, ANSWER_32_TOKENS, "stop", 33), (fast, ANSWER_32_TOKENS, "stop", 33)]
    )
    by_id = {r.scenario_id: r for r in results}
    assert by_id["fast"].passed
    assert by_id["slow"].criteria[0].error_kind == "scoring_timeout" and not by_id["slow"].passed
    assert scoring_errors(results) == {"scoring_timeout": 1}


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        ({"$ref": "https://example.com/schema.json"}, (".$ref",)),
        ({"$ref": "#"}, (".$ref",)),
        (
            {
                "$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}},
                "$ref": "#/$defs/a",
            },
            (".$defs.a.$ref", ".$defs.b.$ref"),
        ),  # either end of the cycle
        ({"$ref": "#/nowhere"}, (".$ref",)),
    ],
)
def test_remote_unresolvable_and_self_referencing_refs_are_refused_at_load(
    schema: dict[str, Any], field: tuple[str, ...]
) -> None:
    criterion = "{type: json, mode: schema, schema: " + json.dumps(schema) + "}"
    error = refused(scenario_yaml(criterion))
    assert error.data["kind"] == "bad_schema_ref"
    assert error.data["file"] == "hostile.yaml" and error.data["line"] == 8
    assert error.data["field"].startswith("scenarios[0].rubric.criteria[0].schema")
    assert error.data["field"].endswith(field)


def test_a_prompt_larger_than_the_cluster_context_allows_is_refused_with_its_limit() -> None:
    limit = prompt_byte_limit(256)
    error = refused(
        scenario_yaml("{type: length, max_chars: 9}", prompt="x" * (limit + 1)),
        max_prompt_bytes=limit,
    )
    assert error.data["kind"] == "prompt_too_long" and error.data["limit"] == limit
    assert error.data["field"] == "scenarios[0].prompt" and error.data["line"] == 5


def test_ids_and_tags_with_a_trailing_newline_or_control_character_are_refused() -> None:
    bad_id = {
        "id": "a\n",
        "set": "core",
        "domain": "d",
        "prompt": "p",
        "rubric": {"criteria": [{"type": "length", "max_chars": 3}]},
    }
    error = refused(json.dumps(bad_id) + "\n", filename="x.jsonl")
    assert error.data["field"] == "scenarios[0].id"
    bad_tag = {**bad_id, "id": "a", "tags": ["ok", "two\nlines"]}
    assert (
        refused(json.dumps(bad_tag) + "\n", filename="x.jsonl").data["field"]
        == "scenarios[0].tags[1]"
    )
    with pytest.raises(ValidationError):
        check_tag("tag\n")


# -- memory: refused by size, counted while composing ---------------------------------------


def test_a_scenario_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    core = tmp_path / "scenarios" / "core"
    core.mkdir(parents=True)
    (core / "huge.yaml").write_bytes(b"- a\n" * (MAX_SCENARIO_FILE_BYTES // 4 + 1))
    with pytest.raises(ValidationError) as caught:
        load_catalog(tmp_path / "scenarios")
    assert caught.value.data["kind"] == "too_large"
    assert caught.value.data["limit"] == MAX_SCENARIO_FILE_BYTES


def test_a_yaml_file_past_the_node_budget_is_refused_at_the_line_where_it_ran_out() -> None:
    error = refused("- a\n" * (MAX_YAML_NODES + 10))
    assert error.data["kind"] == "too_large"
    assert error.data["line"] == MAX_YAML_NODES  # the sequence is node 1, item n is node n+1


def test_yaml_nested_past_the_depth_limit_is_refused() -> None:
    assert refused("[" * 200 + "]" * 200).data["kind"] == "too_large"


# -- the inbox -------------------------------------------------------------------------------


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[ClusterRuntime]:
    (tmp_path / "model").mkdir()
    root = rtb_pricing.write_cluster(tmp_path / "home", tmp_path / "model")
    cluster_runtime = ClusterRuntime(load_cluster(root))
    cluster_runtime.open()
    yield cluster_runtime


GOOD = scenario_yaml("{type: length, max_chars: 9}", scenario_id="drop-1")


def stored_tree(runtime: ClusterRuntime) -> dict[str, bytes]:
    root = runtime.cluster.root
    out = {}
    for path in sorted((root / "scenarios").rglob("*")):
        if path.is_file():
            out[str(path.relative_to(root))] = path.read_bytes()
    out["ledger"] = runtime.cluster.ledger_path.read_bytes()
    return out


def drop(runtime: ClusterRuntime, name: str, text: str = GOOD) -> Path:
    path = runtime.cluster.root / "inbox" / name
    path.write_text(text)
    return path


def rejected_names(runtime: ClusterRuntime) -> list[str]:
    return sorted(os.listdir(runtime.cluster.root / "rejected"))


def test_a_long_drop_name_is_stored_under_a_shortened_name_that_fits(
    runtime: ClusterRuntime,
) -> None:
    name = "x" * 215 + ".yaml"
    outcome = ingest(runtime, drop(runtime, name))
    assert outcome.accepted
    stored = [
        p.name
        for p in (runtime.cluster.scenarios_dir / "core").iterdir()
        if p.name.startswith("inbox-")
    ]
    assert len(stored) == 1 and len(stored[0].encode()) <= 255 and stored[0].endswith(".yaml")
    bad = ingest(runtime, drop(runtime, "y" * 240 + ".yaml", "scenarios: [1"))
    assert bad.state == "rejected"
    assert all(len(n.encode()) <= 255 for n in rejected_names(runtime))


def test_stored_names_hold_no_newline_or_control_character() -> None:
    assert stored_name("a\nb\x1b.yaml") == "a_b_.yaml"
    assert len(stored_name("é" * 300 + ".yaml").encode()) <= MAX_STORED_NAME_BYTES


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "socket"])
def test_a_drop_that_is_not_a_regular_file_is_moved_to_rejected_with_a_reason_and_not_read(
    runtime: ClusterRuntime, tmp_path: Path, kind: str
) -> None:
    before = stored_tree(runtime)
    path = runtime.cluster.root / "inbox" / "drop.yaml"
    secret = tmp_path / "secret.yaml"
    secret.write_text("api_key: hunter2\n")
    secret.chmod(0o600)
    if kind == "symlink":
        path.symlink_to(secret)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    outcome = ingest(runtime, path)  # a FIFO must not block here
    assert outcome.state == "rejected" and outcome.kind == "not_regular_file"
    assert not os.path.lexists(path)
    error_text = (runtime.cluster.root / "rejected" / "drop.yaml.error.txt").read_text()
    assert (
        "not_regular_file" in error_text
        and "hunter2" not in error_text
        and "api_key" not in error_text
    )
    assert stored_tree(runtime) == before


def test_an_error_text_names_where_the_problem_is_and_not_the_content(
    runtime: ClusterRuntime,
) -> None:
    before = stored_tree(runtime)
    outcome = ingest(runtime, drop(runtime, "bad.yaml", "secret_token: s3cr3t-value\n"))
    assert outcome.state == "rejected"
    error_text = (runtime.cluster.root / "rejected" / "bad.yaml.error.txt").read_text()
    assert "s3cr3t-value" not in error_text and "file: bad.yaml" in error_text
    assert os.stat(runtime.cluster.root / "rejected" / "bad.yaml.error.txt").st_mode & 0o077 == 0
    assert stored_tree(runtime) == before


def test_the_duplicate_id_message_of_a_drop_names_its_file_and_line(
    runtime: ClusterRuntime,
) -> None:
    taken_id = runtime.require_catalog().core.ids()[0]
    outcome = ingest(
        runtime,
        drop(
            runtime, "dup.yaml", scenario_yaml("{type: length, max_chars: 9}", scenario_id=taken_id)
        ),
    )
    assert outcome.kind == "duplicate_id"
    assert "dup.yaml:2" in outcome.detail
    assert "line: 2" in (runtime.cluster.root / "rejected" / "dup.yaml.error.txt").read_text()


def test_a_dropped_synthetic_scenario_is_rejected_only_synth_writes_that_set(
    runtime: ClusterRuntime,
) -> None:
    text = scenario_yaml("{type: length, max_chars: 9}").replace("set: core", "set: synthetic")
    outcome = ingest(runtime, drop(runtime, "syn.yaml", text))
    assert outcome.kind == "invalid_value" and not outcome.accepted
    assert "synthetic" not in runtime.require_catalog().sets


def test_a_drop_that_changes_after_it_was_read_stays_as_a_new_drop(
    runtime: ClusterRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = drop(runtime, "slow.yaml")
    real_reload = runtime.reload_scenarios

    def writer_appends_meanwhile() -> list[str]:
        with path.open("a") as fh:
            fh.write("# more\n")
        return real_reload()

    monkeypatch.setattr(runtime, "reload_scenarios", writer_appends_meanwhile)
    outcome = ingest(runtime, path)
    assert outcome.accepted and "taken again" in outcome.detail
    assert path.read_text().endswith("# more\n")  # not lost


def test_a_drop_that_cannot_even_be_rejected_is_left_in_place_and_reported(
    runtime: ClusterRuntime,
) -> None:
    # rejected/ is a file: making the folder fails with an OSError, as ENOSPC would.
    (runtime.cluster.root / "rejected").write_text("not a folder")
    path = drop(runtime, "bad.yaml", "scenarios: [1")
    outcome = ingest(runtime, path)
    assert outcome.state == "left" and outcome.kind == "syntax" and path.exists()


def test_a_drop_owned_by_another_user_is_rejected(runtime: ClusterRuntime) -> None:
    path = drop(runtime, "theirs.yaml")
    if os.getuid() != 0:
        pytest.skip("only root can give a file away")
    os.chown(path, 54321, 54321)
    outcome = ingest(runtime, path)
    assert outcome.kind == "wrong_owner" and not path.exists()


def test_an_unreadable_drop_is_rejected_not_raised(runtime: ClusterRuntime) -> None:
    path = drop(runtime, "locked.yaml")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root")
    outcome = ingest(runtime, path)
    assert outcome.state == "rejected" and outcome.kind == "unreadable"


def test_a_drop_over_the_size_limit_is_refused_without_reading_it(
    runtime: ClusterRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inbox, "MAX_SCENARIO_FILE_BYTES", 10)
    outcome = ingest(runtime, drop(runtime, "big.yaml"))
    assert outcome.kind == "too_large"


def test_every_example_prompt_fits_the_example_clusters_context() -> None:
    # The limit a cluster would apply must not refuse its own shipped scenarios.
    for scenario in rtb_pricing_scenarios():
        assert len(str(scenario.prompt).encode()) <= prompt_byte_limit(256)


def rtb_pricing_scenarios() -> list[Scenario]:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "model").mkdir()
        root = rtb_pricing.write_cluster(Path(folder) / "home", Path(folder) / "model")
        return list(load_catalog(root / "scenarios").all())
