"""Rows -> examples: `build_examples` (read, tokenize, truncate or pack, drop rows without loss), held-out splits,
the data fingerprint, and `load_data`, the recipe's data set-up shared by training and the cache stage.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from distill.config import Recipe
from distill.data.files import read_rows
from distill.data.rows import encode_row
from distill.errors import DistillError


@dataclass
class Example:
    """One tokenized sequence. `loss_mask[i]` is True when token i is a training target."""

    input_ids: list[int]
    loss_mask: list[bool]
    # Packed blocks only: each token's position inside its own document (restarting at 0 where a document
    # starts). transformers turns restarting position ids into per-document causal attention.
    positions: list[int] | None = None
    teacher: str | None = None  # several teachers (recipe key teachers): the one this row names

    @property
    def loss_tokens(self) -> int:
        # Token 0 is never predicted (nothing precedes it), so it never counts.
        return sum(self.loss_mask[1:])


@dataclass
class DataStats:
    """What happened to the rows on the way to examples; reported to the user."""

    rows: int = 0
    bad_rows: int = 0
    empty_rows: int = 0
    truncated_rows: int = 0
    examples: int = 0
    loss_tokens: int = 0
    bad_row_messages: list[str] = field(default_factory=list)


def build_examples(
    source: str | Path,
    tokenizer,
    max_length: int | None,
    skip_bad_rows: bool = False,
    packing: bool = False,
    split: str = "train",
    ignore_keys: Sequence[str] = (),
    route: tuple[str, Collection[str]] | None = None,
) -> tuple[list[Example], DataStats]:
    """Read and tokenize every row of `source`; truncate (or pack) to `max_length`; drop rows with no loss.

    `max_length` None keeps every row whole (one example per row, for a caller that splits rows before packing).
    `ignore_keys`: row keys no format reads that are not refused (data.ignore_keys).
    `route`: (the row key naming each row's teacher, the teachers' names) with several teachers; the key is read
    into `Example.teacher`, not trained on.
    """
    if route is not None:
        ignore_keys = (*ignore_keys, route[0])
    stats = DataStats()
    examples: list[Example] = []
    for where, row in read_rows(source, split):
        stats.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
            teacher = _row_teacher(row, *route) if route is not None else None
            ids, mask = encode_row(row, tokenizer, ignore_keys)
        except ValueError as e:
            if not skip_bad_rows:
                raise DistillError(f"bad row at {where}: {e} (set data.skip_bad_rows=true to skip such rows)") from None
            stats.bad_rows += 1
            if len(stats.bad_row_messages) < 5:
                stats.bad_row_messages.append(f"{where}: {e}")
            continue
        if not packing and max_length is not None and len(ids) > max_length:
            stats.truncated_rows += 1
            ids, mask = ids[:max_length], mask[:max_length]
        example = Example(ids, mask, teacher=teacher)
        if example.loss_tokens == 0:
            stats.empty_rows += 1
            continue
        examples.append(example)
    if packing:
        examples = pack(examples, max_length)
    stats.examples = len(examples)
    stats.loss_tokens = sum(e.loss_tokens for e in examples)
    return examples, stats


def _row_teacher(row: object, key: str, names: Collection[str]) -> str:
    """The teacher a row names in `key` (data.teacher_field), one of `names`; ValueError otherwise."""
    known = ", ".join(names)
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f'no "{key}" key naming the row\'s teacher (data.teacher_field; teachers: {known})')
    if row[key] not in names:
        raise ValueError(f'"{key}": {row[key]!r} is not one of recipe key teachers ({known})')
    return row[key]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate examples and cut the stream into blocks of `max_length` tokens (the last may be shorter).

    Packing trades nothing of correctness for throughput: every document keeps its own positions (restarting at 0
    where it starts; `positions` of each block) and, through them, its own causal attention (transformers derives
    per-document attention from restarting position ids; see `forward_inputs`), so a document inside a block is
    computed exactly as it would be alone. A document's first token is never a target inside a block: nothing of
    its own document precedes it (in a row of its own, token 0 is never predicted either). A document longer than
    what is left of a block continues at the start of the next block, with positions from 0 again: its second
    piece does not see the first, as a truncated row would not see what was cut off.
    """
    ids: list[int] = []
    mask: list[bool] = []
    starts: list[int] = []  # where each document begins in the stream
    for e in examples:
        if not e.input_ids:
            continue
        starts.append(len(ids))
        ids.extend(e.input_ids)
        mask.extend(e.loss_mask)
    for start in starts:
        mask[start] = False  # predicted from the previous document's last token, which it cannot see
    blocks = []
    doc_starts = iter(starts + [len(ids)])
    next_start = next(doc_starts)
    for first in range(0, len(ids), max_length):
        positions = []
        position = 0
        for i in range(first, min(first + max_length, len(ids))):
            if i == next_start:
                position, next_start = 0, next(doc_starts)
            positions.append(position)
            position += 1
        end = first + len(positions)
        blocks.append(Example(ids[first:end], mask[first:end], positions))
    return [b for b in blocks if b.loss_tokens > 0]


def truncated(examples: list[Example], max_length: int) -> list[Example]:
    """Each example cut to `max_length` tokens, as `build_examples` cuts rows; those left without loss dropped."""
    cut = [Example(e.input_ids[:max_length], e.loss_mask[:max_length], teacher=e.teacher) for e in examples]
    return [e for e in cut if e.loss_tokens > 0]


def split_eval(examples: list[Example], fraction: float, max_rows: int, seed: int) -> tuple[list, list]:
    """Hold out a seeded random share of examples for evaluation: (train, eval)."""
    if len(examples) < 2:
        raise DistillError("need at least 2 examples to hold some out for evaluation; give data.eval")
    count = min(max(1, round(len(examples) * fraction)), max_rows, len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:count])
    train = [e for i, e in enumerate(examples) if i not in held]
    held_out = [examples[i] for i in sorted(held)]
    return train, held_out


def data_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the token ids, loss masks (and packed positions) of `examples`, in order.

    Taken on tokenized examples rather than files, so it also notices a changed tokenizer, max_length or packing;
    a cache and a checkpoint both keep it to refuse data that is not what they were made from.
    """
    import hashlib
    import struct

    import numpy as np

    h = hashlib.sha256(str(len(examples)).encode())
    for e in examples:
        h.update(struct.pack("<q", len(e.input_ids)))
        h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(e.loss_mask, dtype=np.bool_).tobytes())
        if e.positions is not None:
            h.update(np.asarray(e.positions, dtype=np.int64).tobytes())
        if e.teacher is not None:  # several teachers: the routing is part of the data
            h.update(f"teacher:{e.teacher}".encode())
    return h.hexdigest()


def load_data(recipe: Recipe, tokenizer, log=print):
    d = recipe.data
    # Packed with nothing held out yet: hold out whole rows first, then pack the rest. Splitting the packed blocks
    # would put pieces of one document in both sets (a block mixes documents, and a document can span blocks).
    split_rows_first = d.packing and d.eval is None
    length, packing = (None, False) if split_rows_first else (d.max_length, d.packing)
    route = (d.teacher_field, tuple(recipe.teachers)) if recipe.teachers else None
    keys = (d.skip_bad_rows, packing, d.train_split, d.ignore_keys, route)
    train, stats = build_examples(d.train, tokenizer, length, *keys)
    if stats.bad_rows:
        log(f"skipped {stats.bad_rows} malformed rows, e.g. {stats.bad_row_messages[0]}")
    if stats.empty_rows:
        log(f"skipped {stats.empty_rows} rows with no loss tokens")
    if not train:
        raise DistillError(f"data.train {d.train}: no usable examples ({stats.rows} rows read)")
    if d.eval is not None:
        held_out, eval_stats = build_examples(
            d.eval, tokenizer, d.max_length, d.skip_bad_rows, False, d.eval_split, d.ignore_keys, route
        )
        if not held_out:
            raise DistillError(f"data.eval {d.eval}: no usable examples ({eval_stats.rows} rows read)")
    else:
        train, held_out = split_eval(train, d.eval_fraction, d.eval_max_rows, recipe.training.seed)
    if split_rows_first:
        # Held-out rows are evaluated as data.eval rows are: one row each, cut to max_length.
        train, held_out = pack(train, d.max_length), truncated(held_out, d.max_length)
    log(f"data: {len(train)} training examples ({sum(e.loss_tokens for e in train)} loss tokens), {len(held_out)} eval")
    return train, held_out
