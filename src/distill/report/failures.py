"""Failure modes: whether distillation made a model repeat itself, ramble or stop short, or be sure when it is wrong.

Repetition and length come from each model's greedy generations on the eval prompts (`generation.eval_prompts`);
calibration from the top-1 predictions on the eval tokens, computed in the report's chunked pass (`chunk_metrics`
gives each token's `confidence`). The signals a distilled student is known to go wrong on: degenerate repetition
(Welleck et al. 2019, "Neural text generation with unlikelihood training", rep-n), lengths unlike the teacher's,
and overconfidence (Guo et al. 2017, "On calibration of modern neural networks", expected calibration error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distill.sampling import decode

CALIBRATION_BINS = 15


@dataclass
class FailureSettings:
    """How many eval prompts are continued, how far, and what counts as a repeat (n-gram size, loop period)."""

    prompts: int = 8
    prompt_tokens: int = 32
    new_tokens: int = 64
    ngram: int = 4
    max_period: int = 16


def generated_tokens(new_ids: torch.Tensor, eos_ids: Sequence[int]) -> list[tuple[list[int], bool]]:
    """Each row of `decode`'s new_ids (B, S) as (its tokens before the first EOS, whether an EOS ended it).

    Only rows that ended are padded (with EOS and the budget the only stops), so what follows an EOS is dropped and
    nothing else; EOS itself is not counted as a generated token, so a row that ends at once has length 0."""
    eos = set(eos_ids)
    rows = []
    for row in new_ids.tolist():
        end = next((i for i, token in enumerate(row) if token in eos), None)
        rows.append((row if end is None else row[:end], end is not None))
    return rows


def repeated_ngrams(tokens: Sequence[int], n: int) -> tuple[int, int]:
    """(n-grams that already occurred earlier in `tokens`, all n-grams): rep-n = 1 − unique / total."""
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    total = max(0, len(tokens) - n + 1)
    for i in range(total):
        gram = tuple(tokens[i : i + n])
        repeated += gram in seen
        seen.add(gram)
    return repeated, total


def loops(tokens: Sequence[int], ended: bool, n: int, max_period: int) -> bool:
    """Whether a generation is stuck in a loop: no EOS ended it and its last max(2p, 2n) tokens repeat one block of p
    tokens, for some period p from 1 to `max_period` (e.g. "a b c a b c a b" at p = 3, n = 4).

    The tail must hold at least two whole n-grams' worth of the block, so one repeated n-gram is not yet a loop."""
    if ended:
        return False
    for period in range(1, max_period + 1):
        span = max(2 * period, 2 * n)
        if len(tokens) < span:
            break
        tail = tokens[-span:]
        if all(tail[i] == tail[i + period] for i in range(span - period)):
            return True
    return False


def generation_failures(rows: Sequence[tuple[list[int], bool]], settings: FailureSettings) -> dict:
    """Repetition, loops and length of greedy generations (from `generated_tokens`)."""
    repeated = total = looping = ended = length = 0
    for tokens, stopped in rows:
        r, t = repeated_ngrams(tokens, settings.ngram)
        repeated, total = repeated + r, total + t
        looping += loops(tokens, stopped, settings.ngram, settings.max_period)
        ended += stopped
        length += len(tokens)
    count = len(rows)
    shares = {"looping_share": looping, "ended_share": ended, "mean_generated_tokens": length}
    return {
        "generations": count,
        "max_new_tokens": settings.new_tokens,
        "ngram": settings.ngram,
        "repeated_ngram_share": repeated / total if total else (0.0 if count else None),
        **{k: v / count if count else None for k, v in shares.items()},  # None: nothing was generated
    }


@torch.no_grad()
def greedy_failures(
    model, prompts: Sequence[Sequence[int]], eos_ids: Sequence[int], pad_id: int, vocab_size: int, settings
) -> dict:
    """`generation_failures` of `model`'s greedy continuations of `prompts`, all prompts in one batch."""
    if not prompts:
        return generation_failures([], settings)
    output = decode(
        model, prompts, max_new_tokens=settings.new_tokens, eos_ids=eos_ids, pad_id=pad_id, vocab_size=vocab_size
    )
    return generation_failures(generated_tokens(output.new_ids, eos_ids), settings)


def expected_calibration_error(
    confidence: torch.Tensor, correct: torch.Tensor, bins: int = CALIBRATION_BINS
) -> float | None:
    """ECE of the top-1 prediction: Σ_b (n_b / N) · |accuracy_b − mean confidence_b| over `bins` equal-width
    confidence bins ((b−1)/B, b/B], Guo et al. 2017. confidence (N,) in (0, 1], correct (N,) bool. None if N = 0."""
    n = confidence.numel()
    if n == 0:
        return None
    confidence = confidence.double()
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)  # (N,) bin of each token
    confidence_sums = torch.bincount(index, weights=confidence, minlength=bins)  # (bins,)
    correct_sums = torch.bincount(index, weights=correct.double(), minlength=bins)
    return float((correct_sums - confidence_sums).abs().sum() / n)


def length_ratio(model: dict | None, teacher: dict | None) -> float | None:
    """Mean generated tokens of a model over the teacher's (1.0 = as long as the teacher's)."""
    if not model or not teacher or not teacher.get("mean_generated_tokens"):
        return None
    return model["mean_generated_tokens"] / teacher["mean_generated_tokens"]
