"""On-policy distillation: for a share λ of steps the student writes the completions it is trained on.

GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes")
and MiniLLM (Gu et al. 2024): a student trained only on fixed text never sees the prefixes its own mistakes lead
to. On an on-policy step each example keeps its prompt, the student samples a completion for it, and the teacher
scores the sampled tokens through the ordinary step loss (the recipe's divergence, usually reverse_kl or jsd).

Everything random here is a pure function of the recipe's seed and the step, so a resumed run repeats the same
choices and the same samples bit for bit:
- whether step s is on-policy: a uniform number hashed from (seed, s), compared with λ; the same on every rank;
- the sampling seed of micro-batch j on rank r: hashed from (seed, s, r, j), used inside `torch.random.fork_rng`
  so the training RNG streams (dropout) are left exactly as they were.

The new example is prompt + completion, with the loss on the completion only (an EOS the student wrote is part of
the completion and counts), collated like any other batch, so the loop's global loss-token count includes the
sampled tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from distill.data import Example, pad_id_of
from distill.errors import DistillError
from distill.sampling import decode, eos_ids, stable_hash


def is_on_policy_step(seed: int, step: int, share: float) -> bool:
    """Whether 0-based optimizer step `step` trains on the student's own samples; True for a `share` of steps."""
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    return stable_hash("on-policy-step", seed, step) / 2.0**63 < share


def sampling_seed(seed: int, step: int, rank: int, micro_batch: int) -> int:
    """Seed of the student's sampling for one micro-batch of one rank at one step."""
    return stable_hash("on-policy-sample", seed, step, rank, micro_batch)


def prompt_length(example: Example, prefix_tokens: int) -> int:
    """How many leading tokens of `example` form the prompt the student continues; 0 = it has none.

    The prompt is everything before the first loss token (prompt/completion and chat rows). A row whose very first
    token already counts (text rows, all-loss input_ids, packed blocks) has no prompt: it is prompted with its first
    `prefix_tokens` tokens, at most all but one. Either way at least one token of the row follows the prompt, so
    the completion has room within data.max_length.
    """
    first_loss = next((i for i, m in enumerate(example.loss_mask) if m), len(example.loss_mask))
    if first_loss > 0:
        return first_loss
    return min(prefix_tokens, len(example.input_ids) - 1)


def sample_completions(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    *,
    temperature: float,
    top_p: float,
    eos_ids: Sequence[int],
    pad_id: int,
    seed: int,
    device: torch.device,
    synced: bool = False,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """The model's completions of `prompts`, batched with a KV cache; row i gets at most max_new_tokens[i] tokens.

    Decoded by `distill.sampling.decode` (left padding, only these settings, no id >= `vocab_size`: pass
    len(tokenizer)). A completion ends after its first EOS, which it keeps. `temperature` 0 means greedy decoding.
    `synced` keeps every process of a sharded (FSDP) model in the same forward calls until all are done. The caller
    chooses eval/train mode; no gradients are recorded.
    """
    output = decode(
        model,
        prompts,
        max_new_tokens=max(max_new_tokens),
        eos_ids=eos_ids,
        pad_id=pad_id,
        vocab_size=vocab_size,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        device=device,
        synced=synced,
    )
    new_tokens = output.new_ids.tolist()  # (B, N): the one host sync, needed to know each completion's length
    eos = set(eos_ids)
    completions = []
    for tokens, limit in zip(new_tokens, max_new_tokens, strict=True):
        end = next((i + 1 for i, token in enumerate(tokens) if token in eos), len(tokens))
        # Tokens after a row's EOS are padding added while other rows went on.
        completions.append(tokens[: min(end, limit)])
    return completions


class OnPolicy:
    """The on-policy part of the training loop: which steps, and their examples. A no-op when λ = 0."""

    def __init__(
        self,
        recipe,
        tokenizer,
        train_examples: Sequence[Example],
        device: torch.device,
        autocast: Callable[[], object] = nullcontext,
    ):
        self.config = recipe.objective.on_policy
        self.seed = recipe.training.seed
        self.max_length = recipe.data.max_length
        self.tokenizer = tokenizer
        self.pad_id = pad_id_of(tokenizer)
        self.device = torch.device(device)
        self.autocast = autocast
        self.window_steps = self.window_on_policy = 0
        self.window_generate_s = 0.0
        if self.enabled:
            without = sum(prompt_length(e, self.config.prefix_tokens) == 0 for e in train_examples)
            if without:
                raise DistillError(
                    f"recipe key objective.on_policy.prefix_tokens: {without} of {len(train_examples)} training "
                    "examples have no prompt (their first token is a loss token, as in text rows); give "
                    "prompt/completion or chat rows, or set prefix_tokens > 0 to prompt them with their first tokens"
                )

    @property
    def enabled(self) -> bool:
        return self.config.lambda_ > 0

    def chooses(self, step: int) -> bool:
        """Whether step `step` is on-policy (the same answer on every rank and after a resume)."""
        return is_on_policy_step(self.seed, step, self.config.lambda_)

    def examples(self, model, step: int, rank: int, micro_batches: list[list[Example]]) -> list[list[Example]]:
        """The micro-batches step `step` trains on: the given ones, or on an on-policy step the student's own
        completions of their prompts. `model` is the unwrapped student; it is back in its mode afterwards."""
        self.window_steps += 1
        if not self.chooses(step):
            return micro_batches
        self.window_on_policy += 1
        start = time.perf_counter()
        was_training = model.training
        model.eval()  # no dropout while sampling: the student's distribution, not a perturbed one
        try:
            result = [self._sample(model, step, rank, j, examples) for j, examples in enumerate(micro_batches)]
        finally:
            model.train(was_training)
        self.window_generate_s += time.perf_counter() - start
        return result

    def _sample(self, model, step: int, rank: int, micro_batch: int, examples: list[Example]) -> list[Example]:
        c = self.config
        prompts = [e.input_ids[: prompt_length(e, c.prefix_tokens)] for e in examples]
        limits = [min(c.max_new_tokens, self.max_length - len(p)) for p in prompts]
        synced = torch.distributed.is_available() and torch.distributed.is_initialized()
        synced = synced and torch.distributed.get_world_size() > 1
        with self.autocast():
            completions = sample_completions(
                model,
                prompts,
                limits,
                temperature=c.temperature,
                top_p=c.top_p,
                eos_ids=eos_ids(model, self.tokenizer),
                pad_id=self.pad_id,
                seed=sampling_seed(self.seed, step, rank, micro_batch),
                device=self.device,
                synced=synced,
                vocab_size=len(self.tokenizer),
            )
        # Several teachers: the row's own teacher scores the student's sample of its prompt.
        pairs = zip(prompts, completions, examples, strict=True)
        return [Example(p + t, [False] * len(p) + [True] * len(t), teacher=e.teacher) for p, t, e in pairs]

    def log_fields(self, elapsed_s: float) -> dict:
        """Fields for the train event covering the steps since the last call (none when on-policy is off)."""
        if not self.enabled:
            return {}
        fields = {
            "on_policy_share": self.window_on_policy / max(self.window_steps, 1),
            "generate_s": self.window_generate_s,
            "generate_share": self.window_generate_s / max(elapsed_s, 1e-9),
        }
        self.window_steps = self.window_on_policy = 0
        self.window_generate_s = 0.0
        return fields
