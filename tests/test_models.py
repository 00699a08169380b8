"""Loading models and tokenizers from folders, and checking that teacher and student share a vocabulary."""

from __future__ import annotations

import inspect
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import llama_config, qwen2_config, save_model, train_tokenizer
from distill.config import Recipe
from distill.errors import DistillError
from distill.models import (
    check_vocabulary,
    compare_tokenizers,
    count_parameters,
    embedding_rows,
    has_tokenizer,
    load_config,
    load_model,
    load_tokenizer,
    max_context,
    new_model_from_config,
    resolve_dtype,
)

SMALL_LLAMA = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


def _one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DistillError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


class _Vocab:
    """Just enough of a tokenizer for compare_tokenizers."""

    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


# ---------------------------------------------------------------- tokenizers


def test_identical_tokenizers_compare_equal(tokenizer, teacher_dir):
    assert compare_tokenizers(tokenizer, tokenizer) is None
    assert compare_tokenizers(tokenizer, load_tokenizer(str(teacher_dir), "teacher")) is None


def test_different_vocabulary_sizes_are_described(tokenizer):
    smaller = train_tokenizer(vocab_size=300)
    message = compare_tokenizers(tokenizer, smaller)
    assert message is not None and "\n" not in message
    assert "teacher has 320 tokens, student 300" in message
    assert "20 only in the teacher's" in message


def test_token_missing_from_the_student_is_described(tokenizer):
    extended = train_tokenizer()
    extended.add_tokens(["<|tool|>"])
    message = compare_tokenizers(extended, tokenizer)
    assert message is not None and "1 only in the teacher's" in message and "<|tool|>" in message


def test_tokens_appended_by_the_student_are_compatible(tokenizer):
    # The data is tokenized with the teacher's tokenizer, so ids past the teacher's vocabulary never occur.
    extended = train_tokenizer()
    extended.add_tokens(["<|tool|>"])
    assert compare_tokenizers(tokenizer, extended) is None
    # A student token inside the teacher's id range is not just appended.
    message = compare_tokenizers(_Vocab({"a": 0, "b": 1}), _Vocab({"a": 0, "b": 1, "c": 1}))
    assert message is not None and "1 only in the student's" in message and "'c'" in message


def test_same_tokens_with_other_ids_are_described():
    message = compare_tokenizers(_Vocab({"a": 0, "b": 1, "c": 2}), _Vocab({"a": 0, "b": 2, "c": 1}))
    assert message is not None and "2 with different ids" in message and "'b': 1 vs 2" in message
    assert "only in" not in message


def test_load_tokenizer_from_folder(teacher_dir, tokenizer):
    loaded = load_tokenizer(str(teacher_dir), "teacher")
    assert len(loaded) == len(tokenizer)
    assert loaded.eos_token_id == tokenizer.eos_token_id and loaded.pad_token_id == tokenizer.pad_token_id
    assert loaded.chat_template == tokenizer.chat_template


def test_load_tokenizer_errors(tmp_path, student_dir):
    assert "does not exist" in _one_line_error(load_tokenizer, str(tmp_path / "nope"), "teacher")
    # A model folder without tokenizer files must not turn into an empty tokenizer.
    assert not has_tokenizer(str(student_dir))
    message = _one_line_error(load_tokenizer, str(student_dir), "student")
    assert message.startswith(f"student folder {student_dir} has no tokenizer files")


# ---------------------------------------------------------------- vocabulary sizes


def test_check_vocabulary_ignores_padding_rows(tokenizer, teacher_dir, student_dir):
    teacher = load_model(str(teacher_dir), "teacher", torch.float32)
    student = load_model(str(student_dir), "student", torch.float32)
    assert embedding_rows(teacher) == len(tokenizer) + 16
    assert embedding_rows(student) == len(tokenizer)
    assert check_vocabulary(tokenizer, teacher, student) == len(tokenizer)
    assert check_vocabulary(tokenizer, None, student) == len(tokenizer)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_check_vocabulary_refuses_a_model_smaller_than_the_tokenizer(tokenizer, role):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fits = AutoModelForCausalLM.from_config(qwen2_config(len(tokenizer), hidden=16, layers=1))
    short = AutoModelForCausalLM.from_config(qwen2_config(len(tokenizer) - 10, hidden=16, layers=1))
    models = {"teacher": fits, "student": fits, role: short}
    message = _one_line_error(check_vocabulary, tokenizer, models["teacher"], models["student"])
    assert message == f"{role} has {len(tokenizer) - 10} output rows but the tokenizer has {len(tokenizer)} tokens"


# ---------------------------------------------------------------- loading models


def test_load_model_from_folder(teacher_dir):
    model = load_model(str(teacher_dir), "teacher", torch.float32)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    assert model.config.vocab_size == embedding_rows(model)
    half = load_model(str(teacher_dir), "teacher", torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert count_parameters(half) == count_parameters(model)


def test_load_model_missing_folder(tmp_path):
    message = _one_line_error(load_model, str(tmp_path / "nope"), "teacher", torch.float32)
    assert message == f"teacher folder {tmp_path / 'nope'} does not exist"


def test_load_model_file_instead_of_folder(teacher_dir):
    weights = next(teacher_dir.glob("*.safetensors"))
    message = _one_line_error(load_model, str(weights), "student", torch.float32)
    assert message.startswith(f"student {weights} is a file")


def test_load_model_folder_without_config(tmp_path, teacher_dir):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    for weights in teacher_dir.glob("*.safetensors"):
        shutil.copy(weights, folder)
    message = _one_line_error(load_model, str(folder), "teacher", torch.float32)
    assert "has no config.json" in message


def test_load_model_refuses_pickle_weights(tmp_path, teacher_dir):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(teacher_dir / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    message = _one_line_error(load_model, str(folder), "teacher", torch.float32)
    assert "no .safetensors" in message and str(folder) in message


def test_load_model_broken_config(tmp_path, teacher_dir):
    folder = tmp_path / "broken"
    shutil.copytree(teacher_dir, folder)
    (folder / "config.json").write_text("{not json", encoding="utf-8")
    assert str(folder) in _one_line_error(load_model, str(folder), "teacher", torch.float32)
    assert str(folder) in _one_line_error(load_config, str(folder), "teacher")


def test_load_config_checks_the_folder(tmp_path, teacher_dir):
    assert load_config(str(teacher_dir), "teacher").model_type == "llama"
    assert "does not exist" in _one_line_error(load_config, str(tmp_path / "nope"), "teacher")
    assert "has no config.json" in _one_line_error(load_config, str(tmp_path), "teacher")


def test_load_config_with_invalid_values(tmp_path, teacher_dir):
    folder = tmp_path / "invalid"
    folder.mkdir()
    config = json.loads((teacher_dir / "config.json").read_text(encoding="utf-8"))
    config["hidden_size"] = 30  # not a multiple of the 4 heads
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert _one_line_error(load_config, str(folder), "teacher").startswith(f"teacher {folder}: ")


# ---------------------------------------------------------------- trust_remote_code


def test_trust_remote_code_is_off_by_default():
    recipe = Recipe()
    assert recipe.teacher.trust_remote_code is False and recipe.student.trust_remote_code is False
    for function in (load_model, load_config, load_tokenizer):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False


@pytest.mark.parametrize("trust", [None, False, True])
def test_loaders_pass_trust_remote_code_through(monkeypatch, teacher_dir, trust):
    import transformers

    calls = {}

    def capture(name):
        def from_pretrained(source, **kwargs):
            calls[name] = (source, kwargs)
            return SimpleNamespace()

        return from_pretrained

    for name in ("AutoModelForCausalLM", "AutoConfig", "AutoTokenizer"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", capture(name))
    extra = {} if trust is None else {"trust_remote_code": trust}
    load_model(str(teacher_dir), "teacher", torch.float16, revision="abc", **extra)
    load_config(str(teacher_dir), "teacher", **extra)
    load_tokenizer(str(teacher_dir), "teacher", **extra)
    expected = bool(trust)
    source, kwargs = calls["AutoModelForCausalLM"]
    assert source == str(teacher_dir)
    assert kwargs["trust_remote_code"] is expected and kwargs["use_safetensors"] is True
    assert kwargs["dtype"] == torch.float16 and kwargs["revision"] == "abc"
    assert calls["AutoConfig"][1]["trust_remote_code"] is expected
    assert calls["AutoTokenizer"][1]["trust_remote_code"] is expected


# ---------------------------------------------------------------- new students


def test_new_model_from_config(tokenizer):
    model = new_model_from_config(SMALL_LLAMA, len(tokenizer), torch.float32, seed=3)
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert embedding_rows(model) == len(tokenizer)
    again = new_model_from_config(SMALL_LLAMA, len(tokenizer), torch.float32, seed=3)
    other = new_model_from_config(SMALL_LLAMA, len(tokenizer), torch.float32, seed=4)
    weights = model.get_input_embeddings().weight
    assert torch.equal(weights, again.get_input_embeddings().weight)
    assert not torch.equal(weights, other.get_input_embeddings().weight)
    assert "model_type" in SMALL_LLAMA  # the caller's dict is not consumed


def test_new_model_keeps_a_larger_given_vocabulary(tokenizer):
    model = new_model_from_config({**SMALL_LLAMA, "vocab_size": len(tokenizer) + 64}, len(tokenizer), torch.float32, 0)
    assert embedding_rows(model) == len(tokenizer) + 64


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"hidden_size": 32}, "recipe key student.config: needs model_type"),
        ({"model_type": "no-such-model"}, "recipe key student.config.model_type: unknown model type 'no-such-model'"),
        ({**SMALL_LLAMA, "vocab_size": 100}, "recipe key student.config.vocab_size: 100 is smaller than"),
        ({**SMALL_LLAMA, "hidden_size": 30}, "recipe key student.config: "),
        ({**SMALL_LLAMA, "num_hidden_layers": "two"}, "recipe key student.config: "),
    ],
)
def test_new_model_config_errors(tokenizer, config, expected):
    message = _one_line_error(new_model_from_config, config, len(tokenizer), torch.float32, 0)
    assert message.startswith(expected)
    assert len(message) < 500


# ---------------------------------------------------------------- small helpers


def test_max_context():
    from transformers import GPT2Config

    assert max_context(llama_config(320)) == 256
    assert max_context(GPT2Config(n_positions=128)) == 128
    assert max_context(SimpleNamespace(seq_length=64)) == 64
    assert max_context(SimpleNamespace(max_position_embeddings=0, n_positions=32)) == 32
    assert max_context(SimpleNamespace(max_position_embeddings=None)) is None
    assert max_context(SimpleNamespace()) is None


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("meta")) == torch.float16
    assert resolve_dtype("auto", torch.device("meta")) == torch.float32


def test_saved_student_round_trips(tmp_path, tokenizer):
    folder = save_model(llama_config(len(tokenizer), hidden=16, layers=1), tokenizer, tmp_path / "s", seed=5)
    model = load_model(str(folder), "student", torch.float32)
    assert model.config.model_type == "llama" and has_tokenizer(str(folder))
    assert compare_tokenizers(tokenizer, load_tokenizer(str(folder), "student")) is None


def test_one_device_rule():
    from distill.errors import DistillError
    from distill.models import pick_device

    assert pick_device("auto") == pick_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(DistillError, match="training.device: 'gpu' is not a device"):
        pick_device("gpu", key="training.device")
    if not torch.cuda.is_available():
        with pytest.raises(DistillError, match="no GPU is visible"):
            pick_device("cuda:1", key="teacher.device")
