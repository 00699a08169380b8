"""The one decoding function (`distill.sampling.decode`) and the special-token ids a student gets from its tokenizer.

Every sampler goes through `decode`: on-policy sampling, `distill generate` with a local teacher, exact-match
evaluation, the demo's line completion. Checked here against what a user's folders can do to them: embedding rows
past the tokenizer that a model prefers (a vocab rounded up, a student pruned from a padded teacher), and a
generation_config.json with its own sampling settings, which must never change what the recipe asked for.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, llama_config, save_model, write_jsonl
from distill.config import recipe_from_dict
from distill.data import Example, pad_id_of
from distill.generate.local import sample_completions as generate_completions
from distill.generate.run import generate
from distill.models import load_model, new_model_from_config
from distill.report.generation import exact_match
from distill.sampling import decode, eos_ids
from distill.train.onpolicy import OnPolicy, sample_completions

CPU = torch.device("cpu")
PADDED_ROWS = 16
PROMPTS = ["def add(a, b):", "the quick brown", "for i in range(", "hello world, hello"]


def quiet(_line: str) -> None:
    pass


def greedy_reference(model, prompt: list[int], steps: int, vocab: int, eos: set[int]) -> list[int]:
    """Plain greedy decoding with full forward passes over the tokenizer's ids only: the dense reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1, :vocab].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt) :]


# ---------------------------------------------------------------- ids past the tokenizer


@pytest.fixture(scope="module")
def padded_dir(tmp_path_factory, tokenizer) -> Path:
    """A Llama whose head has 16 rows past the tokenizer, and prefers them: row V + 2k is +1000·e_k and row
    V + 2k + 1 is -1000·e_k, so one of them scores 1000·|h_k| on any hidden state h, far above real logits."""
    folder = tmp_path_factory.mktemp("padded")
    vocab = len(tokenizer)
    save_model(llama_config(vocab + PADDED_ROWS, hidden=64), tokenizer, folder, seed=5)
    model = load_model(str(folder), "student", torch.float32)
    with torch.no_grad():
        head = model.lm_head.weight  # (V + 16, H)
        head[vocab:] = 0.0
        for j in range(PADDED_ROWS):
            head[vocab + j, j // 2] = 1000.0 if j % 2 == 0 else -1000.0
    model.save_pretrained(folder)
    return folder


def test_the_padded_model_prefers_padded_rows(padded_dir, tokenizer):
    """Guards the tests below: without the suppression this model's greedy choice is a padded id."""
    model = load_model(str(padded_dir), "student", torch.float32).eval()
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0]  # (P, V + 16)
    assert bool((logits.argmax(-1) >= len(tokenizer)).all())


def test_on_policy_samples_no_padded_ids(tmp_path, tokenizer, padded_dir):
    rows = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": p, "completion": " x"} for p in PROMPTS])
    recipe = recipe_from_dict(
        {
            "teacher": {"path": str(padded_dir)},
            "student": {"path": str(padded_dir)},
            "data": {"train": str(rows), "max_length": 40},
            "objective": {
                "divergence": "reverse_kl",
                "on_policy": {"lambda": 1.0, "max_new_tokens": 12, "temperature": 1.0},
            },
            "report": {"enabled": False},
            "output": {"dir": str(tmp_path / "run")},
        }
    )
    # Prompt/completion examples: the prompt is everything before the one loss token.
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    examples = [Example(ids + [5], [False] * len(ids) + [True]) for ids in prompt_ids]
    model = load_model(str(padded_dir), "student", torch.float32)
    sampled = OnPolicy(recipe, tokenizer, examples, CPU).examples(model, 0, 0, [examples])[0]
    vocab = len(tokenizer)
    for prompt, new in zip(prompt_ids, sampled, strict=True):
        completion = new.input_ids[len(prompt) :]
        assert completion and max(completion) < vocab
    # Greedy (temperature 0, used by callers of the sampler; the recipe asks for > 0) is the dense reference.
    eos = eos_ids(model, tokenizer)
    greedy = sample_completions(
        model,
        prompt_ids,
        [12] * 4,
        temperature=0.0,
        top_p=1.0,
        eos_ids=eos,
        pad_id=0,
        seed=0,
        device=CPU,
        vocab_size=vocab,
    )
    assert greedy == [greedy_reference(model, p, 12, vocab, set(eos)) for p in prompt_ids]


def test_distill_generate_writes_no_padded_ids(tmp_path, tokenizer, padded_dir):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    for temperature in (0.0, 1.0):
        out = tmp_path / f"gen-{temperature}.jsonl"
        recipe = recipe_from_dict(
            {
                "teacher": {"path": str(padded_dir)},
                "generate": {
                    "prompts": str(prompts),
                    "output": str(out),
                    "max_new_tokens": 10,
                    "temperature": temperature,
                    "logprobs": 3,
                },
                "training": {"device": "cpu"},
            }
        )
        generate(recipe, log=quiet, show_progress=False)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == len(PROMPTS)
        for row in rows:
            assert row["completion_ids"] and max(row["completion_ids"]) < len(tokenizer)
            assert all(i < len(tokenizer) for step in row["top_logprobs"] for i, _ in step)


def exact_match_reference(model, tokenizer, rows: list[dict], extra_tokens: int) -> list[str]:
    """The text `exact_match` must produce for each row: the dense greedy reference over the tokenizer's ids, as
    many tokens as its budget (the answer's token count + extra_tokens)."""
    eos = set(eos_ids(model, tokenizer))
    texts = []
    for row in rows:
        budget = len(tokenizer(row["answer"], add_special_tokens=False)["input_ids"]) + extra_tokens
        ids = greedy_reference(model, tokenizer(row["prompt"])["input_ids"], budget, len(tokenizer), eos)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return texts


ROWS = [{"prompt": p, "answer": "return a"} for p in PROMPTS]


def test_exact_match_never_decodes_padded_ids(tokenizer, padded_dir):
    model = load_model(str(padded_dir), "student", torch.float32).eval()
    result = exact_match(model, tokenizer, ROWS, max_length=64, extra_tokens=3)
    expected = exact_match_reference(model, tokenizer, ROWS, extra_tokens=3)
    assert [s["output"] for s in result["generation_samples"]] == expected
    assert all(expected)  # real ids decode to text; padded ones would decode to nothing


def test_speed_timing_never_feeds_padded_ids(tokenizer, padded_dir):
    from distill.report.speed import SpeedSettings, measure_speed

    model = load_model(str(padded_dir), "student", torch.float32)
    fed: list[torch.Tensor] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda _m, inputs, _out: fed.append(inputs[0]))
    try:
        measure_speed(model, len(tokenizer), SpeedSettings(runs=1, warmup=0, prompt_tokens=8, new_tokens=4))
    finally:
        hook.remove()
    assert len(fed) == 2 * (1 + 4)  # batches 1 and 8: a prefill and 4 decode steps each
    assert max(int(ids.max()) for ids in fed) < len(tokenizer)


# ---------------------------------------------------------------- a checkpoint's generation_config


# Settings a model folder may ship that are not the recipe's: each changes greedy or sampled output when it leaks.
DIRTY_GENERATION_CONFIG = {
    "repetition_penalty": 5.0,
    "no_repeat_ngram_size": 1,
    "do_sample": True,
    "top_k": 1,
    "temperature": 0.3,
    "min_new_tokens": 40,
    "max_new_tokens": 2,
}


@pytest.fixture(scope="module")
def clean_and_dirty(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """Two folders with the same weights; the second's generation_config.json has its own sampling settings."""
    clean = save_model(llama_config(len(tokenizer), hidden=64), tokenizer, tmp_path_factory.mktemp("clean"), seed=7)
    dirty = tmp_path_factory.mktemp("dirty") / "model"
    shutil.copytree(clean, dirty)
    config_file = dirty / "generation_config.json"
    settings = json.loads(config_file.read_text())
    settings.update(DIRTY_GENERATION_CONFIG)
    config_file.write_text(json.dumps(settings))
    return clean, dirty


def test_the_dirty_config_changes_plain_generate(clean_and_dirty, tokenizer):
    """Guards the tests below: left to transformers, the folder's settings change the greedy output."""
    clean, dirty = (load_model(str(f), "student", torch.float32).eval() for f in clean_and_dirty)
    prompt = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    with torch.no_grad():
        plain = clean.generate(input_ids=prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)
        leaked = dirty.generate(input_ids=prompt, do_sample=False, max_new_tokens=12, pad_token_id=0)
    assert plain.tolist() != leaked.tolist()


def test_exact_match_is_greedy_whatever_the_folder_says(clean_and_dirty, tokenizer):
    clean, dirty = (load_model(str(f), "student", torch.float32).eval() for f in clean_and_dirty)
    on_dirty = exact_match(dirty, tokenizer, ROWS, max_length=64, extra_tokens=6)
    assert [s["output"] for s in on_dirty["generation_samples"]] == exact_match_reference(clean, tokenizer, ROWS, 6)
    assert on_dirty == exact_match(clean, tokenizer, ROWS, max_length=64, extra_tokens=6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_and_on_policy_ignore_the_folder_settings(clean_and_dirty, tokenizer, temperature):
    clean, dirty = (load_model(str(f), "student", torch.float32).eval() for f in clean_and_dirty)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    common = dict(max_new_tokens=10, temperature=temperature, seed=11)
    from_dirty = generate_completions(dirty, tokenizer, prompts, **common)
    assert from_dirty == generate_completions(clean, tokenizer, prompts, **common)
    if temperature == 0:
        eos = set(eos_ids(clean, tokenizer))
        reference = [greedy_reference(clean, p, 10, len(tokenizer), eos) for p in prompts]
        assert [c[0].token_ids for c in from_dirty] == reference
    on_policy = dict(temperature=temperature, top_p=1.0, eos_ids=[tokenizer.eos_token_id], pad_id=0, seed=3, device=CPU)
    assert sample_completions(dirty, prompts, [10] * 4, **on_policy) == sample_completions(
        clean, prompts, [10] * 4, **on_policy
    )
    # The folder's settings are back on the model afterwards.
    assert dirty.generation_config.repetition_penalty == 5.0


def test_decode_leaves_the_rng_alone_and_repeats_with_a_seed(clean_and_dirty, tokenizer):
    model = load_model(str(clean_and_dirty[0]), "student", torch.float32).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    common = dict(max_new_tokens=8, eos_ids=[], pad_id=pad_id_of(tokenizer), vocab_size=len(tokenizer))
    before = torch.get_rng_state()
    a = decode(model, prompts, temperature=1.0, seed=5, **common).new_ids  # (B, S)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == (len(prompts), 8)  # no EOS given: every row runs to max_new_tokens
    assert torch.equal(decode(model, prompts, temperature=1.0, seed=5, **common).new_ids, a)
    assert not torch.equal(decode(model, prompts, temperature=1.0, seed=6, **common).new_ids, a)


# ---------------------------------------------------------------- special-token ids from the tokenizer


@pytest.fixture(scope="module")
def odd_tokenizer():
    """A tokenizer whose special ids are not Llama's 1/2/0: unk 0, eos 3, bos 4, pad 5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|unk|>", "<|a|>", "<|b|>", "<|eos|>", "<|bos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (4, 3, 5)
    return fast


SMALL_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
SPECIAL = {"bos_token_id": 4, "eos_token_id": 3, "pad_token_id": 5}


def _special_ids(config) -> dict:
    return {key: getattr(config, key, None) for key in SPECIAL}


def test_a_student_from_config_takes_the_tokenizers_special_ids(odd_tokenizer):
    model = new_model_from_config(SMALL_LLAMA, len(odd_tokenizer), torch.float32, 0, odd_tokenizer)
    assert _special_ids(model.config) == SPECIAL
    assert _special_ids(model.generation_config) == SPECIAL
    # Completions end at the tokenizer's EOS only, not at Llama's default id 2 (an ordinary token here).
    assert eos_ids(model, odd_tokenizer) == [3]


def test_ids_written_in_the_config_are_kept_and_the_tokenizers_eos_joins_them(odd_tokenizer):
    config = {**SMALL_LLAMA, "eos_token_id": [7, 8]}
    model = new_model_from_config(config, len(odd_tokenizer), torch.float32, 0, odd_tokenizer)
    assert model.config.eos_token_id == [7, 8] and model.config.bos_token_id == 4
    assert model.generation_config.eos_token_id == [7, 8, 3]
    assert eos_ids(model, odd_tokenizer) == [3, 7, 8]


def test_the_saved_student_names_the_tokenizers_ids(tmp_path, odd_tokenizer):
    """`distill train` with student.config (hard labels: no teacher needed) writes config.json and
    generation_config.json with the tokenizer's bos/eos/pad."""
    from distill.train.loop import train

    tokenizer_dir = tmp_path / "tokenizer"
    odd_tokenizer.save_pretrained(tokenizer_dir)
    rows = write_jsonl(tmp_path / "train.jsonl", [{"text": line} for line in CORPUS * 2])
    recipe = {
        "teacher": {},
        "student": {"config": SMALL_LLAMA, "tokenizer": str(tokenizer_dir)},
        "data": {"train": str(rows), "max_length": 32},
        "objective": {"kd_weight": 0.0, "ce_weight": 1.0, "fused": False},
        "training": {"steps": 1, "batch_size": 2, "save_every": 1, "eval_every": 100, "log_every": 1},
        "report": {"enabled": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = train(recipe_from_dict(recipe), show_progress=False, log=quiet)
    saved = result.student_dir
    assert _special_ids_of_file(saved / "config.json") == SPECIAL
    assert _special_ids_of_file(saved / "generation_config.json") == SPECIAL


def _special_ids_of_file(path: Path) -> dict:
    values = json.loads(path.read_text())
    return {key: values.get(key) for key in SPECIAL}


def test_a_pruned_student_keeps_the_teachers_special_ids(tmp_path, odd_tokenizer):
    """The pruned path starts from the teacher's config and generation config, which its tokenizer matches."""
    from distill.student.build import build_student

    teacher = save_model(llama_config(len(odd_tokenizer), hidden=64, layers=2), odd_tokenizer, tmp_path / "t")
    for name in ("config.json", "generation_config.json"):
        values = json.loads((teacher / name).read_text())
        (teacher / name).write_text(json.dumps({**values, **SPECIAL}))
    build_student(teacher, tmp_path / "student", layers=1, log=quiet)
    assert _special_ids_of_file(tmp_path / "student" / "config.json") == SPECIAL
    assert _special_ids_of_file(tmp_path / "student" / "generation_config.json") == SPECIAL
