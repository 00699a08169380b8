"""Loading teacher, student and tokenizer, and making sure their vocabularies line up.

Logit distillation compares two distributions over the same tokens, so teacher and student must share a
tokenizer. Embedding matrices are often padded beyond the tokenizer (Qwen: 151936 vs 152064 rows for one
tokenizer); we then work over the tokenizer's real vocabulary, `len(tokenizer)`, and ignore the padding rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distill.errors import DistillError

try:
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub; transformers 4 configs raise ValueError
    StrictDataclassError = ValueError

# transformers 5 validates configs with huggingface_hub's strict dataclasses; their errors mean a bad config too.
CONFIG_ERRORS = (ValueError, TypeError, StrictDataclassError)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str | torch.device | None = "auto", key: str = "device", local_rank: int = 0):
    """The one device rule. `auto`/None: this process's GPU when one is visible, else the CPU; `cuda` picks the
    process's own GPU (`local_rank` under torchrun); anything else (cpu, cuda:1, mps) as written.

    A GPU asked for where none is visible, or a name torch does not know, is the user's mistake: one line naming
    `key`, not a CUDA traceback later.
    """
    name = "auto" if requested is None else str(requested)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DistillError(f"{key}: {name!r} is not a device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistillError(f"{key}: {name} was asked for but no GPU is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DistillError(f"{key}: mps was asked for but is not available here")
    return device


def stored_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint's config.json says its weights are stored in (None when it does not say)."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        return DTYPES.get(value.removeprefix("torch."))
    return value if value in DTYPES.values() else None


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on a GPU that supports it and float32 elsewhere (a model evaluated or trained on a CPU)."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16); without it, bf16 matmuls
    are emulated and slower than float32."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's probes (private, hence getattr)
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def teacher_dtype(name: str, device: torch.device) -> torch.dtype:
    """The teacher's dtype: 'auto' is bfloat16 on a GPU that supports it and on a CPU with native bf16 — the
    teacher only runs forward without gradients, where bf16 is 2.7-4.7x faster on such CPUs (benchmarks/gpu_check.py
    --parts cpu) and its distributions stay within the tolerance tests/test_teacher_dtype.py states — and float32
    elsewhere."""
    if name == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return resolve_dtype(name, device)


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


def attn_implementation(name: str, device: torch.device, key: str) -> str | None:
    """transformers' `attn_implementation` for a recipe value (None = its own default), checked for `device`.

    flash_attention_2 needs the flash_attn package and a CUDA GPU; asked for elsewhere it is the user's mistake,
    refused here in one line naming `key` rather than by transformers in a traceback at load or at the first step.
    """
    if name not in ATTN_IMPLEMENTATIONS:
        raise DistillError(f"{key}: {name!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name == "flash_attention_2":
        import importlib.util

        if device.type != "cuda":
            raise DistillError(f"{key}: flash_attention_2 runs on CUDA GPUs only, not on {device}; use sdpa")
        if importlib.util.find_spec("flash_attn") is None:
            raise DistillError(f"{key}: flash_attention_2 needs the flash_attn package (pip install flash-attn)")
    return None if name == "auto" else name


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).exists()


def _check_local_folder(source: str, role: str) -> None:
    path = Path(source).expanduser()
    if not path.exists():
        raise DistillError(f"{role} folder {source} does not exist")
    if not path.is_dir():
        raise DistillError(f"{role} {source} is a file; give the model's folder")
    if not (path / "config.json").is_file():
        raise DistillError(f"{role} folder {source} has no config.json (is it a transformers model folder?)")


def load_config(source: str, role: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's transformers config, without loading weights."""
    from transformers import AutoConfig

    if _looks_local(source):
        _check_local_folder(source, role)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise DistillError(f"cannot load {role} config from {source}: {str(e).splitlines()[0]}") from None
    except CONFIG_ERRORS as e:
        raise DistillError(f"{role} {source}: {str(e).splitlines()[0]}") from None


def load_model(
    source: str,
    role: str,
    dtype: torch.dtype,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """A causal LM from a local folder or hub id, from safetensors weights only (no pickle).

    `attn_implementation`: transformers' name (sdpa, eager, flash_attention_2) or None for its default; see
    `attn_implementation()` for the recipe value."""
    from transformers import AutoModelForCausalLM

    if _looks_local(source):
        _check_local_folder(source, role)
        folder = Path(source).expanduser()
        if not any(folder.glob("*.safetensors")):
            raise DistillError(f"{role} folder {source} has no .safetensors weights (pickle weights are not loaded)")
    try:
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision, use_safetensors=True, **extra
        )
    except OSError as e:
        raise DistillError(f"cannot load {role} model from {source}: {str(e).splitlines()[0]}") from None
    except ValueError as e:
        raise DistillError(f"{role} {source}: {str(e).splitlines()[0]}") from None
    return model


def new_model_from_config(
    config_dict: dict,
    vocab_size: int,
    dtype: torch.dtype,
    seed: int,
    tokenizer=None,
    attn_implementation: str | None = None,
):
    """A randomly initialized causal LM from a transformers config dict (needs `model_type`).

    With `tokenizer`, bos/eos/pad ids the dict does not set come from it, in the config and in the model's
    generation_config: a model type's defaults (Llama: bos 1, eos 2) name ordinary tokens of most tokenizers, so
    sampling would stop at one and the saved config.json / generation_config.json would name the wrong EOS. Ids the
    dict sets are kept; the generation config's EOS list then also holds the tokenizer's EOS."""
    from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

    config_dict = dict(config_dict)
    if tokenizer is not None:
        for key, value in _tokenizer_special_ids(tokenizer).items():
            config_dict.setdefault(key, value)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise DistillError("recipe key student.config: needs model_type (e.g. llama, qwen2)")
    if model_type not in CONFIG_MAPPING:
        # transformers' own message lists every known type: thousands of characters on one line.
        raise DistillError(f"recipe key student.config.model_type: unknown model type {model_type!r}")
    config_dict.setdefault("vocab_size", vocab_size)
    try:
        config = AutoConfig.for_model(model_type, **config_dict)
    except CONFIG_ERRORS as e:
        raise DistillError(f"recipe key student.config: {str(e).splitlines()[0]}") from None
    if config.vocab_size < vocab_size:
        raise DistillError(
            f"recipe key student.config.vocab_size: {config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    torch.manual_seed(seed)
    try:
        extra = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)
    except CONFIG_ERRORS as e:
        raise DistillError(f"recipe key student.config: {str(e).splitlines()[0]}") from None
    if tokenizer is not None and model.generation_config is not None:
        generation = model.generation_config
        for key in ("bos_token_id", "pad_token_id"):
            setattr(generation, key, getattr(config, key, None))
        eos = config.eos_token_id
        eos = list(eos) if isinstance(eos, list | tuple) else [] if eos is None else [eos]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        generation.eos_token_id = eos[0] if len(eos) == 1 else eos or None
    return model


def _tokenizer_special_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's bos/eos/pad ids under their config keys (only those it has)."""
    ids = {key: getattr(tokenizer, key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {key: int(value) for key, value in ids.items() if value is not None}


def load_tokenizer(source: str, role: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.is_dir():
            raise DistillError(f"{role} tokenizer folder {source} does not exist")
        if not has_tokenizer(source):
            # transformers would quietly build an empty tokenizer from the model's config alone.
            raise DistillError(f"{role} folder {source} has no tokenizer files (tokenizer.json, tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, TypeError) as e:
        raise DistillError(f"cannot load {role} tokenizer from {source}: {str(e).splitlines()[0]}") from None


def has_tokenizer(folder: str) -> bool:
    path = Path(folder).expanduser()
    return path.is_dir() and any(
        (path / name).exists() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )


# ---------------------------------------------------------------- vocabulary


def compare_tokenizers(teacher_tok, student_tok) -> str | None:
    """None when the student's tokenizer maps every teacher token to the same id; else a one-line description.

    A student tokenizer that only appends tokens after the teacher's last id is compatible: the data is
    tokenized with the teacher's tokenizer, so those ids never occur, and distillation works over the teacher's
    vocabulary. (transformers 5 does this by itself: the same tokenizer files load with an extra
    `<|endoftext|>` in a qwen2 model folder.)
    """
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab == s_vocab:
        return None
    only_t = sorted(set(t_vocab) - set(s_vocab), key=t_vocab.get)
    only_s = sorted(set(s_vocab) - set(t_vocab), key=s_vocab.get)
    moved = [tok for tok in set(t_vocab) & set(s_vocab) if t_vocab[tok] != s_vocab[tok]]
    if not only_t and not moved and all(s_vocab[tok] >= len(t_vocab) for tok in only_s):
        return None
    parts = [f"teacher has {len(t_vocab)} tokens, student {len(s_vocab)}"]
    if only_t:
        parts.append(f"{len(only_t)} only in the teacher's (e.g. {only_t[:3]})")
    if only_s:
        parts.append(f"{len(only_s)} only in the student's (e.g. {only_s[:3]})")
    if moved:
        example = sorted(moved)[0]
        parts.append(f"{len(moved)} with different ids (e.g. {example!r}: {t_vocab[example]} vs {s_vocab[example]})")
    return "; ".join(parts)


def embedding_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_vocabulary(tokenizer, teacher, student) -> int:
    """The shared real vocabulary size; every model must have at least that many output rows."""
    vocab_size = len(tokenizer)
    for role, model in (("teacher", teacher), ("student", student)):
        if model is not None and embedding_rows(model) < vocab_size:
            raise DistillError(
                f"{role} has {embedding_rows(model)} output rows but the tokenizer has {vocab_size} tokens"
            )
    return vocab_size


def max_context(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# ---------------------------------------------------------------- summary


@dataclass
class Models:
    """What the training loop needs: the student (trainable), the teacher (frozen or None), the tokenizer."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    tokenizer: object
    vocab_size: int


def count_parameters(model) -> int:
    # Tied weights appear once in .parameters(), which is the count users expect.
    return sum(p.numel() for p in model.parameters())
