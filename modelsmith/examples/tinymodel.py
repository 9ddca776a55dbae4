"""A tiny Llama-style model and tokenizer, built locally, for tests, benchmarks and the quickstart.

No model can be downloaded here, so tests build their own: a randomly initialised Llama (fixed seed,
float32, head_dim 64 because vLLM's CPU attention refuses smaller heads) and a byte-level BPE
tokenizer trained on a given corpus, with a chat template. Both are saved with ``save_pretrained``
so they load through the same ``from_pretrained`` paths a real model takes (transformers, vLLM,
TRL).

The build is deterministic and cached: ``out_dir/modelsmith-tiny.json`` records a hash of the
inputs, and a second call with the same inputs returns at once. A build is written to a temporary
sibling directory, fsynced, and renamed into place, so a crash never leaves half a model behind.

:func:`pretrain` optionally trains the model as a language model on plain domain text (knowledge,
no task), and :func:`warm_start` fine-tunes it on a few (prompt, answer) pairs (the answer format),
so a demo model starts weak but not hopeless, as a real base model would. Both replace the weights
file atomically and record themselves in the marker, so repeating the same step is a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelsmith.atomic import atomic_write_text, fsync_dir
from modelsmith.errors import ConflictError, NotFound, ValidationError
from modelsmith.gpu.prompting import load_tokenizer, render_prompt

__all__ = [
    "CHAT_TEMPLATE",
    "MARKER_NAME",
    "SPECIAL_TOKENS",
    "build_tiny_model",
    "pretrain",
    "warm_start",
]

MARKER_NAME = "modelsmith-tiny.json"
# Bump when the build recipe changes, so old caches are rebuilt rather than trusted.
_RECIPE_VERSION = 1
_HEAD_DIM = 64
_BYTE_ALPHABET_SIZE = 256

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)

# Each turn is "<|role|>\n<content>\n"; an assistant turn ends with eos so a fine-tuned model
# learns to stop. No bos anywhere: the template and the tokenizer agree that prompts start bare,
# so vLLM, TRL and the warm start all see the same token ids.
# Newlines are written as expressions because transformers renders with trim_blocks, which eats
# a literal newline that follows a block tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\\n' }}{% endif %}"
)


def _transformers() -> Any:
    """transformers, imported late (it is heavy) and typed loosely (its stubs are partial)."""
    return importlib.import_module("transformers")


def _build_hash(corpus: Sequence[str], arguments: dict[str, int]) -> str:
    digest = hashlib.sha256()
    digest.update(
        json.dumps({"recipe": _RECIPE_VERSION, **arguments}, sort_keys=True).encode("utf-8")
    )
    for text in corpus:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
    return digest.hexdigest()


def _read_marker(model_dir: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((model_dir / MARKER_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return marker if isinstance(marker, dict) else None


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root``; make them readable by the service group."""
    root.chmod(0o755)
    for path in sorted(root.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(directory)


def _train_tokenizer(corpus: Sequence[str], vocab_size: int, max_length: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = _transformers()

    backend = Tokenizer(models.BPE())
    # Byte-level: every string encodes, whatever the corpus was.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer=trainer)
    tokenizer = hf.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=max_length,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_into(
    directory: Path, corpus: Sequence[str], arguments: dict[str, int], build_hash: str
) -> None:
    import torch

    hf = _transformers()
    tokenizer = _train_tokenizer(
        corpus, arguments["vocab_size"], arguments["max_position_embeddings"]
    )
    # The model's vocabulary is exactly the tokenizer's: an id the tokenizer cannot decode
    # must never be sampled.
    config = hf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=arguments["hidden_size"],
        intermediate_size=2 * arguments["hidden_size"],
        num_hidden_layers=arguments["num_layers"],
        num_attention_heads=arguments["num_heads"],
        num_key_value_heads=arguments["num_heads"],
        head_dim=_HEAD_DIM,
        max_position_embeddings=arguments["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(arguments["seed"])
    model = hf.LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = hf.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    marker = {
        "build_hash": build_hash,
        "arguments": arguments,
        "corpus_texts": len(corpus),
        "vocab_size": len(tokenizer),
        "warm_starts": [],
    }
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def build_tiny_model(
    out_dir: Path,
    corpus: Sequence[str],
    *,
    seed: int = 0,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
) -> Path:
    """Build (or find cached) a tiny Llama and its tokenizer in ``out_dir``; return ``out_dir``.

    ``vocab_size`` is the tokenizer's target size; the model's vocabulary is the trained
    tokenizer's actual size (at most ``vocab_size``). A directory that holds something other
    than a tiny model is refused with ConflictError rather than overwritten.
    """
    out_dir = Path(out_dir)
    if isinstance(corpus, str):
        raise ValidationError(
            "corpus must be a sequence of texts, not one string", data={"field": "corpus"}
        )
    minimum_vocab = _BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < minimum_vocab:
        raise ValidationError(
            f"vocab_size must be at least {minimum_vocab} (bytes plus special tokens)",
            data={"field": "vocab_size"},
        )
    if hidden_size <= 0 or num_layers <= 0 or num_heads <= 0 or max_position_embeddings <= 0:
        raise ValidationError("model sizes must be positive", data={"field": "hidden_size"})
    arguments = {
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings,
    }
    build_hash = _build_hash(corpus, arguments)
    marker = _read_marker(out_dir)
    if marker is not None and marker.get("build_hash") == build_hash:
        return out_dir
    if out_dir.exists() and marker is None and any(out_dir.iterdir()):
        raise ConflictError(
            f"{out_dir} exists and does not hold a Modelsmith tiny model; refusing to replace it",
            data={"file": str(out_dir)},
        )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        _build_into(staging, corpus, arguments, build_hash)
        _fsync_tree(staging)
        _swap_into_place(staging, out_dir, build_hash)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _swap_into_place(staging: Path, out_dir: Path, build_hash: str) -> None:
    """Rename the finished build onto ``out_dir``, moving an older build aside first."""
    retired: Path | None = None
    if out_dir.exists():
        marker = _read_marker(out_dir)
        if marker is not None and marker.get("build_hash") == build_hash:
            return  # another process finished the same build first
        if marker is None and any(out_dir.iterdir()):
            raise ConflictError(f"{out_dir} changed during the build", data={"file": str(out_dir)})
        retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, retired / out_dir.name)
    os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def _warm_start_hash(pairs: Sequence[tuple[str, str]], steps: int, lr: float, seed: int) -> str:
    payload = {"pairs": [list(pair) for pair in pairs], "steps": steps, "lr": lr, "seed": seed}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


def warm_start(
    model_dir: Path,
    pairs: Sequence[tuple[str, str]],
    *,
    steps: int = 60,
    lr: float = 3e-3,
    seed: int = 0,
) -> None:
    """Supervised fine-tune of the tiny model on ``pairs`` (prompt, answer), saved back atomically.

    Prompts are rendered with :func:`render_prompt` exactly as eval renders them; the loss covers
    only the answer tokens and the closing eos. Repeating the last warm start is a no-op.
    """
    model_dir = Path(model_dir)
    marker = _read_marker(model_dir)
    if marker is None:
        raise NotFound(f"no Modelsmith tiny model in {model_dir}", data={"file": str(model_dir)})
    if not pairs:
        raise ValidationError(
            "warm_start needs at least one (prompt, answer) pair", data={"field": "pairs"}
        )
    if steps <= 0 or lr <= 0:
        raise ValidationError("steps and lr must be positive", data={"field": "steps"})
    warm_hash = _warm_start_hash(pairs, steps, lr, seed)
    history = marker.get("warm_starts") or []
    if history and history[-1] == warm_hash:
        return

    import torch

    hf = _transformers()
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(seed)
    model = hf.LlamaForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    )
    model.train()
    input_ids, labels, attention = _supervised_batch(tokenizer, pairs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        if not torch.isfinite(loss):
            raise ValidationError("warm start diverged (non-finite loss)", data={"field": "lr"})
        loss.backward()
        optimizer.step()
    model.eval()
    _replace_weights(model, model_dir)
    marker["warm_starts"] = [*history, warm_hash]
    atomic_write_text(model_dir / MARKER_NAME, json.dumps(marker, indent=2) + "\n")


def _replace_weights(model: Any, model_dir: Path) -> None:
    """Save ``model``'s weights beside the model and rename the file over the old one."""
    staging = Path(tempfile.mkdtemp(prefix=".weights-", dir=model_dir))
    try:
        model.save_pretrained(str(staging))
        weights = sorted(staging.glob("*.safetensors"))
        if [w.name for w in weights] != ["model.safetensors"]:
            raise ValidationError(
                "unexpected weight files from save_pretrained", data={"file": str(staging)}
            )
        _fsync_tree(staging)
        os.replace(weights[0], model_dir / "model.safetensors")
        fsync_dir(model_dir)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(staging)


def pretrain(
    model_dir: Path,
    texts: Sequence[str],
    *,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> None:
    """Train the tiny model as a plain causal language model on ``texts``, saved back atomically.

    Every token of each text (closed by eos) is predicted, with no chat template and no task:
    this gives the model knowledge of a domain, the way a real base model read about it before
    anyone asked it a question. Each step trains on ``batch_size`` texts drawn (seeded) from
    ``texts``. Repeating the last pretraining is a no-op.
    """
    model_dir = Path(model_dir)
    marker = _read_marker(model_dir)
    if marker is None:
        raise NotFound(f"no Modelsmith tiny model in {model_dir}", data={"file": str(model_dir)})
    if isinstance(texts, str) or not texts:
        raise ValidationError(
            "pretrain needs a non-empty sequence of texts", data={"field": "texts"}
        )
    if steps <= 0 or lr <= 0 or batch_size <= 0:
        raise ValidationError("steps, lr and batch_size must be positive", data={"field": "steps"})
    digest = hashlib.sha256()
    digest.update(json.dumps({"steps": steps, "lr": lr, "batch_size": batch_size,
                              "seed": seed, "texts": list(texts)}, sort_keys=True).encode("utf-8"))
    pretrain_hash = digest.hexdigest()
    history = marker.get("pretrains") or []
    if history and history[-1] == pretrain_hash:
        return

    import torch

    hf = _transformers()
    tokenizer = load_tokenizer(model_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = hf.LlamaForCausalLM.from_pretrained(
        str(model_dir), local_files_only=True, dtype=torch.float32
    )
    model.train()
    encoded = [
        [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for text in texts
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        rows = rng.sample(encoded, min(batch_size, len(encoded)))
        input_ids, labels, attention = _padded(rows, [list(row) for row in rows],
                                               tokenizer.pad_token_id)
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        if not torch.isfinite(loss):
            raise ValidationError("pretraining diverged (non-finite loss)", data={"field": "lr"})
        loss.backward()
        optimizer.step()
    model.eval()
    _replace_weights(model, model_dir)
    marker["pretrains"] = [*history, pretrain_hash]
    atomic_write_text(model_dir / MARKER_NAME, json.dumps(marker, indent=2) + "\n")


def _supervised_batch(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> tuple[Any, Any, Any]:
    """Token ids, labels (answer tokens only) and attention mask, right-padded."""

    rows: list[tuple[list[int], list[int]]] = []
    for prompt, answer in pairs:
        prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)[
            "input_ids"
        ]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
        rows.append((list(prompt_ids) + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    return _padded([ids for ids, _ in rows], [lab for _, lab in rows], tokenizer.pad_token_id)


def _padded(
    ids_rows: Sequence[list[int]], label_rows: Sequence[list[int]], pad: int
) -> tuple[Any, Any, Any]:
    """Right-pad token ids (with ``pad``) and labels (with -100, ignored); the attention mask."""
    import torch

    width = max(len(ids) for ids in ids_rows)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in ids_rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for lab in label_rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in ids_rows])
    return input_ids, labels, attention
