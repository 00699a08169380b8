"""Examples -> padded batches: `collate`, the forward's keyword arguments (`forward_inputs`), and the seeded order
of examples per optimizer step (a pure function of the step, so resume needs no state).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from distill.data.examples import Example


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
