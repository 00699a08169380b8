"""Row formats -> (input_ids, loss_mask): `encode_row` recognizes a row's format by its keys (ROW_FORMATS), refuses
keys it does not read, renders chat rows with the tokenizer's chat template and appends the token that ends a
completion when it ended by itself (`end_ids`).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from pathlib import Path

from distill.sampling import eos_set


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
    configured = None
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "")).expanduser()
    config = folder / "generation_config.json"
    if folder.is_dir() and config.is_file():
        try:
            configured = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            configured = None  # an unreadable generation config adds nothing; the model loader reports it
    _END_IDS[tokenizer] = frozenset(eos_set(tokenizer.eos_token_id, configured))
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
