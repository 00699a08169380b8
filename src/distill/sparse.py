"""Distillation against sparse teacher targets: the teacher's top-k tokens plus the mass it left over.

Storing a teacher's full distribution for every training token costs V floats per token (150k for Qwen-size
vocabularies), so offline distillation stores a few entries per token instead (Sparse logit sampling, Anshumann
et al. 2025, discusses the trade-offs; top-k with a "rest" bucket is the simplest unbiased-at-the-bucket-level
choice). `SparseTargets` holds, for each of N tokens:

- ``ids``       (N, k) int64  token ids; a slot with id -1 is unused padding.
- ``log_probs`` (N, k) float  the teacher's log-probabilities of those ids at temperature 1; -inf also marks
                              an unused slot.
- ``log_rest``  (N,)   float  log of the teacher's remaining probability mass, log(1 − Σ top-k probs); -inf when
                              the k ids hold all of it.

The same id may appear in several used slots (a sampled representation can produce repeats); its
probabilities add up, as if it appeared once with the sum.

How a divergence is defined on these targets. Both distributions are coarse-grained to the same (k+1)
outcomes: each distinct used id, and "every other token of the vocabulary". The divergence is
`losses.divergence_from_log_probs` between the two coarse distributions, times τ² as in
`losses.token_divergence`.

- Teacher at temperature τ: the id buckets are log p_i / τ; for the tail, the mass is assumed spread uniformly
  over the V − k' other tokens (k' = number of distinct used ids), so each has log-probability
  r = log_rest − log(V − k') and the bucket is log(V − k') + r / τ. The k'+1 values are renormalized
  (log-softmax). At τ = 1 this is exactly the teacher's coarse distribution; at τ ≠ 1 the uniform-tail
  assumption is the only approximation.
- Student at temperature τ: its log-softmax at τ gathered at the ids, and the tail = logsumexp of its
  log-probabilities over all other tokens (computed by masking the ids out, so nothing cancels).

Consequences: at τ = 1 the value is exact whenever the teacher's tail is uniform or empty relative to the
student — in particular it equals the dense divergence when k = V − 1, and, when the teacher has exactly k
non-zero tokens, for every divergence that stays finite there (all but reverse_kl, jsd with β = 1 and
skew_reverse_kl with α = 0). In general coarse-graining can only lower an f-divergence (data processing), so
the sparse value is a lower bound of the dense one at τ = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.losses import IGNORE_INDEX, LOG_PROB_FLOOR, divergence_from_log_probs, log_probs, token_cross_entropy

_NEG_INF = float("-inf")


@dataclass(frozen=True)
class SparseTargets:
    """Top-k teacher targets for N tokens; see the module docstring for the meaning of each field."""

    ids: torch.Tensor  # (N, k) int64, -1 = unused slot
    log_probs: torch.Tensor  # (N, k) float, temperature 1, -inf = unused slot
    log_rest: torch.Tensor  # (N,) float, log of the mass outside the ids

    def __post_init__(self) -> None:
        if self.ids.dim() != 2 or self.ids.shape != self.log_probs.shape or self.log_rest.shape != self.ids.shape[:1]:
            raise ValueError(
                f"sparse targets need ids (N, k), log_probs (N, k), log_rest (N,); got {tuple(self.ids.shape)}, "
                f"{tuple(self.log_probs.shape)}, {tuple(self.log_rest.shape)}"
            )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, index: torch.Tensor) -> SparseTargets:
        """The targets of the tokens at `index` (a 1-D long tensor of row numbers)."""
        return SparseTargets(
            self.ids.index_select(0, index), self.log_probs.index_select(0, index), self.log_rest.index_select(0, index)
        )

    def to(self, device: torch.device | str) -> SparseTargets:
        return SparseTargets(self.ids.to(device), self.log_probs.to(device), self.log_rest.to(device))


@torch.no_grad()
def top_k_targets(teacher_logits: torch.Tensor, k: int, vocab_size: int | None = None) -> SparseTargets:
    """The k most probable tokens of each row of `teacher_logits` at temperature 1. (N, V) -> SparseTargets.

    Columns at or beyond `vocab_size` (padding rows of an embedding matrix) are dropped first. The rest mass
    is a logsumexp over the tokens not kept, not 1 − Σ top-k, so it does not lose precision to cancellation.
    """
    logits = teacher_logits[..., :vocab_size] if vocab_size is not None else teacher_logits
    lp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    top_lp, top_ids = lp.topk(k, dim=-1)  # (N, k), (N, k)
    log_rest = lp.scatter(-1, top_ids, _NEG_INF).logsumexp(-1)  # (N,)
    return SparseTargets(top_ids, top_lp, log_rest)


def _teacher_buckets(targets: SparseTargets, temperature: float, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher's coarse log-distribution at τ over (ids, tail), and the mask of first occurrences of used ids.

    Returns (n, k+1) floored float32 log-probabilities and an (n, k) bool mask; a non-first or unused slot has
    a floored (zero-probability) bucket.
    """
    ids = targets.ids
    lp = targets.log_probs.float()  # (n, k)
    used = (ids >= 0) & (lp > _NEG_INF)  # (n, k)
    # same[r, i, j]: used slots i and j hold the same id. k is small (tens), so the (n, k, k) table is cheap.
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & used.unsqueeze(-1) & used.unsqueeze(-2)  # (n, k, k)
    first = used & ~same.tril(-1).any(-1)  # (n, k): no earlier slot holds the same id
    merged = torch.where(same, lp.unsqueeze(-2), _NEG_INF).logsumexp(-1)  # (n, k): log Σ p over equal ids
    id_buckets = torch.where(first, merged / temperature, _NEG_INF)  # (n, k)

    others = vocab_size - first.sum(-1)  # (n,) tokens outside the ids
    log_rest = targets.log_rest.float()  # (n,)
    if temperature == 1.0:
        tail = log_rest  # exact; skips a log(V−k') that would only add rounding
    else:
        log_others = others.float().log()  # (n,) -inf when the ids cover the whole vocabulary
        tail = log_others + (log_rest - log_others) / temperature
    tail = torch.where(others > 0, tail, _NEG_INF)  # (n,)
    buckets = torch.cat([id_buckets, tail.unsqueeze(-1)], dim=-1)  # (n, k+1)
    # Floor before normalizing so that a row with no information at all (every slot unused, no rest) gives a
    # finite, if meaningless, distribution instead of NaN; such rows are expected to be masked out by labels.
    buckets = torch.log_softmax(buckets.clamp_min(LOG_PROB_FLOOR), dim=-1)
    return buckets.clamp_min(LOG_PROB_FLOOR), first


def sparse_token_divergence(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token divergence to sparse targets at `temperature`, times τ². (N, V'), targets of N -> (N,) float32.

    `student_logits` columns at or beyond `vocab_size` (default: all columns count) are ignored. Differentiable
    in `student_logits`; the targets are constants.
    """
    logits = student_logits[..., :vocab_size] if vocab_size is not None else student_logits  # (N, V)
    vocab = logits.shape[-1]
    with torch.no_grad():
        teacher, first = _teacher_buckets(targets, temperature, vocab)  # (N, k+1), (N, k)
        safe_ids = targets.ids.clamp(0, vocab - 1)  # (N, k) unused slots point anywhere; they are masked below
        # Counting hits with scatter_add (not a boolean scatter) stays deterministic when an unused slot and a
        # used one point at the same column.
        hits = torch.zeros_like(logits, dtype=torch.float32).scatter_add_(-1, safe_ids, first.float())  # (N, V)
        in_ids = hits > 0  # (N, V)
    s_lp = log_probs(logits, temperature)  # (N, V)
    s_ids = torch.where(first, s_lp.gather(-1, safe_ids), LOG_PROB_FLOOR)  # (N, k)
    s_tail = s_lp.masked_fill(in_ids, LOG_PROB_FLOOR).logsumexp(-1)  # (N,)
    student = torch.cat([s_ids, s_tail.unsqueeze(-1)], dim=-1).clamp_min(LOG_PROB_FLOOR)  # (N, k+1)
    per_token = divergence_from_log_probs(student, teacher, divergence, beta, skew)  # (N,)
    return per_token * (temperature * temperature)


def sparse_loss_sums(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like `losses.loss_sums` with sparse targets: sums over tokens where labels != -100 of (divergence × τ², CE).

    Shapes: student_logits (N, V'), targets of N tokens, labels (N,). The cross-entropy is the student's at
    temperature 1 over the first `vocab_size` columns.
    """
    logits = student_logits[..., :vocab_size] if vocab_size is not None else student_logits  # (N, V)
    counted = (labels != IGNORE_INDEX).float()  # (N,)
    kd = sparse_token_divergence(logits, targets, divergence, beta, skew, temperature)  # (N,)
    ce = token_cross_entropy(logits, labels)  # (N,)
    return (kd * counted).sum(), (ce * counted).sum()
