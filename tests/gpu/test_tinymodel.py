"""The tiny local model and prompt rendering: real transformers, tiny data, no hub."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from modelsmith.errors import ConflictError, NotFound, ValidationError
from modelsmith.examples.tinymodel import MARKER_NAME, build_tiny_model, pretrain, warm_start
from modelsmith.gpu.prompting import load_tokenizer, messages_for, render_prompt


def _greedy_answer(model_dir: Path, prompt: str, max_new_tokens: int = 12) -> str:
    tokenizer = load_tokenizer(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    encoded = tokenizer(
        render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False
    )
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    text: str = tokenizer.decode(
        output[0][encoded["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return text


def test_tiny_model_loads_through_from_pretrained_with_head_dim_64(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    tokenizer = load_tokenizer(tiny_model_dir)
    assert model.config.head_dim == 64
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_encodes_any_text_and_decodes_it_back(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    text = "Ünïcode bids: 1.25€ → 🚀 and text never seen in the corpus"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_text_prompt_renders_as_one_user_message_with_generation_prompt(
    tiny_model_dir: Path,
) -> None:
    tokenizer = load_tokenizer(tiny_model_dir)
    as_text = render_prompt(tokenizer, "What is CTR?")
    as_messages = render_prompt(tokenizer, [{"role": "user", "content": "What is CTR?"}])
    assert as_text == as_messages == "<|user|>\nWhat is CTR?\n<|assistant|>\n"
    with_system = render_prompt(
        tokenizer,
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "CTR?"}],
    )
    assert with_system == "<|system|>\nBe terse.\n<|user|>\nCTR?\n<|assistant|>\n"


def test_malformed_chat_messages_are_refused_with_validation_error() -> None:
    with pytest.raises(ValidationError):
        messages_for([{"role": "user"}])
    with pytest.raises(ValidationError):
        messages_for([])


def test_loading_a_tokenizer_from_a_missing_directory_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        load_tokenizer(tmp_path / "absent")


def test_same_inputs_return_the_cached_model_and_other_inputs_rebuild_it(
    tmp_path: Path, corpus: tuple[str, ...]
) -> None:
    model_dir = build_tiny_model(tmp_path / "m", corpus, hidden_size=64, num_heads=1)
    weights = (model_dir / "model.safetensors").read_bytes()
    marker_stat = (model_dir / MARKER_NAME).stat()

    assert build_tiny_model(tmp_path / "m", corpus, hidden_size=64, num_heads=1) == model_dir
    assert (model_dir / MARKER_NAME).stat().st_mtime_ns == marker_stat.st_mtime_ns

    build_tiny_model(tmp_path / "m", corpus, hidden_size=64, num_heads=1, seed=1)
    assert (model_dir / "model.safetensors").read_bytes() != weights
    assert json.loads((model_dir / MARKER_NAME).read_text())["arguments"]["seed"] == 1
    # No staging or retired directories are left beside the model.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_building_into_a_directory_holding_something_else_is_refused(
    tmp_path: Path, corpus: tuple[str, ...]
) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "precious.txt").write_text("keep me")
    with pytest.raises(ConflictError):
        build_tiny_model(tmp_path / "m", corpus)
    assert (tmp_path / "m" / "precious.txt").read_text() == "keep me"


def test_a_vocabulary_smaller_than_the_byte_alphabet_is_refused(
    tmp_path: Path, corpus: tuple[str, ...]
) -> None:
    with pytest.raises(ValidationError):
        build_tiny_model(tmp_path / "m", corpus, vocab_size=100)


def test_warm_start_teaches_the_answer_and_repeating_it_changes_nothing(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    pairs = [("What is CTR?", "clicks / impressions"), ("Bid floor?", "1.25 USD")]
    assert _greedy_answer(model_dir, "What is CTR?") != "clicks / impressions"

    warm_start(model_dir, pairs, steps=40, lr=3e-3)
    assert _greedy_answer(model_dir, "What is CTR?") == "clicks / impressions"
    weights = (model_dir / "model.safetensors").read_bytes()

    warm_start(model_dir, pairs, steps=40, lr=3e-3)
    assert (model_dir / "model.safetensors").read_bytes() == weights
    assert len(json.loads((model_dir / MARKER_NAME).read_text())["warm_starts"]) == 1
    assert not list(model_dir.glob(".warm-start-*"))


def _text_loss(model_dir: Path, text: str) -> float:
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_pretraining_lowers_the_loss_on_its_texts_and_repeating_it_changes_nothing(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    texts = ["premium video is premium inventory: buyers pay high prices for it."] * 4
    before = _text_loss(model_dir, texts[0])

    pretrain(model_dir, texts, steps=30, lr=3e-3, batch_size=4)
    after = _text_loss(model_dir, texts[0])
    assert after < before * 0.7
    weights = (model_dir / "model.safetensors").read_bytes()

    pretrain(model_dir, texts, steps=30, lr=3e-3, batch_size=4)
    assert (model_dir / "model.safetensors").read_bytes() == weights
    assert len(json.loads((model_dir / MARKER_NAME).read_text())["pretrains"]) == 1
    with pytest.raises(ValidationError):
        pretrain(model_dir, [], steps=1)
