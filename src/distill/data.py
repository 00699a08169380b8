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
"""

from __future__ import annotations

import csv
import json
import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.errors import DistillError

# Plain-text files (prose or source code) are one document each.
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py"}
ROW_SUFFIXES = {".jsonl", ".json", ".parquet", ".csv"} | TEXT_SUFFIXES


@dataclass
class Example:
    """One tokenized sequence. `loss_mask[i]` is True when token i is a training target."""

    input_ids: list[int]
    loss_mask: list[bool]
    # Packed blocks only: each token's position inside its own document (restarting at 0 where a document
    # starts). transformers turns restarting position ids into per-document causal attention.
    positions: list[int] | None = None

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


# ---------------------------------------------------------------- reading rows


def _files_under(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in ROW_SUFFIXES)
    if not files:
        raise DistillError(f"data folder {path} holds no {'/'.join(sorted(ROW_SUFFIXES))} files")
    return files


def _is_hf_dataset_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def _read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"not valid JSON ({e.msg})")


def _read_json(path: Path) -> Iterator[tuple[str, object]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        # A .json file may also be JSON lines.
        if e.msg == "Extra data":
            yield from _read_jsonl(path)
            return
        raise DistillError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        content = content["data"]
    if not isinstance(content, list):
        raise DistillError(f"{path}: expected a JSON list of rows")
    for number, row in enumerate(content, start=1):
        yield f"{path}[{number}]", row


def _read_csv(path: Path) -> Iterator[tuple[str, object]]:
    with path.open(encoding="utf-8", newline="") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            yield f"{path}:{number}", dict(row)


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}[{number}]", row


def _read_hf(dataset, source: str) -> Iterator[tuple[str, object]]:
    for number, row in enumerate(dataset, start=1):
        yield f"{source} row {number}", row


def _load_hf(source: str, split: str):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a core dependency
        raise DistillError("reading Hugging Face datasets needs the `datasets` package") from e
    path = Path(source)
    try:
        ds = datasets.load_from_disk(str(path)) if path.exists() else datasets.load_dataset(source, split=split)
    except FileNotFoundError as e:
        raise DistillError(f"data {source}: {e}") from None
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        raise DistillError(f"could not load data set {source!r}: {type(e).__name__}: {e}".splitlines()[0]) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DistillError(f"data set {source} has no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    return ds


def read_rows(source: str | Path, split: str = "train") -> Iterator[tuple[str, object]]:
    """Yield (where, row) for every row of a file, folder, `save_to_disk` folder or hub id.

    `where` names the file and line for error messages. A row that could not be parsed is yielded as an
    exception instance so the caller decides whether to stop or skip.
    """
    path = Path(source)
    if not path.exists():
        if str(source).startswith((".", "/", "~")) or path.suffix.lower() in ROW_SUFFIXES:
            raise DistillError(f"data file {source} does not exist")
        yield from _read_hf(_load_hf(str(source), split), str(source))
        return
    if _is_hf_dataset_folder(path):
        yield from _read_hf(_load_hf(str(path), split), str(path))
        return
    for file in _files_under(path):
        suffix = file.suffix.lower()
        try:
            if suffix == ".jsonl":
                yield from _read_jsonl(file)
            elif suffix == ".json":
                yield from _read_json(file)
            elif suffix == ".csv":
                yield from _read_csv(file)
            elif suffix == ".parquet":
                yield from _read_parquet(file)
            elif suffix in TEXT_SUFFIXES:
                yield str(file), {"text": file.read_text(encoding="utf-8")}
            else:
                raise DistillError(f"{file}: unsupported data file type {suffix!r}")
        except (OSError, UnicodeDecodeError) as e:
            raise DistillError(f"cannot read data file {file}: {e}") from None


# ---------------------------------------------------------------- rows -> examples


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


_END_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def end_ids(tokenizer) -> frozenset[int]:
    """Ids that end a text: the tokenizer's EOS and the EOS set of the generation config saved beside it.

    Instruction models end with one of several tokens (Qwen2.5: `<|im_end|>` and `<|endoftext|>`; Llama-3:
    `<|eot_id|>` and `<|end_of_text|>`), and a row that already ends with any of them gets no second one.
    """
    if tokenizer in _END_IDS:  # read once per tokenizer, not once per row
        return _END_IDS[tokenizer]
    ids = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set()
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "")).expanduser()
    config = folder / "generation_config.json"
    if folder.is_dir() and config.is_file():
        try:
            value = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            value = None  # an unreadable generation config adds nothing; the model loader reports it
        values = value if isinstance(value, list) else [value]
        ids.update(v for v in values if isinstance(v, int) and not isinstance(v, bool))
    _END_IDS[tokenizer] = frozenset(ids)
    return _END_IDS[tokenizer]


def _ends_by_itself(row: dict) -> bool:
    """Whether a completion ended on its own (EOS or end of turn), so the token that ends it is a target.

    Not when it was cut by the length limit (`finish_reason: length`: teaching the student to stop there would
    teach it to stop mid-sentence), nor when it stopped at a stop string (`finish_reason: stop` with the matched
    string in `stop_reason`, as vLLM and `distill generate` write it): the teacher never wrote an end there.
    """
    finish = row.get("finish_reason")
    return not (finish == "length" or (finish == "stop" and isinstance(row.get("stop_reason"), str)))


def _with_eos(tokenizer, ids: list[int], row: dict) -> list[int]:
    """`ids` and the token that ends them, when the row ended by itself and does not end with one already.

    A completion that stopped at a stop token (vLLM's `stop_token_ids`: an id in `stop_reason`) ends with that
    token; any other ends with the tokenizer's EOS.
    """
    if not _ends_by_itself(row) or (ids and ids[-1] in end_ids(tokenizer)):
        return ids
    stop = row.get("stop_reason")
    last = stop if isinstance(stop, int) and not isinstance(stop, bool) else tokenizer.eos_token_id
    if last is None:
        return ids
    if not 0 <= last < len(tokenizer):
        raise ValueError(f'"stop_reason" {last} is outside the vocabulary of {len(tokenizer)} tokens')
    return ids if ids and ids[-1] == last else ids + [last]


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(i))
    return ids | end_ids(tokenizer)


def _encode_messages(tokenizer, messages, ended: bool = True) -> tuple[list[int], list[bool]]:
    """A conversation rendered with the tokenizer's chat template; targets: each assistant turn, through its
    end-of-turn token.

    A turn's tokens are what the conversation up to it adds beyond the generation prompt, found by comparing
    tokens (BPE may merge the prompt's trailing space into the reply's first token, which is then a target too).
    Tokens the template adds after the end-of-turn token (ChatML's `\n` after `<|im_end|>`) are context: no model
    writes them, it stops at the end of turn. The end of turn is the turn's last EOS or special token; a template
    that ends turns with neither has its whole turn trained. `ended` False (the last reply was cut by a length
    limit or a stop string): the last assistant turn's end of turn is context too, as the teacher never wrote it.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat rows need a tokenizer with a chat template, and this one has none")

    def render(turns, generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        return _encode(tokenizer, text, special=False)

    ids = render(messages, generation_prompt=False)
    mask = [False] * len(ids)
    special = _special_ids(tokenizer)
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], generation_prompt=True)
        shared = zip(ids, prompt, strict=False)  # prompt may be longer than the prefix it shares with ids
        start = next((j for j, (a, b) in enumerate(shared) if a != b), min(len(ids), len(prompt)))
        through = render(messages[: i + 1], generation_prompt=False)
        if ids[: len(through)] != through:
            raise ValueError("the chat template does not render conversations as prefixes of each other")
        end = len(through)
        end_of_turn = next((j for j in range(end - 1, start - 1, -1) if ids[j] in special), None)
        if end_of_turn is not None:
            end = end_of_turn if (i == last_reply and not ended) else end_of_turn + 1
        for j in range(start, end):
            mask[j] = True
    return ids, mask


def _int_list(row: dict, name: str) -> list[int]:
    value = row[name]
    if not isinstance(value, Sequence) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f'"{name}" must be a list of integers')
    return list(value)


def _token_ids(row: dict, name: str, tokenizer) -> list[int]:
    ids = _int_list(row, name)
    if any(i < 0 or i >= len(tokenizer) for i in ids):
        raise ValueError(f'"{name}" has ids outside the vocabulary of {len(tokenizer)} tokens')
    return ids


def _encode_generated_ids(row: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """A `distill generate` row of a local teacher: exactly the tokens the teacher saw and wrote (re-tokenizing
    the text may split it differently, and the stored log-probs belong to these ids); loss on the completion."""
    prompt_ids, completion_ids = _token_ids(row, "prompt_ids", tokenizer), _token_ids(row, "completion_ids", tokenizer)
    completion_ids = _with_eos(tokenizer, completion_ids, row)
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def _encode_served_ids(row: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """A `distill generate` row of an endpoint that returned token ids: the prompt as the server fed it (the chat
    template's generation prompt after the conversation so far, or the prompt text) and exactly the ids the teacher
    wrote. Re-tokenizing the completion's text may split it otherwise (a model need not write canonical tokens),
    and the stored log-probs belong to these ids. In a chat row only the last turn, the teacher's, is a target."""
    completion_ids = _with_eos(tokenizer, _token_ids(row, "completion_ids", tokenizer), row)
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise ValueError('"messages" must be a list of {"role": ..., "content": ...} objects')
        if messages[-1].get("role") != "assistant":
            raise ValueError('a row with "completion_ids" needs the teacher\'s reply as its last, assistant, message')
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("chat rows need a tokenizer with a chat template, and this one has none")
        text = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        prompt_ids = _encode(tokenizer, text, special=False)
    else:
        if not isinstance(row.get("prompt"), str):
            raise ValueError('"prompt" must be a string')
        prompt_ids = _encode(tokenizer, row["prompt"], special=True)
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def _encode_token_row(row: dict, tokenizer) -> tuple[list[int], list[bool]]:
    """A pre-tokenized row. `labels` follow the transformers convention: aligned with `input_ids` (the model
    shifts them), -100 where a token is not a target; so labels[i] != -100 makes token i a target, and it must be
    the token itself (a target other than the next input cannot be expressed by a causal LM's row)."""
    ids = _token_ids(row, "input_ids", tokenizer)
    if "attention_mask" in row:
        attention = row["attention_mask"]
        if not isinstance(attention, Sequence) or len(attention) != len(ids) or not all(a == 1 for a in attention):
            raise ValueError('"attention_mask" must be all ones as long as "input_ids" (rows hold no padding)')
    if "labels" in row and "loss_mask" in row:
        raise ValueError('give "loss_mask" or "labels", not both')
    if "labels" in row:
        labels = _int_list(row, "labels")
        if len(labels) != len(ids):
            raise ValueError(
                f'"labels" has {len(labels)} entries for {len(ids)} input_ids: labels are aligned with input_ids '
                "(the model shifts them), as transformers takes them"
            )
        for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
            if label != -100 and label != token:
                raise ValueError(
                    f'"labels"[{i}] is {label} but "input_ids"[{i}] is {token}: a label is -100 or the token itself'
                )
        return ids, [label != -100 for label in labels]
    mask = row.get("loss_mask")
    if mask is None:
        return ids, [True] * len(ids)
    if not isinstance(mask, Sequence) or isinstance(mask, str) or len(mask) != len(ids):
        raise ValueError('"loss_mask" must be a list as long as "input_ids"')
    return ids, [bool(m) for m in mask]


# Fields of `distill generate` rows that say how a completion was made; the formats it writes accept them.
_GENERATED = ("finish_reason", "stop_reason", "prompt_index", "sample", "completion_ids", "completion_tokens",
              "token_logprobs", "top_logprobs")  # fmt: skip
# The keys each row format reads, in the order formats are recognized. Any other key is refused: a column the
# loader does not read (a "labels" beside "text", a "response" beside "prompt") would silently train something
# else than the row says.
ROW_FORMATS: dict[str, tuple[str, ...]] = {
    "input_ids": ("input_ids", "loss_mask", "labels", "attention_mask"),
    "prompt_ids/completion_ids": ("prompt_ids", "completion_ids", "prompt", "completion", "messages", *_GENERATED),
    "messages": ("messages", "completion", *_GENERATED),
    "prompt/completion": ("prompt", "completion", *_GENERATED),
    "text": ("text",),
}


def row_format(row: dict) -> str:
    """The format of a row (a key of ROW_FORMATS), by the keys it has; ValueError when it has none of them."""
    if "input_ids" in row:
        return "input_ids"
    if "prompt_ids" in row and "completion_ids" in row:
        return "prompt_ids/completion_ids"
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt/completion"
    if "text" in row:
        return "text"
    raise ValueError('a row needs "text", "prompt" and "completion", "messages", or "input_ids"')


def encode_row(row: object, tokenizer, ignore_keys: Sequence[str] = ()) -> tuple[list[int], list[bool]]:
    """Tokenize one row into (input_ids, loss_mask). Raises ValueError describing a malformed row.

    Keys the row's format does not read are refused, except `ignore_keys` (data.ignore_keys: metadata columns).
    """
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    # Columnar files (Parquet, datasets) give every row every column; a row's missing fields come back as None.
    row = {key: value for key, value in row.items() if value is not None and key not in ignore_keys}
    kind = row_format(row)
    known = ROW_FORMATS[kind]
    unknown = [key for key in row if key not in known]
    if unknown:
        raise ValueError(
            f"key {unknown[0]!r} is not read by a {kind} row (it reads {', '.join(known)}); "
            "remove it, or list it in data.ignore_keys"
        )
    if kind == "input_ids":
        return _encode_token_row(row, tokenizer)
    if kind == "prompt_ids/completion_ids":
        return _encode_generated_ids(row, tokenizer)
    if "completion_ids" in row and kind in ("messages", "prompt/completion"):
        return _encode_served_ids(row, tokenizer)
    if kind == "messages":
        return _encode_messages(tokenizer, row["messages"], ended=_ends_by_itself(row))
    if kind == "prompt/completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError('"prompt" and "completion" must both be strings')
        # Tokenized separately, not jointly: the prompt's tokens are exactly those a server, `distill generate` and
        # on-policy sampling feed the model for that prompt, and the completion continues them. (Jointly, a prompt
        # ending with a space would lose it to the completion's first token, a prompt no inference ever sees.)
        prompt_ids = _encode(tokenizer, prompt, special=True)
        completion_ids = _with_eos(tokenizer, _encode(tokenizer, completion, special=False), row)
        return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)
    if not isinstance(row["text"], str):
        raise ValueError('"text" must be a string')
    ids = _with_eos(tokenizer, _encode(tokenizer, row["text"], special=True), {})
    return ids, [True] * len(ids)


def build_examples(
    source: str | Path,
    tokenizer,
    max_length: int | None,
    skip_bad_rows: bool = False,
    packing: bool = False,
    split: str = "train",
    ignore_keys: Sequence[str] = (),
) -> tuple[list[Example], DataStats]:
    """Read and tokenize every row of `source`; truncate (or pack) to `max_length`; drop rows with no loss.

    `max_length` None keeps every row whole (one example per row, for a caller that splits rows before packing).
    `ignore_keys`: row keys no format reads that are not refused (data.ignore_keys).
    """
    stats = DataStats()
    examples: list[Example] = []
    for where, row in read_rows(source, split):
        stats.rows += 1
        try:
            if isinstance(row, Exception):
                raise row
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
        example = Example(ids, mask)
        if example.loss_tokens == 0:
            stats.empty_rows += 1
            continue
        examples.append(example)
    if packing:
        examples = pack(examples, max_length)
    stats.examples = len(examples)
    stats.loss_tokens = sum(e.loss_tokens for e in examples)
    return examples, stats


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
    cut = [Example(e.input_ids[:max_length], e.loss_mask[:max_length]) for e in examples]
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


# ---------------------------------------------------------------- batches


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into a batch.

    Returns input_ids (B, T) long, attention_mask (B, T) long, and labels (B, T-1) long: the target of
    output position i is input_ids[:, i+1], or -100 where it does not count (prompt, padding, masked).
    """
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((len(examples), width), dtype=torch.bool)  # (B, T)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(e.loss_mask, dtype=torch.bool)
    targets = input_ids[:, 1:]  # (B, T-1)
    labels = torch.where(loss_mask[:, 1:], targets, torch.full_like(targets, -100))  # (B, T-1)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any(e.positions is not None for e in examples):
        # Padding restarts at 0 too, so it is a document of its own that no real token attends to.
        position_ids = torch.arange(width).repeat(len(examples), 1)  # (B, T)
        for row, e in enumerate(examples):
            n = len(e.input_ids)
            if e.positions is not None:
                position_ids[row, :n] = torch.tensor(e.positions, dtype=torch.long)
            position_ids[row, n:] = torch.arange(width - n)
        batch["position_ids"] = position_ids
    return batch


def forward_inputs(batch: dict[str, torch.Tensor], device: torch.device | str | None = None) -> dict[str, object]:
    """The keyword arguments of a model's forward for a collated batch, on `device`.

    A packed batch carries `position_ids` that restart at each document and no attention mask: transformers
    derives per-document causal attention from restarting position ids only when the 2-D mask is absent. Right
    padding needs no mask under causal attention (no real token sees a later pad), so dropping it is exact.
    `use_cache=False` always: these forwards see whole sequences and keep no cache, and a model that builds one
    (config.use_cache, the default) skips the packed-sequence mask, so packed documents would attend to each other.
    """
    if "position_ids" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if device is not None:
        inputs = {k: v.to(device) for k, v in inputs.items()}
    return {**inputs, "use_cache": False}


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0  # pragma: no cover


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; a pure function of (seed, epoch), so resume needs no state."""
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def step_example_indices(num_examples: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Indices of the `batch_size` examples of global optimizer step `step` (0-based) in the epoch stream."""
    start = step * batch_size
    indices = []
    cached_epoch, cached_order = -1, []
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch != cached_epoch:
            cached_epoch, cached_order = epoch, epoch_order(num_examples, seed, epoch)
        indices.append(cached_order[offset])
    return indices


def iter_batches(examples: Sequence[Example], batch_size: int, pad_id: int) -> Iterator[dict[str, torch.Tensor]]:
    """Fixed-order batches over all examples (evaluation)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)


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
    return h.hexdigest()
