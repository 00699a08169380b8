"""Rows on disk -> token sequences with loss masks -> padded batches.

Row formats (one dict per example; a key the row's format does not read is refused, see ROW_FORMATS):
  {"text": ...}                        loss on every token
  {"prompt": ..., "completion": ...}   loss on the completion only; prompt and completion tokenized separately
  {"messages": [{"role", "content"}]}  rendered with the tokenizer's chat template; loss on assistant turns only,
                                       each through its end-of-turn token (what the template adds after is context)
  {"input_ids": [...], "loss_mask"?}   pre-tokenized; loss on all tokens unless a mask is given, or `labels`
                                       (transformers' convention: aligned with input_ids, -100 = not a target)
  {"prompt_ids", "completion_ids"}     `distill generate` rows of a local teacher: these exact ids (text ignored);
                                       loss on the completion

A completion ends with EOS (appended unless it ends with any id of the EOS set already, `end_ids`) except when it
did not end by itself: cut by the length limit (finish_reason "length") or stopped at a stop string (finish_reason
"stop" with the string in stop_reason).

File formats: JSONL, JSON, Parquet, CSV, plain text (one document per file), folders of them, Hugging Face
`save_to_disk` folders, and hub dataset ids.

Alignment convention used everywhere: `loss_mask[i]` says whether token i is a *target*. The model's output at
position i-1 predicts token i, so the shifted mask `loss_mask[1:]` selects the outputs that count.

Packing (`data.packing`) concatenates rows and cuts the stream into `max_length` blocks; each document keeps its own
positions and causal attention inside a block (see `pack`), and held-out rows are chosen before packing.

Files:
  files.py     reading rows from files, folders, `save_to_disk` folders and hub ids (`read_rows`)
  rows.py      row formats -> token ids and loss mask (`encode_row`, ROW_FORMATS, `end_ids`; chat and generated rows)
  examples.py  Example, DataStats, `build_examples`, `pack`, `truncated`, `split_eval`, `data_fingerprint`, and
               `load_data` (the recipe's train/held-out examples, for training and the cache stage)
  batches.py   `collate`, `forward_inputs`, `pad_id_of`, `epoch_order`, `step_example_indices`, `iter_batches`
  alignment.py two tokenizations of one text on a byte axis (objective.cross_tokenizer): `TokenizerPair`

The floor's public face: the names below are re-exported so `from distill.data import X` works everywhere.
"""

from distill.data.batches import collate, epoch_order, forward_inputs, iter_batches, pad_id_of, step_example_indices
from distill.data.examples import (
    DataStats,
    Example,
    build_examples,
    data_fingerprint,
    load_data,
    pack,
    split_eval,
    truncated,
)
from distill.data.files import ROW_SUFFIXES, TEXT_SUFFIXES, read_rows
from distill.data.rows import ROW_FORMATS, encode_row, end_ids, row_format

__all__ = [
    "ROW_FORMATS",
    "ROW_SUFFIXES",
    "TEXT_SUFFIXES",
    "DataStats",
    "Example",
    "build_examples",
    "collate",
    "data_fingerprint",
    "encode_row",
    "end_ids",
    "epoch_order",
    "forward_inputs",
    "iter_batches",
    "load_data",
    "pack",
    "pad_id_of",
    "read_rows",
    "row_format",
    "split_eval",
    "step_example_indices",
    "truncated",
]
