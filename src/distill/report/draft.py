"""Each model as the teacher's draft in speculative decoding: how many proposed tokens the teacher accepts, and
whether teacher + draft writes faster than the teacher alone.

Greedy assisted generation (transformers' `generate(assistant_model=...)`, through `distill.sampling.decode`):
each round the draft proposes `draft_tokens` tokens, the teacher scores them all in one forward and keeps them up
to the first one its own argmax disagrees with, plus its own next token (Leviathan et al. 2023; Chen et al. 2023).
The output is then the teacher's own greedy output, which is checked. A student distilled for this use is
DistillSpec's case (Zhou et al. 2024).

Counting. transformers 5 keeps the number of accepted tokens in a local variable of `_assisted_decoding` and
exposes no counter, but hands it every round to the candidate generator (`update_candidate_strategy(...,
num_matches)`) right after asking that generator for the round's proposal (`get_candidates`). So the teacher's
`_get_candidate_generator` is wrapped for the call (`_counting`) and the generator it returns is instrumented:
proposed = the length of each proposal, accepted = each round's num_matches. These are the numbers transformers
itself acted on, not a re-derivation; the invariant accepted + rounds = new tokens (each round adds its accepted
tokens and one of the teacher's) is checked on every call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from distill.errors import DistillError
from distill.sampling import decode


@dataclass
class DraftSettings:
    """Prompts and lengths of the draft measurement; `draft_tokens`: tokens the draft proposes per round (γ)."""

    prompts: int = 4
    prompt_tokens: int = 32
    new_tokens: int = 32
    draft_tokens: int = 5


@dataclass
class _Counts:
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0


@contextlib.contextmanager
def _counting(teacher, counts: _Counts):
    """Count the proposed and accepted draft tokens of the teacher's assisted generations inside the block."""
    if not hasattr(teacher, "_get_candidate_generator"):
        raise DistillError("this transformers version has no _get_candidate_generator: draft tokens cannot be counted")
    original = teacher._get_candidate_generator

    def instrumented(*args, **kwargs):
        generator = original(*args, **kwargs)
        get_candidates, update = generator.get_candidates, generator.update_candidate_strategy

        def counted_candidates(input_ids, *a, **k):
            candidates = get_candidates(input_ids, *a, **k)
            counts.proposed += candidates[0].shape[1] - input_ids.shape[1]
            return candidates

        def counted_update(input_ids, scores, num_matches, *a, **k):
            counts.accepted += int(num_matches)
            counts.rounds += 1
            return update(input_ids, scores, num_matches, *a, **k)

        generator.get_candidates, generator.update_candidate_strategy = counted_candidates, counted_update
        return generator

    teacher._get_candidate_generator = instrumented
    try:
        yield counts
    finally:
        del teacher._get_candidate_generator  # the instance attribute; the class's method shows again


@contextlib.contextmanager
def _same_vocabulary_size(teacher, draft):
    """transformers takes a draft whose config states another vocab_size for one with another tokenizer (and then
    re-tokenizes text between the two). Here the tokenizers were checked to be the same and only the embedding
    padding differs (ids past the tokenizer are suppressed on both sides), so the draft states the teacher's size
    for the call."""
    teacher_config, draft_config = teacher.config.get_text_config(), draft.config.get_text_config()
    saved = draft_config.vocab_size
    draft_config.vocab_size = teacher_config.vocab_size
    try:
        yield
    finally:
        draft_config.vocab_size = saved


def _timed(model, prompt, new_tokens: int, eos_ids, pad_id: int, vocab_size: int, assistant=None, gamma: int = 5):
    """One greedy decode at batch 1: (new ids (S,), seconds)."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = decode(
        model,
        [prompt],
        max_new_tokens=new_tokens,
        eos_ids=eos_ids,
        pad_id=pad_id,
        vocab_size=vocab_size,
        assistant=assistant,
        assistant_tokens=gamma,
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return output.new_ids[0].cpu(), time.perf_counter() - start


@torch.no_grad()
def measure_draft(
    teacher,
    draft,
    prompts: Sequence[Sequence[int]],
    eos_ids: Sequence[int],
    pad_id: int,
    vocab_size: int,
    settings: DraftSettings,
) -> dict:
    """`draft` as the teacher's draft on `prompts` (greedy, batch 1): acceptance, speed-up, equal outputs.

    Per prompt the teacher decodes alone and with the draft, in alternating order so that a machine that slows
    down or speeds up during the measurement favours neither; tokens/s are total new tokens over total seconds.
    """
    counts = _Counts()
    alone_tokens = alone_s = assisted_tokens = assisted_s = 0.0
    equal = 0
    gamma = settings.draft_tokens
    with _same_vocabulary_size(teacher, draft), _counting(teacher, counts):
        # Warm-up (the first assisted call sets up its candidate generator's caches); its counts are discarded.
        _timed(teacher, prompts[0], 2, eos_ids, pad_id, vocab_size, draft, gamma)
        counts.proposed = counts.accepted = counts.rounds = 0
        for i, prompt in enumerate(prompts):
            runs = {}
            for assisted in (False, True) if i % 2 == 0 else (True, False):
                helper = draft if assisted else None
                runs[assisted] = _timed(
                    teacher, prompt, settings.new_tokens, eos_ids, pad_id, vocab_size, helper, gamma
                )
            (alone, t_alone), (together, t_together) = runs[False], runs[True]
            alone_tokens, alone_s = alone_tokens + alone.numel(), alone_s + t_alone
            assisted_tokens, assisted_s = assisted_tokens + together.numel(), assisted_s + t_together
            equal += torch.equal(alone, together)
    new_tokens = counts.accepted + counts.rounds
    if new_tokens != int(assisted_tokens):  # batch 1: no padding, every new token came from a round
        raise RuntimeError(f"draft counts do not add up: {counts} for {assisted_tokens} new tokens")
    alone_rate = alone_tokens / alone_s if alone_s > 0 else None
    assisted_rate = assisted_tokens / assisted_s if assisted_s > 0 else None
    return {
        "draft_acceptance_rate": counts.accepted / counts.proposed if counts.proposed else None,
        "speculative_decode_speedup": assisted_rate / alone_rate if alone_rate and assisted_rate else None,
        "draft": {
            "prompts": len(prompts),
            "new_tokens": settings.new_tokens,
            "draft_tokens": gamma,
            "proposed_tokens": counts.proposed,
            "accepted_tokens": counts.accepted,
            "teacher_forwards": counts.rounds,
            "tokens_per_teacher_forward": new_tokens / counts.rounds if counts.rounds else None,
            "outputs_equal_teacher": equal == len(prompts),
            "prompts_equal_teacher": equal,
            "teacher_tokens_per_s": alone_rate,
            "assisted_tokens_per_s": assisted_rate,
        },
    }


def draft_skip_reason(teacher, draft) -> str | None:
    """Why `draft` cannot be measured as the teacher's draft here (None: it can). The tokenizers are the same: the
    report refuses models whose tokenizer differs from the teacher's before any is run."""
    if getattr(teacher, "_is_stateful", False) or getattr(draft, "_is_stateful", False):
        return "a stateful (recurrent) model cannot roll back rejected draft tokens"
    if teacher.config.is_encoder_decoder or draft.config.is_encoder_decoder:
        return "encoder-decoder models are not measured as drafts"
    return None
