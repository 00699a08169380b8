"""A local teacher's completions: batched sampling through `distill.sampling.decode`, with top-k log-probs.

Local batches are fixed by the prompt set alone (sorted by length, cut into `batch_size` chunks, one seed per batch),
so a resumed run writes the same completions as one that was never interrupted.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distill.data import pad_id_of
from distill.sampling import decode, eos_ids, stable_hash


@dataclass
class Completion:
    """One sampled continuation. `token_ids` are the tokens the model produced (an ending EOS and a stop string's
    tokens included, as vLLM reports them); `text` has neither (as OpenAI-compatible servers return it)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    token_logprobs: list[float] | None = None  # log-prob of each produced token at temperature 1
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the k most likely (id, log-prob)


def _finish(tokenizer, ids: list[int], eos: set[int], stop: Sequence[str], max_new_tokens: int) -> tuple[int, str, str]:
    """Where a generated row ends: (number of produced tokens, text, finish_reason)."""
    first_eos = next((i for i, t in enumerate(ids) if t in eos), None)
    body = ids if first_eos is None else ids[:first_eos]
    text = tokenizer.decode(body, skip_special_tokens=True)
    hits = [(text.find(s), s) for s in stop if s and s in text]
    if hits:
        start, string = min(hits)
        # The token that completes the stop string ends the completion; BPE may spread the string over several.
        for k in range(1, len(body) + 1):
            if len(tokenizer.decode(body[:k], skip_special_tokens=True)) >= start + len(string):
                return k, text[:start], "stop"
    if first_eos is not None:
        return first_eos + 1, text, "stop"
    return len(ids), text, "length" if len(ids) >= max_new_tokens else "stop"


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    n: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    logprobs: int | None = None,
    seed: int | None = None,
) -> list[list[Completion]]:
    """Sample `n` completions for each tokenized prompt in one batched, KV-cached `generate` call.

    Prompts are left-padded so every row's next token sits in the last column. temperature 0 = greedy.
    `logprobs` None = none; k >= 0 = the produced token's log-prob plus the top k, from the raw logits at
    temperature 1 over the tokenizer's vocabulary (embedding rows past it are padding and never sampled).
    `seed` seeds the sampling (on a forked RNG, see `distill.sampling.decode`), so the same call gives the same
    samples.
    Returns one list of n completions per prompt.
    """
    vocab = len(tokenizer)
    pad = pad_id_of(tokenizer)
    eos = eos_ids(model, tokenizer)
    # Greedy decoding gives one answer: decode it once and copy it (transformers refuses greedy n > 1).
    draws = n if temperature > 0 else 1
    # The recipe's sampling only, never the model's generation_config (Qwen ships repetition_penalty 1.05), and no
    # id past the tokenizer: `decode` sees to both.
    out = decode(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        eos_ids=eos,
        pad_id=pad,
        vocab_size=vocab,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        num_return_sequences=draws,
        stop_strings=stop,
        tokenizer=tokenizer,
        output_logits=logprobs is not None,
        seed=seed,
    )
    produced = out.new_ids.tolist()  # (B*draws, S): HF repeats each prompt `draws` times, in order
    token_lp = top = None
    if logprobs is not None and out.logits:
        chosen, top_ids, top_lps = [], [], []
        for step, logits in enumerate(out.logits):  # S x (B*n, rows)
            lp = torch.log_softmax(logits[:, :vocab].float(), dim=-1)  # (B*n, V)
            step_ids = out.new_ids[:, step].clamp_max(vocab - 1)  # (B*n,) padding ids land anywhere
            chosen.append(lp.gather(1, step_ids[:, None])[:, 0])  # (B*n,)
            if logprobs > 0:
                values, indices = lp.topk(min(logprobs, vocab), dim=-1)  # (B*n, k)
                top_ids.append(indices)
                top_lps.append(values)
        token_lp = torch.stack(chosen, 1).tolist()  # (B*n, S)
        if logprobs > 0:
            top = (torch.stack(top_ids, 1).tolist(), torch.stack(top_lps, 1).tolist())  # (B*n, S, k) each
    eos_set = set(eos)
    result: list[list[Completion]] = []
    for row, ids in enumerate(produced):
        length, text, reason = _finish(tokenizer, ids, eos_set, stop, max_new_tokens)
        completion = Completion(text, ids[:length], reason)
        if token_lp is not None:
            completion.token_logprobs = token_lp[row][:length]
            completion.top_logprobs = (
                [list(zip(i, v, strict=True)) for i, v in zip(top[0][row][:length], top[1][row][:length], strict=True)]
                if top is not None
                else []
            )
        if row % draws == 0:
            result.append([])
        result[-1].append(completion)
    if draws != n:
        result = [[copy.deepcopy(c) for _ in range(n)] for (c,) in result]
    return result


def local_plan(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Batches of prompt indices: sorted by length (less padding), then cut. Depends on the prompts only, so a
    resumed run regenerates exactly the batches of the first run."""
    order = sorted(range(len(prompt_ids)), key=lambda i: (len(prompt_ids[i]), i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def derived_seed(seed: int, *parts: object) -> int:
    """A seed per batch/prompt: independent streams instead of seed+i, which would overlap between runs. 31 bits:
    servers take it as a signed 32-bit integer."""
    return stable_hash(seed, *parts, bits=31)
