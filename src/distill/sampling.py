"""What every sampler here shares: seeds derived from names, the tokens that end a completion, left padding.

Used by `distill generate` (the teacher writes completions) and by on-policy training (the student does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def stable_hash(*parts: object, bits: int = 63) -> int:
    """A `bits`-bit integer that depends only on `parts` — not on PYTHONHASHSEED, the process or the platform —
    so seeds and choices derived from it are the same in a resumed run and on every rank."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - bits)


def eos_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS and those of the model's generation config, sorted."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value if isinstance(v, int))
    return sorted(ids)


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P), prompts aligned on the right: generation appends there, and
    transformers derives positions from the attention mask, so the padding shifts nothing."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask
