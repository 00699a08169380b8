"""The prompts of `distill generate`: reading them (prompt or chat rows), their fingerprint, their token ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from distill.data import read_rows
from distill.errors import DistillError


@dataclass
class Prompt:
    """One distinct prompt: plain text (`prompt`) or a conversation (`messages`) to be answered."""

    index: int
    prompt: str | None = None
    messages: list[dict] | None = None

    @property
    def key(self) -> str:
        return json.dumps(self.prompt if self.messages is None else self.messages, sort_keys=True, ensure_ascii=False)


def read_prompts(source: str, split: str = "train") -> list[Prompt]:
    """Distinct prompts of a data source in order of first appearance (a repeated prompt is generated once)."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for where, row in read_rows(source, split):
        if isinstance(row, Exception):
            raise DistillError(f"bad prompt row at {where}: {row}")
        if not isinstance(row, dict):
            raise DistillError(f"bad prompt row at {where}: expected an object, got {type(row).__name__}")
        row = {key: value for key, value in row.items() if value is not None}
        if "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not messages or not all(_is_message(m) for m in messages):
                raise DistillError(
                    f'bad prompt row at {where}: "messages" must be a non-empty list of {{"role", "content"}} objects'
                )
            prompt = Prompt(len(prompts), messages=[{"role": m["role"], "content": m["content"]} for m in messages])
        elif isinstance(row.get("prompt"), str):
            prompt = Prompt(len(prompts), prompt=row["prompt"])
        else:
            raise DistillError(f'bad prompt row at {where}: a prompt row needs "prompt" (a string) or "messages"')
        if prompt.key not in seen:
            seen.add(prompt.key)
            prompts.append(prompt)
    if not prompts:
        raise DistillError(f"prompts {source}: no rows")
    return prompts


def _is_message(message: object) -> bool:
    return (
        isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)
    )


def prompts_fingerprint(prompts: Sequence[Prompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(p.key.encode("utf-8") + b"\n")
    return digest.hexdigest()


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids the teacher continues: exactly as `distill.data` tokenizes the row's prompt side for training."""
    if prompt.messages is None:
        return list(tokenizer(prompt.prompt, add_special_tokens=True)["input_ids"])
    if getattr(tokenizer, "chat_template", None) is None:
        raise DistillError("chat prompts (messages rows) need a tokenizer with a chat template, and this one has none")
    text = tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
