"""Rows -> token sequences with loss masks -> batches: row formats, file formats, bad rows, packing, order."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from distill.data import (
    Example,
    build_examples,
    collate,
    encode_row,
    epoch_order,
    iter_batches,
    pack,
    pad_id_of,
    read_rows,
    split_eval,
    step_example_indices,
)
from distill.errors import DistillError


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _spans(ids: list[int], mask: list[bool]) -> list[list[int]]:
    """Runs of consecutive masked tokens."""
    runs, current = [], []
    for token, counts in zip(ids, mask, strict=True):
        if counts:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def _texts(rows) -> list[str]:
    return [row["text"] for _, row in rows]


# ---------------------------------------------------------------- row formats


def test_text_row_counts_every_token_and_ends_with_eos(tokenizer):
    ids, mask = encode_row({"text": "hello world"}, tokenizer)
    assert ids == _ids(tokenizer, "hello world") + [tokenizer.eos_token_id]
    assert mask == [True] * len(ids)


def test_text_row_already_ending_with_eos_gets_no_second_one(tokenizer):
    ids, _ = encode_row({"text": "hello world<|eos|>"}, tokenizer)
    assert ids == _ids(tokenizer, "hello world") + [tokenizer.eos_token_id]


def test_prompt_completion_counts_only_the_completion_and_eos(tokenizer):
    prompt, completion = "def add(a, b):", "\n    return a + b\n"
    ids, mask = encode_row({"prompt": prompt, "completion": completion}, tokenizer)
    n_prompt = len(_ids(tokenizer, prompt))
    assert len(ids) == len(mask)
    assert mask[:n_prompt] == [False] * n_prompt
    assert mask[n_prompt:] == [True] * (len(ids) - n_prompt)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:n_prompt]) == prompt
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == completion + "<|eos|>"


def test_completion_cut_by_a_length_limit_gets_no_eos(tokenizer):
    row = {"prompt": "def add(a, b):", "completion": "\n    return a", "finish_reason": "length"}
    ids, mask = encode_row(row, tokenizer)
    assert ids[-1] != tokenizer.eos_token_id
    assert tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m]) == "\n    return a"
    finished, _ = encode_row({**row, "finish_reason": "stop"}, tokenizer)
    assert finished == ids + [tokenizer.eos_token_id]


def test_empty_completion_still_teaches_eos(tokenizer):
    ids, mask = encode_row({"prompt": "hello", "completion": ""}, tokenizer)
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] and sum(mask) == 1


def test_messages_count_exactly_the_assistant_turns(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "the quick brown fox"},
        {"role": "user", "content": "for i in range(10):"},
        {"role": "assistant", "content": "print(i * i)"},
    ]
    ids, mask = encode_row({"messages": messages}, tokenizer)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == _ids(tokenizer, rendered)
    spans = [tokenizer.decode(span) for span in _spans(ids, mask)]
    # The template puts a space after "assistant:"; byte-level BPE glues it to the reply's first token,
    # which must count: it is the first thing the model has to say.
    assert spans == [" the quick brown fox<|eos|>", " print(i * i)<|eos|>"]
    not_counted = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert "hello world" in not_counted and "be brief" in not_counted and "range(10)" in not_counted
    assert "quick" not in not_counted and "print" not in not_counted
    # The generation prompt itself is context, not a target.
    assert not_counted.count("<|bos|>assistant:") == 2


def test_messages_with_a_single_token_reply(tokenizer):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "x"}]
    ids, mask = encode_row({"messages": messages}, tokenizer)
    # " x" is not a token of the fixture's vocabulary, so the template's space stays with the prompt here.
    assert [tokenizer.decode(span) for span in _spans(ids, mask)] == ["x<|eos|>"]


def test_messages_need_a_chat_template(tokenizer):
    bare = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|eos|>")
    with pytest.raises(ValueError, match="chat template"):
        encode_row({"messages": [{"role": "user", "content": "hi"}]}, bare)
    with pytest.raises(ValueError, match="messages"):
        encode_row({"messages": "hi"}, tokenizer)
    with pytest.raises(ValueError, match="messages"):
        encode_row({"messages": [{"content": "hi"}]}, tokenizer)


def test_input_ids_without_mask_count_everything(tokenizer):
    assert encode_row({"input_ids": [5, 6, 7]}, tokenizer) == ([5, 6, 7], [True, True, True])


def test_input_ids_with_mask_keep_it(tokenizer):
    row = {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, False, True]}
    assert encode_row(row, tokenizer) == ([5, 6, 7, 8], [False, True, False, True])


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"input_ids": [1, -1]}, "outside the vocabulary"),
        ({"input_ids": [1, 320]}, "outside the vocabulary"),
        ({"input_ids": [1, 2.0]}, "list of integers"),
        ({"input_ids": [1, True]}, "list of integers"),
        ({"input_ids": "1 2 3"}, "list of integers"),
        ({"input_ids": 5}, "list of integers"),
        ({"input_ids": [1, 2], "loss_mask": [1]}, "as long as"),
        ({"text": 5}, '"text" must be a string'),
        ({"prompt": "a"}, "both be strings"),
        ({"prompt": "a", "completion": 3}, "both be strings"),
        ({"content": "a"}, "a row needs"),
        ({}, "a row needs"),
    ],
)
def test_malformed_rows_raise_value_error(tokenizer, row, match):
    assert len(tokenizer) == 320  # the ids above assume the fixture's vocabulary
    with pytest.raises(ValueError, match=match):
        encode_row(row, tokenizer)


@pytest.mark.parametrize("row", [["text"], "hello", 3, None])
def test_rows_must_be_objects(tokenizer, row):
    with pytest.raises(ValueError, match="expected an object"):
        encode_row(row, tokenizer)


def test_missing_columns_of_columnar_files_are_ignored(tokenizer):
    # Parquet and datasets give every row every column, None where the row has no value.
    row = {"text": None, "prompt": "hello", "completion": " world", "input_ids": None, "messages": None}
    assert encode_row(row, tokenizer) == encode_row({"prompt": "hello", "completion": " world"}, tokenizer)


# ---------------------------------------------------------------- file formats


def test_jsonl_rows_name_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n', encoding="utf-8")
    rows = list(read_rows(path))
    assert [where for where, _ in rows] == [f"{path}:1", f"{path}:3"]
    assert _texts(rows) == ["a", "b"]


@pytest.mark.parametrize(
    "content",
    [
        json.dumps([{"text": "a"}, {"text": "b"}]),
        json.dumps({"data": [{"text": "a"}, {"text": "b"}], "version": 1}),
        '{"text": "a"}\n{"text": "b"}\n',
        json.dumps([{"text": "a"}, {"text": "b"}], indent=2),
    ],
    ids=["list", "data-key", "json-lines", "indented"],
)
def test_json_layouts(tmp_path, content):
    path = tmp_path / "rows.json"
    path.write_text(content, encoding="utf-8")
    assert _texts(read_rows(path)) == ["a", "b"]


def test_invalid_json_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n{"text": "a"},\n{"text": \n]\n', encoding="utf-8")
    with pytest.raises(DistillError, match=rf"{path.name}: not valid JSON .*line 4"):
        list(read_rows(path))
    path.write_text('{"text": "a"}', encoding="utf-8")
    with pytest.raises(DistillError, match="expected a JSON list of rows"):
        list(read_rows(path))


def test_csv_rows(tmp_path, tokenizer):
    path = tmp_path / "rows.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["def add(a, b):", "\n    return a + b\n"])
        writer.writerow(["hello, world", "hi"])
    rows = list(read_rows(path))
    assert [where for where, _ in rows] == [f"{path}:2", f"{path}:3"]
    assert rows[0][1] == {"prompt": "def add(a, b):", "completion": "\n    return a + b\n"}
    assert rows[1][1]["prompt"] == "hello, world"
    examples, stats = build_examples(path, tokenizer, max_length=64)
    assert stats.rows == 2 and len(examples) == 2


def test_parquet_rows(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    rows = [{"input_ids": [5, 6, 7], "loss_mask": [True, False, True]}, {"input_ids": [8, 9], "loss_mask": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [row for _, row in read_rows(path)] == rows
    examples, _ = build_examples(path, tokenizer, max_length=64)
    assert [(e.input_ids, e.loss_mask) for e in examples] == [([5, 6, 7], [True, False, True]), ([8, 9], [True, True])]


def test_parquet_with_mixed_row_formats(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    schema = pa.schema([("text", pa.string()), ("prompt", pa.string()), ("completion", pa.string())])
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "hello"}, {"prompt": "a", "completion": " b"}], schema=schema), path)
    examples, stats = build_examples(path, tokenizer, max_length=64)
    assert stats.bad_rows == 0 and len(examples) == 2
    assert examples[1].loss_mask[0] is False


def test_text_file_is_one_document(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n\nthird\n", encoding="utf-8")
    rows = list(read_rows(path))
    assert rows == [(str(path), {"text": "first line\nsecond line\n\nthird\n"})]
    examples, _ = build_examples(path, tokenizer, max_length=256)
    assert len(examples) == 1 and all(examples[0].loss_mask)


def test_folder_of_mixed_files(tmp_path, tokenizer):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "a.jsonl", [{"text": "from jsonl 1"}, {"text": "from jsonl 2"}])
    (tmp_path / "b.json").write_text(json.dumps([{"text": "from json"}]), encoding="utf-8")
    (tmp_path / "c.csv").write_text("text\nfrom csv\n", encoding="utf-8")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "d.txt").write_text("from txt", encoding="utf-8")
    (tmp_path / "nested" / "E.PY").write_text("print('from py')", encoding="utf-8")
    pq.write_table(pa.Table.from_pylist([{"text": "from parquet"}]), tmp_path / "nested" / "f.parquet")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    (tmp_path / "README").write_text("no suffix", encoding="utf-8")
    texts = _texts(read_rows(tmp_path))
    assert Counter(texts) == Counter(
        ["from jsonl 1", "from jsonl 2", "from json", "from csv", "from txt", "print('from py')", "from parquet"]
    )
    examples, stats = build_examples(tmp_path, tokenizer, max_length=64)
    assert stats.rows == 7 and len(examples) == 7


def test_glob_pattern_picks_files_of_a_folder_that_holds_other_json(tmp_path):
    # The quick start trains on a package's code; the package also holds JSON configs that are not rows,
    # and reading the whole folder stopped at the first of them.
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("a = 1", encoding="utf-8")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("b = 2", encoding="utf-8")
    (tmp_path / "pkg" / "sub" / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    with pytest.raises(DistillError, match="config.json"):
        list(read_rows(tmp_path / "pkg"))
    assert _texts(read_rows(f"{tmp_path}/pkg/**/*.py")) == ["a = 1", "b = 2"]
    with pytest.raises(DistillError, match="matches no files"):
        list(read_rows(f"{tmp_path}/pkg/**/*.rst"))


def test_quickstart_recipes_read_their_data():
    from distill.config import load_recipe
    from distill.data.files import read_rows as rows_of

    root = Path(__file__).resolve().parents[1] / "examples" / "quickstart"
    for name in ("teacher.yaml", "student.yaml"):
        recipe = load_recipe(root / name)
        assert sum(1 for _ in rows_of(recipe.data.train)) > 20


def test_empty_folder_and_missing_file(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"x")
    with pytest.raises(DistillError, match="holds no"):
        list(read_rows(tmp_path))
    with pytest.raises(DistillError, match="does not exist"):
        list(read_rows(tmp_path / "missing.jsonl"))
    with pytest.raises(DistillError, match="does not exist"):
        list(read_rows("./missing-folder"))


def test_datasets_save_to_disk_folders(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    single = tmp_path / "single"
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(single))
    assert _texts(read_rows(single)) == ["a", "b"]

    splits = tmp_path / "splits"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list([{"prompt": "p", "completion": " c"}] * 3),
            "validation": datasets.Dataset.from_list([{"text": "v"}]),
        }
    ).save_to_disk(str(splits))
    assert len(list(read_rows(splits, "train"))) == 3
    assert _texts(read_rows(splits, "validation")) == ["v"]
    with pytest.raises(DistillError, match="no split 'test'"):
        list(read_rows(splits, "test"))
    examples, stats = build_examples(splits, tokenizer, max_length=32, split="train")
    assert stats.rows == 3 and len(examples) == 3


def test_bad_row_in_a_dataset_names_the_dataset(tmp_path, tokenizer):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"text": "a"}, {"text": None}]).save_to_disk(str(folder))
    with pytest.raises(DistillError, match=rf"bad row at {folder} row 2"):
        build_examples(folder, tokenizer, max_length=32)


# ---------------------------------------------------------------- bad rows, empty rows, truncation


def test_malformed_jsonl_row_stops_with_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": oops}\n{"text": "c"}\n', encoding="utf-8")
    with pytest.raises(DistillError) as info:
        build_examples(path, tokenizer, max_length=32)
    message = str(info.value)
    assert f"{path}:4" in message and "not valid JSON" in message and "skip_bad_rows" in message
    assert "\n" not in message


def test_row_of_the_wrong_shape_stops_with_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"txt": "b"}])
    with pytest.raises(DistillError, match=rf"bad row at {path}:2: a row needs"):
        build_examples(path, tokenizer, max_length=32)
    json_path = tmp_path / "rows.json"
    json_path.write_text(json.dumps([{"text": "a"}, {"text": "b"}, ["c"]]), encoding="utf-8")
    with pytest.raises(DistillError, match=r"rows\.json\[3\]: expected an object"):
        build_examples(json_path, tokenizer, max_length=32)


def test_skip_bad_rows_counts_them(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    lines = ['{"text": "a"}', "{not json", '{"txt": "b"}', '{"input_ids": [1, 99999]}', '{"text": "c"}']
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    examples, stats = build_examples(path, tokenizer, max_length=32, skip_bad_rows=True)
    assert (stats.rows, stats.bad_rows, stats.examples, len(examples)) == (5, 3, 2, 2)
    assert [m.split(": ")[0] for m in stats.bad_row_messages] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_rows_with_nothing_to_learn_are_skipped_and_counted(tmp_path, tokenizer):
    rows = [
        {"text": "hello world"},
        # The prompt fills max_length: nothing of the completion is left after truncation.
        {"prompt": "knowledge distillation trains a small student", "completion": " ok"},
        {"input_ids": [5, 6, 7], "loss_mask": [False, False, False]},
        # Only token 0 is marked, and token 0 is never predicted.
        {"input_ids": [5, 6, 7], "loss_mask": [True, False, False]},
        {"input_ids": []},
    ]
    assert len(_ids(tokenizer, rows[1]["prompt"])) > 8
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    examples, stats = build_examples(path, tokenizer, max_length=8)
    assert (stats.rows, stats.empty_rows, stats.examples) == (5, 4, 1)
    assert stats.loss_tokens == examples[0].loss_tokens == len(examples[0].input_ids) - 1


def test_truncation_to_max_length(tmp_path, tokenizer):
    long_text = "the quick brown fox jumps over the lazy dog " * 5
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": long_text}, {"text": "hi"}])
    examples, stats = build_examples(path, tokenizer, max_length=10)
    full = _ids(tokenizer, long_text)
    assert examples[0].input_ids == full[:10] and len(examples[0].loss_mask) == 10
    assert stats.truncated_rows == 1
    assert all(len(e.input_ids) <= 10 for e in examples)
    assert stats.loss_tokens == sum(e.loss_tokens for e in examples)


def test_loss_tokens_skip_the_first_token():
    assert Example([1, 2, 3], [True, True, True]).loss_tokens == 2
    assert Example([1, 2, 3], [False, True, False]).loss_tokens == 1


# ---------------------------------------------------------------- packing


def test_pack_cuts_the_stream_into_blocks_and_carries_masks():
    examples = [
        Example([1, 2, 3, 4, 5], [False, False, True, True, True]),
        Example([6, 7, 8], [True, True, True]),
        Example([9, 10, 11, 12], [False, True, False, True]),
    ]
    blocks = pack(examples, 4)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    # Masks travel with their tokens, except a document's first token (6, 9): the output before it belongs to
    # another document, so it is never a target.
    assert [b.loss_mask for b in blocks] == [
        [False, False, True, True],
        [True, False, True, True],
        [False, True, False, True],
    ]
    assert [b.positions for b in blocks] == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 2, 3]]


def test_pack_keeps_a_short_last_block_and_drops_blocks_without_targets():
    examples = [Example([1, 2, 3], [True] * 3), Example([4, 5, 6, 7], [False] * 4), Example([8, 9, 10, 11], [True] * 4)]
    blocks = pack(examples, 3)
    # Block [4, 5, 6] has no targets; [10, 11] is the short remainder with one target.
    assert [b.input_ids for b in blocks] == [[1, 2, 3], [7, 8, 9], [10, 11]]
    assert blocks[1].loss_mask == [False, False, True] and blocks[-1].loss_mask == [True, True]


def test_build_examples_with_packing(tmp_path, tokenizer, text_rows):
    path = write_jsonl(tmp_path / "rows.jsonl", text_rows)
    plain, _ = build_examples(path, tokenizer, max_length=512)
    packed, stats = build_examples(path, tokenizer, max_length=16, packing=True)
    assert all(len(b.input_ids) == 16 for b in packed[:-1]) and 0 < len(packed[-1].input_ids) <= 16
    stream = [t for e in plain for t in e.input_ids]
    assert [t for b in packed for t in b.input_ids] == stream
    assert stats.truncated_rows == 0 and stats.examples == len(packed)
    assert stats.loss_tokens == sum(b.loss_tokens for b in packed)


# ---------------------------------------------------------------- evaluation split


def _numbered(n: int) -> list[Example]:
    return [Example([i, i + 1], [True, True]) for i in range(n)]


def test_split_eval_is_deterministic_and_disjoint():
    examples = _numbered(100)
    train, held = split_eval(examples, fraction=0.1, max_rows=256, seed=3)
    again_train, again_held = split_eval(examples, fraction=0.1, max_rows=256, seed=3)
    assert [e.input_ids for e in held] == [e.input_ids for e in again_held]
    assert [e.input_ids for e in train] == [e.input_ids for e in again_train]
    assert len(held) == 10 and len(train) == 90
    train_ids = {id(e) for e in train}
    held_ids = {id(e) for e in held}
    assert not train_ids & held_ids and train_ids | held_ids == {id(e) for e in examples}
    _, other = split_eval(examples, fraction=0.1, max_rows=256, seed=4)
    assert [e.input_ids for e in other] != [e.input_ids for e in held]


def test_split_eval_limits():
    train, held = split_eval(_numbered(100), fraction=0.5, max_rows=7, seed=0)
    assert (len(train), len(held)) == (93, 7)
    train, held = split_eval(_numbered(2), fraction=0.01, max_rows=7, seed=0)
    assert (len(train), len(held)) == (1, 1)
    train, held = split_eval(_numbered(3), fraction=0.99, max_rows=7, seed=0)
    assert (len(train), len(held)) == (1, 2)
    with pytest.raises(DistillError, match="data.eval"):
        split_eval(_numbered(1), fraction=0.5, max_rows=7, seed=0)


# ---------------------------------------------------------------- batches


def test_collate_shapes_and_labels(tokenizer):
    examples = [
        Example(*encode_row({"prompt": "def add(a, b):", "completion": " return a + b"}, tokenizer)),
        Example(*encode_row({"text": "hi"}, tokenizer)),
        Example([5, 6, 7], [True, False, True]),
    ]
    pad = pad_id_of(tokenizer)
    batch = collate(examples, pad)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == (3, width) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (3, width) and batch["attention_mask"].dtype == torch.long
    assert batch["labels"].shape == (3, width - 1) and batch["labels"].dtype == torch.long
    input_ids, labels = batch["input_ids"], batch["labels"]
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        assert input_ids[b, :n].tolist() == e.input_ids and (input_ids[b, n:] == pad).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        for i in range(width - 1):
            counted = i + 1 < n and e.loss_mask[i + 1]
            assert labels[b, i].item() == (input_ids[b, i + 1].item() if counted else -100)
    # Prompt targets and padding are ignored; the count of targets is the examples' loss tokens.
    assert (labels != -100).sum().item() == sum(e.loss_tokens for e in examples)
    n_prompt = len(_ids(tokenizer, "def add(a, b):"))
    assert (labels[0, : n_prompt - 1] == -100).all() and labels[0, n_prompt - 1] != -100
    assert labels[2].tolist()[:2] == [-100, 7]


def test_iter_batches_covers_every_example_in_order():
    examples = _numbered(7)
    batches = list(iter_batches(examples, batch_size=3, pad_id=0))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert torch.cat([b["input_ids"][:, 0] for b in batches]).tolist() == list(range(7))


def test_pad_id_falls_back_to_eos(tokenizer):
    assert pad_id_of(tokenizer) == tokenizer.pad_token_id == 0

    class NoPad:
        pad_token_id = None
        eos_token_id = 2

    assert pad_id_of(NoPad()) == 2


# ---------------------------------------------------------------- data order


@pytest.mark.parametrize(("num_examples", "batch_size"), [(12, 4), (12, 12), (10, 3), (10, 4), (7, 10), (5, 1)])
def test_steps_cover_each_example_once_per_epoch(num_examples, batch_size):
    epochs = 3
    steps = -(-epochs * num_examples // batch_size)
    stream = [i for step in range(steps) for i in step_example_indices(num_examples, 0, step, batch_size)]
    assert all(len(step_example_indices(num_examples, 0, s, batch_size)) == batch_size for s in range(steps))
    for epoch in range(epochs):
        window = stream[epoch * num_examples : (epoch + 1) * num_examples]
        assert sorted(window) == list(range(num_examples)), f"epoch {epoch}"
        assert window == epoch_order(num_examples, 0, epoch)


def test_step_indices_are_deterministic_and_seeded():
    first = [step_example_indices(50, 7, step, 8) for step in range(20)]
    assert first == [step_example_indices(50, 7, step, 8) for step in range(20)]
    assert first != [step_example_indices(50, 8, step, 8) for step in range(20)]


def test_epochs_are_shuffled_differently():
    orders = [epoch_order(50, 0, epoch) for epoch in range(4)]
    assert all(sorted(order) == list(range(50)) for order in orders)
    assert len({tuple(order) for order in orders}) == 4
    assert orders[0] != list(range(50))
    assert epoch_order(50, 1, 0) != orders[0]


def test_train_file_fixture_builds(train_file, tokenizer):
    examples, stats = build_examples(train_file, tokenizer, max_length=64)
    assert stats.rows == 48 == len(examples) and stats.bad_rows == stats.empty_rows == 0
    assert Path(train_file).suffix == ".jsonl"


# ---------------------------------------------------------------- generated rows with token ids


def test_generated_row_with_ids_uses_them_not_the_text(tokenizer):
    eos = tokenizer.eos_token_id
    # Ids no tokenizer would produce from the text (a split BPE token), and text that disagrees with them:
    # the ids win, because they are what the teacher saw and what its stored log-probs belong to.
    prompt_ids, completion_ids = [1, 40, 41], [50, 51, 52]
    row = {"prompt": "unused", "completion": "unused", "prompt_ids": prompt_ids, "completion_ids": completion_ids}
    ids, mask = encode_row({**row, "finish_reason": "stop"}, tokenizer)
    assert ids == prompt_ids + completion_ids + [eos]
    assert mask == [False] * 3 + [True] * 4
    # Cut by the length limit: no EOS to learn. Already ending with EOS: none added twice.
    ids, mask = encode_row({**row, "finish_reason": "length"}, tokenizer)
    assert ids == prompt_ids + completion_ids and mask == [False] * 3 + [True] * 3
    ids, _ = encode_row({**row, "completion_ids": [50, eos], "finish_reason": "stop"}, tokenizer)
    assert ids == prompt_ids + [50, eos]
    # Chat rows of a local teacher carry the ids too; the chat template is not applied again.
    chat = {"messages": [{"role": "user", "content": "hi"}], "prompt_ids": [1, 7], "completion_ids": [9, eos]}
    assert encode_row(chat, tokenizer) == ([1, 7, 9, eos], [False, False, True, True])


def test_endpoint_rows_with_completion_ids_train_those_ids(tokenizer):
    # An endpoint gives the completion's ids but not the prompt's: the prompt is tokenized as the server does, and
    # the ids the teacher wrote win over a text that re-tokenizes otherwise (their log-probs belong to them).
    row = {
        "prompt": "def add(a, b):",
        "completion": "\n    return a",
        "completion_ids": [5, 6],
        "finish_reason": "stop",
    }
    prompt_ids = tokenizer(row["prompt"])["input_ids"]
    n = len(prompt_ids)
    assert encode_row(row, tokenizer) == (prompt_ids + [5, 6, 2], [False] * n + [True] * 3)
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    chat |= {"completion_ids": [5, 6], "finish_reason": "length"}
    generation_prompt = tokenizer.apply_chat_template(chat["messages"][:1], tokenize=False, add_generation_prompt=True)
    context = tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]
    assert encode_row(chat, tokenizer) == (context + [5, 6], [False] * len(context) + [True, True])
    with pytest.raises(ValueError, match="last, assistant, message"):
        encode_row({**chat, "messages": chat["messages"][:1]}, tokenizer)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("prompt_ids", "1 2", '"prompt_ids" must be a list of integers'),
        ("completion_ids", [1, 2.5], '"completion_ids" must be a list of integers'),
        ("completion_ids", [1, 100000], '"completion_ids" has ids outside the vocabulary'),
        ("prompt_ids", [-1], '"prompt_ids" has ids outside the vocabulary'),
    ],
)
def test_generated_row_with_bad_ids_is_a_bad_row(tokenizer, field, value, message):
    row = {"prompt": "a", "completion": "b", "prompt_ids": [1, 5], "completion_ids": [6], field: value}
    with pytest.raises(ValueError, match=message):
        encode_row(row, tokenizer)
