"""Real chat models without vLLM: the thinking switch, reading reasoning, model defaults, identity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from modelsmith.gpu.engine import Completion
from modelsmith.gpu.model_identity import base_model_identity, generation_defaults
from modelsmith.gpu.prompting import load_tokenizer, render_prompt
from modelsmith.loop.cluster.config import Cluster, ClusterConfig
from modelsmith.loop.eval.answers import eval_sampling, split_reasoning
from modelsmith.loop.eval.run import read_answer, score_batch
from modelsmith.loop.scoring.scenarios import Scenario

from .thinking_model import thinking_model


@pytest.fixture(scope="module")
def thinking_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thinking_model(tiny_model_dir, tmp_path_factory.mktemp("thinking") / "model")


def test_the_thinking_switch_reaches_the_chat_template(thinking_dir: Path) -> None:
    tokenizer = load_tokenizer(thinking_dir)
    thinking = render_prompt(tokenizer, "Bid floor?")
    plain = render_prompt(tokenizer, "Bid floor?", chat_template_kwargs={"enable_thinking": False})
    assert thinking == "<|user|>\nBid floor?\n<|assistant|>\n<think>"
    assert plain == "<|user|>\nBid floor?\n<|assistant|>\n"


@pytest.mark.parametrize(
    ("text", "server_reasoning", "answer", "reasoning"),
    [
        ("<think>cpm is 2.5</think>\n2.5", None, "2.5", "cpm is 2.5"),
        ("opened in the prompt</think> 2.5", None, "2.5", "opened in the prompt"),
        ("<think>ran out of tok", None, "", "ran out of tok"),
        ("2.5", None, "2.5", None),
        ("2.5", "the server's own", "2.5", "the server's own"),
        ("<think>a</think>x<think>b</think>y", None, "xy", "a\nb"),
    ],
)
def test_reasoning_is_split_from_the_answer_by_the_documented_rule(
    text: str, server_reasoning: str | None, answer: str, reasoning: str | None
) -> None:
    assert split_reasoning(text, server_reasoning) == (answer, reasoning)


def _scenario() -> Scenario:
    return msgspec.convert({
        "id": "cpm-1", "set": "core", "domain": "pricing", "prompt": "CPM?", "reference": "2.5",
        "rubric": {"criteria": [{"type": "exact"}]},
    }, Scenario)


def test_strip_reasoning_scores_the_answer_and_the_result_keeps_both() -> None:
    scenario = _scenario()
    completion = Completion(text="<think>revenue over impressions</think>2.5", token_count=9,
                            finish_reason="stop")

    (kept,) = score_batch([read_answer(scenario, completion, strip_reasoning=False)])
    (stripped,) = score_batch([read_answer(scenario, completion, strip_reasoning=True)])

    assert not kept.passed and kept.reasoning is None and kept.response == completion.text
    assert stripped.passed and stripped.response == "2.5"
    assert stripped.reasoning == "revenue over impressions"


def _cluster(tmp_path: Path, model_dir: Path, sampling: dict[str, object]) -> Cluster:
    config = ClusterConfig.model_validate({
        "model": {"base": str(model_dir), "chat_template_kwargs": {"enable_thinking": False}},
        "sampling": sampling,
    })
    return Cluster(name="c", root=tmp_path, config=config)


def test_sampling_takes_the_cluster_then_the_model_generation_config_then_defaults(
    tmp_path: Path,
) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 512}))

    from_model = eval_sampling(_cluster(tmp_path, model_dir, {"stop": ["\n\n"]}))
    from_cluster = eval_sampling(_cluster(tmp_path, model_dir, {"temperature": 0.0,
                                                                "max_tokens": 32}))
    (model_dir / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    greedy_model = eval_sampling(_cluster(tmp_path, model_dir, {}))
    (model_dir / "generation_config.json").unlink()
    defaults = eval_sampling(_cluster(tmp_path, model_dir, {}))

    assert (from_model.temperature, from_model.top_p, from_model.max_tokens) == (0.6, 0.95, 512)
    assert from_model.stop == ["\n\n"]
    assert from_model.chat_template_kwargs == {"enable_thinking": False}
    assert (from_cluster.temperature, from_cluster.top_p, from_cluster.max_tokens) == (0.0, 0.95,
                                                                                       32)
    assert greedy_model.temperature == 0.0
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens) == (0.0, 1.0, 64)
    assert generation_defaults(tmp_path / "nowhere").temperature is None


def test_the_base_identity_hashes_config_and_index_and_follows_their_changes(
    tmp_path: Path,
) -> None:
    model = tmp_path / "base"
    model.mkdir()
    (model / "config.json").write_text('{"hidden_size": 128}')
    (model / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    unindexed = base_model_identity(model)
    assert unindexed is not None and unindexed.method == "sizes"

    (model / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1"}}')
    indexed = base_model_identity(model)
    assert indexed is not None and indexed.method == "index"
    assert indexed.sha256 != unindexed.sha256
    assert base_model_identity(model) == indexed  # cached: same stat, same answer

    config = model / "config.json"
    config.write_text('{"hidden_size": 256}')
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = base_model_identity(model)
    assert changed is not None and changed.sha256 != indexed.sha256
    assert base_model_identity(tmp_path / "hosted") is None


def test_the_tiny_model_has_an_identity(tiny_model_dir: Path) -> None:
    identity = base_model_identity(tiny_model_dir)
    assert identity is not None and identity.files == ("config.json", "model.safetensors")
