"""Adapters on disk: atomic save with a manifest, verification that names the bad file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from modelsmith.errors import ConflictError, ValidationError
from modelsmith.gpu.adapters import (
    MANIFEST_NAME,
    adapter_hash,
    hash_file_list,
    manifest_sha256,
    save_adapter_atomically,
    verify_adapter,
)


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir: Path) -> Any:
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(base, config)


@pytest.fixture
def saved(peft_model: Any, tmp_path: Path) -> Path:
    out = tmp_path / "adapters" / "iter-1"
    save_adapter_atomically(peft_model, out, base_model="tiny")
    return out


def test_a_saved_adapter_verifies_and_its_hash_covers_every_file(
    peft_model: Any, tmp_path: Path
) -> None:
    out = tmp_path / "adapters" / "iter-1"
    manifest = save_adapter_atomically(peft_model, out, base_model="tiny-base")

    assert verify_adapter(out) == manifest
    assert adapter_hash(out) == manifest.adapter_sha256 == hash_file_list(manifest.files)
    names = {entry.name for entry in manifest.files}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert names == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert manifest.base_model == "tiny-base"
    assert len(manifest_sha256(out)) == 64
    assert not list(out.parent.glob("*.partial-*"))


def test_the_same_weights_saved_twice_have_the_same_adapter_hash(
    peft_model: Any, tmp_path: Path
) -> None:
    first = save_adapter_atomically(peft_model, tmp_path / "a", base_model="tiny")
    second = save_adapter_atomically(peft_model, tmp_path / "b", base_model="tiny")
    assert first.adapter_sha256 == second.adapter_sha256


def test_a_missing_file_fails_verification_naming_it(saved: Path) -> None:
    (saved / "adapter_config.json").unlink()
    with pytest.raises(ValidationError) as caught:
        verify_adapter(saved)
    assert caught.value.data["file"] == str(saved / "adapter_config.json")
    assert caught.value.data["reason"] == "missing"


def test_an_altered_file_fails_verification_naming_it(saved: Path) -> None:
    weights = saved / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ValidationError) as caught:
        adapter_hash(saved)
    assert caught.value.data["file"] == str(weights)
    assert caught.value.data["reason"] == "altered"


def test_an_unlisted_weight_file_fails_but_a_sidecar_file_does_not(saved: Path) -> None:
    (saved / "training_manifest.json").write_text("{}")
    verify_adapter(saved)
    (saved / "adapter_model.bin").write_bytes(b"smuggled weights")
    with pytest.raises(ValidationError) as caught:
        verify_adapter(saved)
    assert caught.value.data["reason"] == "unlisted"


def test_a_directory_without_a_manifest_is_not_an_adapter(peft_model: Any, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    peft_model.save_pretrained(str(bare))
    with pytest.raises(ValidationError) as caught:
        verify_adapter(bare)
    assert caught.value.data["file"] == str(bare / MANIFEST_NAME)


def test_a_corrupt_manifest_fails_verification(saved: Path) -> None:
    (saved / MANIFEST_NAME).write_text('{"format": 1}')
    with pytest.raises(ValidationError):
        verify_adapter(saved)


def test_saving_over_an_existing_adapter_is_refused_unless_replacing(
    peft_model: Any, saved: Path
) -> None:
    with pytest.raises(ConflictError):
        save_adapter_atomically(peft_model, saved)
    (saved / "adapter_config.json").write_text("{}")  # damage it: replacing must repair
    manifest = save_adapter_atomically(peft_model, saved, replace=True)
    assert verify_adapter(saved) == manifest
    assert not list(saved.parent.glob("*.replaced-*"))


_CRASH_BEFORE_RENAME = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from modelsmith.gpu import adapters

    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], local_files_only=True)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))

    def power_cut(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    os.rename = power_cut  # the process dies where the directory would be renamed into place
    adapters.save_adapter_atomically(model, Path(sys.argv[2]))
    """
)


def test_a_crash_before_the_rename_leaves_no_adapter_and_the_next_save_cleans_up(
    peft_model: Any, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapters" / "iter-2"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASH_BEFORE_RENAME, str(tiny_model_dir), str(out)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert crashed.returncode == -9, crashed.stderr.decode()[-2000:]
    assert not out.exists()
    partials = list(out.parent.glob("iter-2.partial-*"))
    assert len(partials) == 1 and (partials[0] / MANIFEST_NAME).is_file()

    save_adapter_atomically(peft_model, out)
    verify_adapter(out)
    assert not list(out.parent.glob("iter-2.partial-*"))
