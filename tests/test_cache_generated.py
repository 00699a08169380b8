"""`distill cache` with cache.source=generated: the offline cache built from the top-k log-probs that
`distill generate` stored, without running the teacher. Checked against the teacher's own forward pass, the
sparse loss built by hand, bad files, verify, resume and training from it."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import helpers
from conftest import write_jsonl
from distill.cache.build import build_cache
from distill.cache.generated import _row_top_k, _TokenIds
from distill.cache.identity import teacher_hash
from distill.cache.reader import open_cache_for_training, read_manifest
from distill.cli import main
from distill.config import recipe_from_dict
from distill.data import collate, load_data, pad_id_of
from distill.errors import DistillError
from distill.generate.run import generate
from distill.losses.objective import Objective
from distill.losses.sparse import sparse_loss_sums, top_k_targets
from distill.models import load_model, load_tokenizer
from distill.train.loop import train
from helpers import QUIET

PROMPTS = [
    {"prompt": "def add(a, b):"},
    {"prompt": "the quick brown"},
    {"prompt": "for i in"},
    {"messages": [{"role": "user", "content": "hello teacher"}]},
    {"prompt": "import os\n"},
    {"prompt": "knowledge distillation trains"},
]


@pytest.fixture(scope="module")
def generated(tmp_path_factory, teacher_dir) -> Path:
    """Completions of the tiny teacher with its top-5 log-probs: 12 rows, some stopped by EOS, some by length."""
    folder = tmp_path_factory.mktemp("generated")
    prompts = write_jsonl(folder / "prompts.jsonl", PROMPTS)
    out = folder / "generated.jsonl"
    recipe = recipe_from_dict(
        {
            "teacher": {"path": str(teacher_dir), "dtype": "float32"},
            "generate": {
                "prompts": str(prompts),
                "output": str(out),
                "max_new_tokens": 8,
                "batch_size": 3,
                "samples_per_prompt": 2,
                "logprobs": 5,
            },
        }
    )
    generate(recipe, log=lambda _: None)
    return out


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return load_model(str(teacher_dir), "teacher", torch.float32).eval()


def recipe_dict(teacher_dir, student_dir, train_file: Path, tmp_path: Path, **sections) -> dict:
    defaults = {
        "student": {"tokenizer": str(teacher_dir)},
        "data": {"max_length": 64},
        "objective": {"fused": True},  # the recipe default; these tests were written without the shared fused=False
        "training": {"steps": 2, "save_every": 10, "eval_every": 10},
        "cache": {"dir": str(tmp_path / "cache"), "source": "generated", "shard_tokens": 20},
    }
    return helpers.recipe_dict(teacher_dir, student_dir, train_file, tmp_path / "run", defaults, **sections)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def teacher_log_probs(teacher, example, vocab: int) -> torch.Tensor:
    """log_softmax of the teacher's forward pass on the whole example, at its loss tokens: (n, V)."""
    with torch.no_grad():
        logits = teacher(torch.tensor([example.input_ids])).logits[0, :-1, :vocab]  # (T-1, V)
    counted = torch.tensor(example.loss_mask[1:])  # (T-1,) output i predicts token i+1
    return torch.log_softmax(logits.float(), dim=-1)[counted]  # (n, V)


# float16 keeps 11 significant bits: log-probs near -5.5 (a 320-token vocabulary) are stored to ±0.002, so its
# tolerance is relative (half a float16 step is 2^-12 of the value) on top of 1e-3.
@pytest.mark.parametrize(("precision", "atol", "rtol"), [("float32", 1e-4, 0.0), ("float16", 1e-3, 5e-4)])
def test_cached_top_k_and_rest_equal_the_teachers_forward_pass(
    tmp_path, teacher_dir, student_dir, generated, teacher, precision, atol, rtol
):
    recipe = recipe_from_dict(
        recipe_dict(teacher_dir, student_dir, generated, tmp_path, cache={"precision": precision})
    )
    root = build_cache(recipe, **QUIET)
    manifest = read_manifest(root)
    assert manifest["source"] == "generated" and manifest["top_k"] == 5 and len(manifest["shards"]) > 1
    assert manifest["top_k_arrays"] == ["ids", "log_probs", "log_rest"]
    identity = manifest["teacher"]
    assert identity["generated"]["sha256"] == hashlib.sha256(generated.read_bytes()).hexdigest()
    assert identity["generated"]["stored_top_k"] == 5
    assert identity["path"] == str(teacher_dir) and identity["hash"] == teacher_hash(str(teacher_dir))

    tokenizer = load_tokenizer(str(teacher_dir), "teacher")
    vocab = len(tokenizer)
    examples, held_out = load_data(recipe, tokenizer, log=lambda _: None)
    assert len(held_out) == 1  # the default split: examples are matched to their rows around the held-out one
    reader = open_cache_for_training(recipe, tokenizer, examples, vocab)
    checked = 0
    for j, example in enumerate(examples):
        reference = teacher_log_probs(teacher, example, vocab)  # (n, V)
        got = reader.example_targets(j)
        assert got.ids.shape == (example.loss_tokens, 5) and got.log_rest_half is None
        # (a) at every completion position: the teacher's 5 largest log-probs, at the ids they belong to
        torch.testing.assert_close(got.log_probs, reference.topk(5).values, atol=atol, rtol=rtol)
        torch.testing.assert_close(got.log_probs, reference.gather(-1, got.ids), atol=atol, rtol=rtol)
        # (b) the rest: log of the teacher's mass outside those ids
        rest = reference.scatter(-1, got.ids, -math.inf).logsumexp(-1)  # (n,)
        torch.testing.assert_close(got.log_rest, rest, atol=atol, rtol=rtol)
        checked += example.loss_tokens
    assert checked == manifest["data"]["loss_tokens"] > 40

    # (e) verify passes, on the function and on the command line
    assert main(["cache", "verify", str(root)]) == 0


def test_rest_mass_by_hand_fewer_kept_and_clamped(tokenizer):
    eos = 2
    row = {
        "completion_ids": [7, 8],
        "top_logprobs": [[[7, math.log(0.5)], [9, math.log(0.3)]], [[4, math.log(0.6)], [8, math.log(0.4)]]],
    }
    ids, mask = [1, 5, 7, 8], [False, False, True, True]
    to_id = _TokenIds(tokenizer)
    top, lp, rest, stored = _row_top_k(row, ids, mask, eos, to_id, None, 2)
    assert stored == 2 and top.tolist() == [[7, 9], [4, 8]]
    np.testing.assert_allclose(np.exp(rest), [0.2, 1e-6], rtol=1e-5)  # the second row has no rest: clamped
    # Keeping fewer than stored: the most probable first, the dropped ones' mass goes to the rest.
    top, lp, rest, _ = _row_top_k(row, ids, mask, eos, to_id, 2, 1)
    assert top.tolist() == [[7], [4]]
    np.testing.assert_allclose(np.exp(lp[:, 0]), [0.5, 0.6], rtol=1e-6)
    np.testing.assert_allclose(np.exp(rest), [0.5, 0.4], rtol=1e-5)


def test_training_from_the_cache_and_its_sparse_loss(tmp_path, teacher_dir, student_dir, generated, teacher):
    content = recipe_dict(teacher_dir, student_dir, generated, tmp_path, cache={"precision": "float32"})
    recipe = recipe_from_dict(content)
    root = build_cache(recipe, **QUIET)
    tokenizer = load_tokenizer(str(teacher_dir), "teacher")
    vocab = len(tokenizer)
    examples, _ = load_data(recipe, tokenizer, log=lambda _: None)

    # (c) the loss on a batch from the cache equals the sparse loss built from the teacher's logits' top 5
    indices = [0, 3, 5, 6]
    batch = collate([examples[i] for i in indices], pad_id_of(tokenizer))
    width = batch["labels"].shape[1]
    student = load_model(str(student_dir), "student", torch.float32).eval()
    with torch.no_grad():
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"].reshape(-1)  # (B·(T-1),)
    cached = open_cache_for_training(recipe, tokenizer, examples, vocab).targets(indices, width)
    by_hand = top_k_targets(t_logits.reshape(-1, t_logits.shape[-1]), 5, vocab)
    flat = s_logits.reshape(-1, s_logits.shape[-1])  # (B·(T-1), V')
    for temperature in (1.0, 2.0):
        objective = Objective(temperature=temperature)
        kd, ce = sparse_loss_sums(flat, cached, labels, objective, vocab_size=vocab)
        # The file has no log Σ √p of the tail: at τ ≠ 1 the cache assumes a flat tail, so compare with that.
        flat_tail = type(by_hand)(by_hand.ids, by_hand.log_probs, by_hand.log_rest, distinct=True)
        kd_ref, ce_ref = sparse_loss_sums(flat, flat_tail, labels, objective, vocab_size=vocab)
        torch.testing.assert_close(kd, kd_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ce, ce_ref)
        assert kd > 0

    # Training with only the cache: no teacher.path, the cache's tokenizer, the sparse (fused) path.
    cache_only = {**content, "teacher": {"cache": str(root)}, "student": {"path": str(student_dir)}}
    result = train(recipe_from_dict(cache_only, {"objective.fused": True}), **QUIET)
    assert result.summary["teacher_params"] is None
    events = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e.get("event") == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    # With teacher.path as well, it only serves to check the manifest: another teacher is refused.
    other = {
        **content,
        "teacher": {"cache": str(root), "path": str(student_dir)},
        "output": {"dir": str(tmp_path / "o")},
    }
    with pytest.raises(DistillError, match="different teacher"):
        train(recipe_from_dict(other), **QUIET)


def test_resume_gives_identical_shards_and_a_changed_file_is_refused(tmp_path, teacher_dir, student_dir, generated):
    content = recipe_dict(teacher_dir, student_dir, generated, tmp_path)
    root = build_cache(recipe_from_dict(content), **QUIET)
    manifest = read_manifest(root)
    first = {s["file"]: (root / s["file"]).read_bytes() for s in manifest["shards"]}
    # A build killed after the plan and some shards: the manifest and one shard are missing.
    (root / "manifest.json").rename(tmp_path / "manifest.json")
    (root / manifest["shards"][1]["file"]).unlink()
    assert build_cache(recipe_from_dict(content), **QUIET) == root
    assert {s["file"]: (root / s["file"]).read_bytes() for s in manifest["shards"]} == first
    assert read_manifest(root)["shards"] == manifest["shards"]

    changed = tmp_path / "changed.jsonl"
    rows = rows_of(generated)
    rows[0]["top_logprobs"][0][0][1] -= 0.5  # same tokens, other log-probs
    write_jsonl(changed, rows)
    with pytest.raises(DistillError, match="different generated file"):
        build_cache(recipe_from_dict(content, {"data.train": str(changed)}), **QUIET)


def _endpoint_row(tokenizer, completion: str, **fields) -> dict:
    """An endpoint-style row (no prompt_ids): its completion's canonical ids with made-up top-3 log-probs."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    # Runner-up tokens that are whole words, so their text names one vocabulary entry (a lone byte would not).
    words = tokenizer(" quick brown fox jumps", add_special_tokens=False)["input_ids"]
    top = []
    for i in ids:
        second, third = [w for w in words if w != i][:2]
        top.append([[i, math.log(0.5)], [second, math.log(0.2)], [third, math.log(0.1)]])
    row = {"prompt": "def add(a, b):", "completion": completion, "finish_reason": "length"}
    return {**row, "completion_ids": ids, "top_logprobs": top, **fields}


def _first_line(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r, t: r.pop("top_logprobs"), r"bad\.jsonl:2: it has no top_logprobs"),
        (lambda r, t: r["top_logprobs"].pop(), r"bad\.jsonl:2: top_logprobs has \d+ entries for \d+ completion tokens"),
        (lambda r, t: r["top_logprobs"][1].pop(), r"bad\.jsonl:2: completion token 1 has 2 top_logprobs, other.* 3"),
        # Split tokens (one per character, as strings: ids would be trained as they are) the text does not
        # re-tokenize to.
        (
            lambda r, t: (r.pop("completion_ids"), r.update(completion_tokens=list("hellow"))),
            r"bad\.jsonl:2: completion token 0 is .* in the file but id \d+ in the training example",
        ),
        # A completion that stopped without an EOS among its tokens: the loader's EOS has no log-probs.
        (
            lambda r, t: r.update(finish_reason="stop"),
            r"bad\.jsonl:2: .*EOS the data loader or chat template appends.*no stored",
        ),
        (lambda r, t: r["top_logprobs"][0].__setitem__(1, r["top_logprobs"][0][0]), r"token 0 repeats a token"),
        (lambda r, t: r["top_logprobs"][0].__setitem__(1, ["\ufffd", -2.0]), r"matches \d+ vocabulary entries \(ambig"),
        (lambda r, t: r["top_logprobs"][0].__setitem__(1, ["no such token", -2.0]), r"matches no vocabulary entry"),
    ],
)
def test_bad_generated_rows_are_one_line_errors(tmp_path, teacher_dir, student_dir, generated, change, message, capsys):
    tokenizer = load_tokenizer(str(teacher_dir), "teacher")
    bad = _endpoint_row(tokenizer, "hello world")
    assert len(bad["completion_ids"]) >= 2
    change(bad, tokenizer)
    good = _endpoint_row(tokenizer, "the lazy dog")
    path = write_jsonl(tmp_path / "bad.jsonl", [good, bad, good])
    content = recipe_dict(teacher_dir, student_dir, path, tmp_path, data={"eval": str(path)})
    with pytest.raises(DistillError, match=message):
        build_cache(recipe_from_dict(content), **QUIET)
    assert not (tmp_path / "cache" / "manifest.json").exists()
    # The command line: exit 2 and one line naming the row.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(content))
    assert main(["cache", str(recipe), "--quiet"]) == 2
    lines = _first_line(capsys)
    assert len(lines) == 1 and "bad.jsonl:2" in lines[0]


def test_endpoint_token_strings_are_converted_when_unambiguous(tmp_path, teacher_dir, student_dir):
    tokenizer = load_tokenizer(str(teacher_dir), "teacher")
    rows = [_endpoint_row(tokenizer, "the lazy dog"), _endpoint_row(tokenizer, "hello world")]
    as_strings = []
    for row in rows:
        strings = dict(row)
        # vLLM without token ids: each token as its text; the raw vocabulary form is accepted as well.
        strings["completion_tokens"] = [tokenizer.decode([i]) for i in strings.pop("completion_ids")]
        strings["top_logprobs"] = [
            [
                [tokenizer.convert_ids_to_tokens(i) if n % 2 else tokenizer.decode([i]), lp]
                for n, (i, lp) in enumerate(s)
            ]
            for s in row["top_logprobs"]
        ]
        as_strings.append(strings)
    with_ids = write_jsonl(tmp_path / "ids.jsonl", rows)
    with_strings = write_jsonl(tmp_path / "strings.jsonl", as_strings)
    built = {}
    for name, path in (("ids", with_ids), ("strings", with_strings)):
        content = recipe_dict(
            teacher_dir, student_dir, path, tmp_path, data={"eval": str(path)}, cache={"dir": str(tmp_path / name)}
        )
        recipe = recipe_from_dict(content)
        build_cache(recipe, **QUIET)
        examples, _ = load_data(recipe, tokenizer, log=lambda _: None)
        reader = open_cache_for_training(recipe, tokenizer, examples, len(tokenizer))
        built[name] = [reader.example_targets(j) for j in range(len(examples))]
    for a, b in zip(built["ids"], built["strings"], strict=True):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.log_probs, b.log_probs)
    # Stored as given: the first id of each token is the completion token itself with p = 0.5, rest 0.2.
    first = built["ids"][0]
    np.testing.assert_allclose(first.log_probs[:, 0].exp().numpy(), 0.5, rtol=1e-3)
    np.testing.assert_allclose(first.log_rest.exp().numpy(), 0.2, rtol=1e-3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"cache.representation": "both"}, "cache.representation"),
        ({"cache.tail_samples": 4}, "cache.tail_samples"),
        ({"data.packing": True}, "data.packing"),
    ],
)
def test_settings_a_generated_file_cannot_serve_are_refused(
    tmp_path, teacher_dir, student_dir, generated, override, message
):
    content = recipe_dict(teacher_dir, student_dir, generated, tmp_path)
    with pytest.raises(DistillError, match=message):
        build_cache(recipe_from_dict(content, override), **QUIET)


def test_a_cache_only_recipe_needs_a_tokenizer(tmp_path, teacher_dir, student_dir, generated):
    content = recipe_dict(teacher_dir, student_dir, generated, tmp_path)
    content["teacher"], content["student"] = {}, {"config": {"hidden_size": 32}}
    with pytest.raises(DistillError, match="needs the teacher's tokenizer"):
        build_cache(recipe_from_dict(content), **QUIET)
    # Without teacher.path the manifest names no teacher, and any teacher.path at training is unchecked.
    content["student"] = {"path": str(student_dir), "tokenizer": str(teacher_dir)}
    root = build_cache(recipe_from_dict(content), **QUIET)
    assert read_manifest(root)["teacher"]["hash"] is None and read_manifest(root)["teacher"]["path"] is None


def test_command_line_flow_generate_cache_train(tmp_path, teacher_dir, student_dir, generated):
    """The README's flow: a recipe for the teacher, `distill cache RECIPE cache.source=generated`, then
    `distill train RECIPE teacher.cache=DIR`."""
    content = recipe_dict(teacher_dir, student_dir, generated, tmp_path)
    content["cache"].pop("source")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(content))
    assert main(["cache", str(recipe), "cache.source=generated", "--quiet"]) == 0
    root = tmp_path / "cache"
    assert read_manifest(root)["source"] == "generated" and main(["cache", "verify", str(root)]) == 0
    assert main(["train", str(recipe), f"teacher.cache={root}", "--quiet"]) == 0
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
