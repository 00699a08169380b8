"""What every sampler here shares: one decoding function, seeds derived from names, the tokens that end a completion,
left padding.

Every path whose tokens are read goes through `decode`: `distill generate` with a local teacher, on-policy training
(the student writes), exact-match evaluation and the demo's line completion. So greedy means the same everywhere, a
checkpoint's generation_config.json never changes what a recipe asked for, and no path emits an id the tokenizer
cannot decode. (Speed timing keeps its own forward loop, whose tokens nobody reads; `distill.report.speed` says why.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch


def stable_hash(*parts: object, bits: int = 63) -> int:
    """A `bits`-bit integer that depends only on `parts` — not on PYTHONHASHSEED, the process or the platform —
    so seeds and choices derived from it are the same in a resumed run and on every rank."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> (64 - bits)


def eos_set(*values) -> set[int]:
    """The ids named by EOS settings: each value an id, a list of ids (generation configs), or None."""
    ids: set[int] = set()
    for value in values:
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and not isinstance(v, bool):
                ids.add(int(v))
    return ids


def eos_ids(model, tokenizer) -> list[int]:
    """Tokens that end a completion: the tokenizer's EOS and those of the model's generation config, sorted."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return sorted(eos_set(tokenizer.eos_token_id, configured))


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


@dataclass
class Decoded:
    """What `decode` returns. `new_ids` (B * n, S): the tokens after each prompt, rows of one prompt adjacent, rows
    that ended early padded with pad_id; `logits`: S tensors (B * n, rows) of raw next-token logits (before the
    suppression and sampling settings), or None when not asked for."""

    new_ids: torch.Tensor
    logits: tuple[torch.Tensor, ...] | None = None


def decode(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    vocab_size: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    num_return_sequences: int = 1,
    min_new_tokens: int = 0,
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    output_logits: bool = False,
    stopping_criteria: Sequence | None = None,
    seed: int | None = None,
    device: torch.device | None = None,
    synced: bool = False,
    assistant=None,
    assistant_tokens: int = 5,
) -> Decoded:
    """The one decoding function: left-padded, batched, KV-cached `model.generate` with only the caller's settings.

    - Only what is set here applies. transformers fills every setting the call leaves unset from the model's own
      `generation_config` (a checkpoint's repetition_penalty, top_k, min_new_tokens, no_repeat_ngram_size, ...), so
      that is swapped for a blank one during the call and put back after. temperature 0 = greedy (one beam);
      otherwise sampling at `temperature` with `top_p` and `top_k` (0 = no top-k cut, not transformers' 50).
    - Ids >= `vocab_size` (the tokenizer's length) are never produced: embedding rows past it are padding (a vocab
      rounded up, a student pruned from a padded teacher), and an id there cannot be decoded or looked up in the
      tokenizer's vocabulary. None = no bound (the caller has none to give).
    - `eos_ids` end a row (`sampling.eos_ids`); [] = nothing ends one before `max_new_tokens`.
    - `seed`: sampling runs under `torch.random.fork_rng` seeded with it, so the same call gives the same samples
      and the caller's RNG streams (dropout, data order) are left exactly as they were. None = the current stream.
    - `stop_strings` (needs `tokenizer`), `stopping_criteria` (transformers StoppingCriteria) end rows early;
      `synced` keeps every process of a sharded (FSDP) model in the same forward calls until all are done.
    - `assistant`: a draft model with the same token ids, for transformers' assisted generation (speculative
      decoding, Leviathan et al. 2023; one prompt at a time, transformers' limit). Each round it proposes
      `assistant_tokens` tokens (a constant number, no confidence cut-off: its own generation_config is swapped
      out too) that `model` checks in one forward; the output is `model`'s own (greedy: the same tokens).
    The caller chooses eval/train mode; no gradients are recorded.
    """
    from transformers import GenerationConfig

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    input_ids, attention_mask = left_padded(prompts, pad_id)  # (B, P) each
    settings: dict = {
        "max_new_tokens": max_new_tokens,
        "num_beams": 1,
        "num_return_sequences": num_return_sequences,
        "eos_token_id": list(eos_ids) or None,
        "pad_token_id": pad_id,
    }
    if temperature > 0:
        settings.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        settings.update(do_sample=False)
    if min_new_tokens > 0:
        settings["min_new_tokens"] = min_new_tokens
    heads = [_output_rows(m) for m in (model, assistant) if m is not None]
    rows = max((r for r in heads if r is not None), default=None)
    if vocab_size is not None and rows is not None and rows > vocab_size:
        # Applied before temperature/top-p, so the sampled distribution is the one over real tokens (the draft's
        # proposals go through the same processors, hence the wider of the two heads).
        settings["suppress_tokens"] = list(range(vocab_size, rows))
    if output_logits:
        settings.update(output_logits=True, return_dict_in_generate=True)
    if stop_strings:
        settings["stop_strings"] = list(stop_strings)
    config = GenerationConfig(**settings)
    extra: dict = {}
    if stop_strings:
        extra["tokenizer"] = tokenizer
    if stopping_criteria:
        from transformers import StoppingCriteriaList

        extra["stopping_criteria"] = StoppingCriteriaList(stopping_criteria)
    if assistant is not None:
        extra["assistant_model"] = assistant
    seeded = nullcontext()
    if seed is not None:
        seeded = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], device_type=device.type)
    with _own_configs(model, assistant, assistant_tokens), torch.no_grad(), seeded:
        if seed is not None:
            torch.manual_seed(seed)
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
            synced_gpus=synced,
            **extra,
        )
    sequences = output.sequences if hasattr(output, "sequences") else output  # (B * n, P + S)
    logits = tuple(output.logits) if output_logits and getattr(output, "logits", None) else None
    return Decoded(sequences[:, input_ids.shape[1] :], logits)


_NONE = object()  # a model that had no generation_config of its own before the call


@contextmanager
def _own_configs(model, assistant, assistant_tokens: int):
    """Blank generation configs on `model` (and the draft) for the call, the models' own put back after.

    transformers reads the draft length, its schedule and a confidence cut-off from the draft's own config."""
    from transformers import GenerationConfig

    blank = {model: GenerationConfig()}
    if assistant is not None:
        blank[assistant] = GenerationConfig(
            num_assistant_tokens=assistant_tokens,
            num_assistant_tokens_schedule="constant",
            assistant_confidence_threshold=0.0,
        )
    saved = {m: m.__dict__.get("generation_config", _NONE) for m in blank}
    try:
        for m, config in blank.items():
            m.generation_config = config
        yield
    finally:
        for m, value in saved.items():
            if value is _NONE:
                del m.generation_config
            else:
                m.generation_config = value


def _output_rows(model) -> int | None:
    """How many next-token logits the model gives: its output embedding's rows (the config's vocab_size as a
    fallback for models without a separate head object)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size is not None else None
