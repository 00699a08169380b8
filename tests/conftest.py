"""Shared fixtures: a tokenizer trained here, tiny random models built from configs, small data files.

Nothing touches the network. Models are saved with save_pretrained (safetensors) into temporary folders so
every test exercises the same loading path a user's folder would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "the quick brown fox jumps over the lazy dog",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nimport sys\n\nclass Thing:\n    pass\n",
    "knowledge distillation trains a small student on a large teacher's soft targets",
    "while True:\n    break\n",
    "hello world, hello student, hello teacher",
]

# report.json's per-model keys promised by the interface contract (../shared/DESIGN.md).
REPORT_MODEL_KEYS = frozenset(
    {
        "params",
        "cross_entropy",
        "perplexity",
        "bits_per_byte",
        "top1_accuracy",
        "agreement",
        "kl_to_teacher",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
    }
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant: {% endif %}"
)


def train_tokenizer(
    vocab_size: int = 320,
    specials: tuple[str, ...] = ("<|pad|>", "<|bos|>", "<|eos|>"),
    chat_template: str = CHAT_TEMPLATE,
    **named_specials: str,
):
    """A byte-level BPE tokenizer trained on CORPUS with `specials` (ids 0, 1, ... in order) and a chat template.

    `named_specials` (bos_token=, eos_token=, pad_token=) say which special is which; default: this file's
    <|bos|>, <|eos|>, <|pad|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    names = named_specials or {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.chat_template = chat_template
    return fast


def llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def qwen2_config(vocab_size: int, hidden: int = 32, layers: int = 2, **extra):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def save_model(config, tokenizer, folder: Path, seed: int = 0) -> Path:
    """Save a random model built from `config`, with `tokenizer` beside it unless it is None."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama teacher whose embedding matrix is padded beyond the tokenizer's vocabulary."""
    folder = tmp_path_factory.mktemp("teacher")
    return save_model(llama_config(len(tokenizer) + 16, hidden=64), tokenizer, folder, seed=1)


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, tokenizer) -> Path:
    """A smaller tiny Qwen2 student with exactly the tokenizer's vocabulary and no tokenizer files of its own.

    (transformers 5 loads the same tokenizer files as Qwen2Tokenizer in a qwen2 folder, which adds a token;
    a student folder without tokenizer files uses the teacher's, as a fresh student would.)"""
    folder = tmp_path_factory.mktemp("student")
    return save_model(qwen2_config(len(tokenizer), hidden=32), None, folder, seed=2)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text_rows():
    lines = []
    for i in range(48):
        lines.append({"text": CORPUS[i % len(CORPUS)] + f" {i}"})
    return lines


@pytest.fixture()
def train_file(tmp_path, text_rows) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", text_rows)


@pytest.fixture()
def eval_file(tmp_path) -> Path:
    rows = [{"prompt": "def add(a, b):", "completion": "\n    return a + b\n"}, {"text": "hello world, the lazy fox"}]
    return write_jsonl(tmp_path / "eval.jsonl", rows * 4)


@pytest.fixture()
def one_thread():
    """Forked children compute on one thread (torch's pool does not survive fork); so must the parent, or float
    results differ in the last bits between the two and files written by both are not byte-identical."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
