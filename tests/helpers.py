"""Builders the test files share: recipes as dicts, quiet runs, the trained student's weights.

Importable as `from helpers import ...` (pytest puts tests/ on sys.path, as for conftest). Fixtures stay in
conftest.py; this module holds plain functions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

# Keyword arguments of train/build_cache that print nothing: tests read results, not logs.
QUIET = {"log": lambda _: None, "show_progress": False}


def merge_sections(base: dict, sections: dict, deep: bool = False) -> dict:
    """`base` with each section of `sections` merged into it (key by key); returns `base`.

    `deep`: a dict value is merged into the dict already there (objective={"on_policy": {"lambda": 0.5}} keeps the
    other on_policy keys) instead of replacing it.
    """
    for section, values in sections.items():
        target = base.setdefault(section, {})
        for key, value in values.items():
            if deep and isinstance(value, dict) and isinstance(target.get(key), dict):
                target[key] = {**target[key], **value}
            else:
                target[key] = value
    return base


def recipe_dict(
    teacher_dir, student_dir, train_file, out, defaults: dict | None = None, deep: bool = False, **sections
) -> dict:
    """A small training recipe: the tiny teacher and student, forward KL, 4 steps, checkpoints every 2, no report.

    The teacher runs in float32 (not teacher.dtype auto, which is bfloat16 on a CPU with native bf16): these recipes
    compare runs to float32 precision (one process vs two, online vs cache, accumulation vs one batch), and bf16
    rounds differently for different batch shapes. tests/test_teacher_dtype.py tests auto and bf16's tolerance.

    `defaults`: a test file's own settings, merged over these first; `sections` (per test) are merged last.
    `deep`: see `merge_sections`.
    """
    base = {
        "teacher": {"path": str(teacher_dir), "dtype": "float32"},
        "student": {"path": str(student_dir)},
        "data": {"train": str(train_file), "max_length": 48},
        "objective": {"divergence": "forward_kl", "fused": False},
        "training": {"steps": 4, "batch_size": 4, "lr": 5e-3, "save_every": 2, "eval_every": 2, "log_every": 1},
        "report": {"enabled": False},
        "output": {"dir": str(out)},
    }
    return merge_sections(merge_sections(base, defaults or {}, deep), sections, deep)


def write_recipe(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The trained student's tensors of the run with output folder `out`."""
    return load_file(str(out / "student" / "model.safetensors"))


# ---------------------------------------------------------------- two tokenizers of one text (cross-tokenizer tests)

# Accents, CJK, emoji, leading spaces, tabs, code: what tokenizers split differently.
MULTILINGUAL = [
    "héllo wörld, naïve café",
    "你好世界，你好老师",
    "the student 😀 learns from the teacher 🎓",
    "  leading spaces and\ttabs",
    "def add(a, b):\n    return a + b\n",
    "knowledge distillation: ça marche très bien",
]


def byte_level_tokenizer(vocab_size: int = 300):
    """GPT-2-style byte-level BPE trained on MULTILINGUAL: no BOS, `<|eos|>` and `<|pad|>` (ids 1, 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(MULTILINGUAL * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>")


def sentencepiece_tokenizer(merges: int = 90):
    """Llama-2-style BPE trained on MULTILINGUAL: ▁ for spaces with a dummy prefix, <0xNN> byte fallback for what
    its small alphabet lacks, `<s>` written before every text; `<unk>`, `<s>`, `</s>` are ids 0, 1, 2."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    # A fixed small alphabet (ASCII letters, ▁ and é): ties in picking the most frequent characters would make the
    # trained vocabulary differ between processes; the rest (ö, ç, CJK, emoji, digits, ...) falls back to bytes.
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz▁é"))
    trainer = trainers.BpeTrainer(
        vocab_size=merges + len(specials) + len(alphabet),
        special_tokens=specials,
        initial_alphabet=alphabet,
        limit_alphabet=len(alphabet),
    )
    tok.train_from_iterator(MULTILINGUAL * 10, trainer)
    spec = json.loads(tok.to_str())
    # The byte tokens are ordinary vocabulary entries, as in Llama's tokenizer.json, not added tokens.
    spec["added_tokens"] = [a for a in spec["added_tokens"] if not a["content"].startswith("<0x")]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
