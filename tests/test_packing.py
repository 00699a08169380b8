"""Packing does not leak: each packed document is computed as if alone, and no document is split across the
training and held-out sets."""

from __future__ import annotations

import pytest
import torch

from conftest import llama_config, qwen2_config, write_jsonl
from distill.config import recipe_from_dict
from distill.data import Example, build_examples, collate, forward_inputs, load_data, pack, pad_id_of
from distill.losses.heads import backbone_hidden_states
from distill.train.loop import train


def _documents(tokenizer, texts: list[str]) -> list[Example]:
    docs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        docs.append(Example(ids, [True] * len(ids)))
    return docs


TEXTS = ["the quick brown fox jumps", "def add(a, b):\n    return a + b", "hello world", "while True:\n    break"]


def test_pack_gives_each_document_its_own_positions_and_no_cross_document_target():
    docs = [Example([1, 2, 3], [True] * 3), Example([4, 5], [True, True]), Example([6, 7, 8, 9, 10], [True] * 5)]
    blocks = pack(docs, 6)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    assert [b.positions for b in blocks] == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3]]
    # Token 4 and token 6 start documents: the output before them belongs to another document.
    assert blocks[0].loss_mask == [False, True, True, False, True, False]
    # The piece of the third document that continues in block 2 starts a sequence of its own there.
    assert blocks[1].loss_mask == [True, True, True, True] and blocks[1].loss_tokens == 3
    batch = collate(blocks, pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["labels"].tolist() == [[2, 3, -100, 5, -100], [8, 9, 10, -100, -100]]


@pytest.mark.parametrize("make_config", [llama_config, qwen2_config], ids=["llama", "qwen2"])
def test_packed_documents_compute_exactly_as_alone(tokenizer, make_config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_config(len(tokenizer))).eval()
    docs = _documents(tokenizer, TEXTS)
    total = sum(len(d.input_ids) for d in docs)
    # Two blocks in one batch: three documents in the first, the last alone in a shorter (right-padded) second.
    first = sum(len(d.input_ids) for d in docs[:3])
    blocks = pack(docs, first)
    assert len(blocks) == 2 and len(blocks[1].input_ids) == total - first
    batch = collate(blocks, pad_id_of(tokenizer))
    with torch.no_grad():
        logits = model(**forward_inputs(batch)).logits  # (2, T, V)
        hidden = backbone_hidden_states(model, **forward_inputs(batch))  # (2, T, H): the fused path's input
    starts = [(0, 0), (0, len(docs[0].input_ids)), (0, len(docs[0].input_ids) + len(docs[1].input_ids)), (1, 0)]
    for doc, (row, start) in zip(docs, starts, strict=True):
        alone = torch.tensor([doc.input_ids])
        with torch.no_grad():
            expected = model(input_ids=alone).logits[0]  # (n, V)
            expected_hidden = backbone_hidden_states(model, alone)[0]  # (n, H)
        n = len(doc.input_ids)
        torch.testing.assert_close(logits[row, start : start + n], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(hidden[row, start : start + n], expected_hidden, atol=1e-5, rtol=1e-4)
    # The batch's targets are exactly each document's own targets (its first token predicted by nothing).
    expected_targets = sum(len(d.input_ids) - 1 for d in docs)
    assert int((batch["labels"] != -100).sum()) == expected_targets == sum(b.loss_tokens for b in blocks)


def _recipe(teacher_dir, student_dir, train_file, tmp_path, **data):
    return recipe_from_dict(
        {
            "teacher": {"path": str(teacher_dir)},
            "student": {"path": str(student_dir)},
            "data": {"train": str(train_file), "max_length": 16, "packing": True, "eval_fraction": 0.25, **data},
            "training": {"steps": 2, "batch_size": 2, "save_every": 10, "eval_every": 10, "log_every": 1},
            "report": {"enabled": False},
            "output": {"dir": str(tmp_path / "run")},
        }
    )


def test_held_out_rows_are_chosen_before_packing(tmp_path, tokenizer, teacher_dir, student_dir):
    # Rows longer than a block, so packing after the split would cut documents across the two sets.
    rows = [{"text": f"{i}: {TEXTS[i % len(TEXTS)]} and the lazy dog {i}"} for i in range(16)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    recipe = _recipe(teacher_dir, student_dir, path, tmp_path)
    train_blocks, held_out = load_data(recipe, tokenizer, log=lambda _: None)
    documents, _ = build_examples(path, tokenizer, max_length=10_000)  # whole rows
    assert len(documents) == 16 and max(len(d.input_ids) for d in documents) > 16
    # Every held-out example is one whole row (cut to max_length, as data.eval rows are) ...
    held = []
    for e in held_out:
        matches = [i for i, d in enumerate(documents) if d.input_ids[:16] == e.input_ids]
        assert len(matches) == 1, "a held-out example is not the start of exactly one row"
        held.append(matches[0])
        assert e.positions is None and e.loss_mask == documents[matches[0]].loss_mask[:16]
    assert len(held) == 4
    # ... and the training blocks are exactly the other rows, packed: no token of a held-out row trains.
    stream = [t for i, d in enumerate(documents) if i not in held for t in d.input_ids]
    assert [t for b in train_blocks for t in b.input_ids] == stream
    assert all(b.positions is not None for b in train_blocks)


@pytest.mark.slow  # two whole training runs and a cache build: ~25 s on 2 cores
def test_packed_cache_trains_as_online(tmp_path, tokenizer, teacher_dir, student_dir, train_file):
    """k = V − 1 in float32: a cache built from packed blocks (teacher forward with per-document positions) trains
    the student as online distillation on the same blocks does, fused or not."""
    from safetensors.torch import load_file

    from distill.cache.build import build_cache

    content = _recipe(teacher_dir, student_dir, train_file, tmp_path, max_length=32).model_dump(by_alias=True)
    content["cache"] = {"dir": str(tmp_path / "cache"), "top_k": len(tokenizer) - 1, "precision": "float32"}
    content["training"]["lr"] = 5e-3
    build_cache(recipe_from_dict(content), log=lambda _: None, show_progress=False)
    weights = {}
    for name, teacher, fused in (
        ("online", {"path": str(teacher_dir)}, False),
        ("cached", {"cache": str(tmp_path / "cache"), "path": str(teacher_dir)}, True),
    ):
        recipe = recipe_from_dict(
            {**content, "teacher": teacher}, {"objective.fused": fused, "output.dir": str(tmp_path / name)}
        )
        result = train(recipe, log=lambda _: None, show_progress=False)
        weights[name] = load_file(str(result.student_dir / "model.safetensors"))
    start = load_file(str(student_dir / "model.safetensors"))
    for key in start:
        moved, reference = weights["cached"][key] - start[key], weights["online"][key] - start[key]
        # Adam turns float32 rounding into visible updates where the gradient is near zero (as in test_cache).
        torch.testing.assert_close(moved, reference, rtol=1e-3, atol=5e-5)
    assert any(not torch.equal(weights["online"][k], start[k]) for k in start)
