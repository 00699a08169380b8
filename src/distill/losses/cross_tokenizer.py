"""Distillation between a teacher and a student that do not share a vocabulary: pure functions on tensors.

Rows are anchors (`distill.data.alignment`): student row i and teacher row i are each model's next-token
distribution after the same text, over its own vocabulary (V_s and V_t columns). Two ways to compare them:

- ``uld``      Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the
               Universal Logit Distillation Loss for LLMs", arXiv:2402.12030): both probability vectors sorted in
               decreasing order, the shorter padded with zeros to the longer, and Σ_i |p_s↓(i) − p_t↓(i)|, the
               closed form the paper gives for the Wasserstein-1 distance when tokens are matched by rank. It
               needs no vocabulary map and compares the shape of the distributions (how sure, how spread), not
               which tokens carry the mass. Zero iff the two sorted vectors are equal.
- ``aligned``  at 1:1 spans (the same piece on both sides) both distributions are coarse-grained to the pieces the
               two vocabularies share (`BucketMap`: one bucket per shared piece, ids with the same piece summed)
               plus one tail bucket holding the rest of each side's mass, as the offline cache's "bucket" tail does;
               the objective's own divergence is taken between the two (|shared| + 1)-outcome distributions.
               Elsewhere (anchors at merged or split spans) ULD.

Both use the objective's temperature τ (P = softmax(logits / τ)) and are multiplied by τ², as every divergence of
`distill.losses`; the objective's weights are applied by the caller.

From a cache (`distill.cache.cross`, `TopKCrossTargets`) the teacher is known by its k most probable ids and the
mass of the rest: ``uld`` compares the k largest probabilities of each side and then the two rests as one term
(a lower bound of the exact ULD), ``aligned`` keeps the shared buckets the teacher's top-k fall in and pools every
other bucket into the tail, on both sides (`top_k_cross_divergence`). Both equal the online values when k covers
the teacher's vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from distill.losses.dense import LOG_PROB_FLOOR, divergence_from_log_probs
from distill.losses.heads import OutputHead
from distill.losses.objective import Objective
from distill.losses.sparse import SparseTargets, _teacher_buckets

MODES = ("uld", "aligned")


@dataclass(frozen=True)
class BucketMap:
    """The outcomes both vocabularies share: `student` (V_s,) and `teacher` (V_t,) give each id's bucket in
    [0, shared]; `shared` is the number of shared buckets, and bucket `shared` is the tail (everything else)."""

    student: torch.Tensor  # (V_s,) long
    teacher: torch.Tensor  # (V_t,) long
    shared: int

    def to(self, device: torch.device | str) -> BucketMap:
        return BucketMap(self.student.to(device), self.teacher.to(device), self.shared)


@dataclass(frozen=True)
class CrossObjective:
    """How the anchors are compared: `mode` (uld | aligned), the shared vocabulary (aligned), the teacher's
    vocabulary size (its logit columns beyond are embedding padding)."""

    mode: str
    buckets: BucketMap | None
    teacher_vocab: int


@dataclass(frozen=True)
class CrossTargets:
    """The teacher's side of a micro-batch's anchors: the flat (B·(T-1)) student positions, which anchors are 1:1
    spans, and the teacher's logits (N, V_t') there, or its last hidden states (N, H_t) when a head is given to
    the loss (the fused path forms the logits a chunk at a time)."""

    student_index: torch.Tensor  # (N,) long
    exact: torch.Tensor  # (N,) bool
    teacher: torch.Tensor  # (N, V_t') logits or (N, H_t) hidden states

    @property
    def teacher_rows(self) -> tuple[torch.Tensor, ...]:
        return (self.teacher,)


@dataclass(frozen=True)
class TopKCrossTargets:
    """The teacher's side of a micro-batch's anchors from a cache across tokenizers (`distill.cache.cross`): the
    flat student positions and 1:1 flags as in `CrossTargets`, and at each anchor the teacher's k most probable ids
    (sorted by decreasing probability), their log-probs at τ = 1, the log of the rest mass and log Σ √p over the
    rest (its mass at τ = 2, for other temperatures)."""

    student_index: torch.Tensor  # (N,) long
    exact: torch.Tensor  # (N,) bool
    ids: torch.Tensor  # (N, k) long
    log_probs: torch.Tensor  # (N, k) float
    log_rest: torch.Tensor  # (N,) float
    log_rest_half: torch.Tensor  # (N,) float

    @property
    def teacher_rows(self) -> tuple[torch.Tensor, ...]:
        return (self.ids, self.log_probs, self.log_rest, self.log_rest_half)


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD per row, times τ²: Σ_i |sort↓(softmax(s/τ))_i − sort↓(softmax(t/τ))_i| with zero padding to the larger
    vocabulary. (N, V_s), (N, V_t) -> (N,) float32; differentiable in both (the sort's permutation is constant)."""
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1).sort(dim=-1, descending=True).values
    width = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, width - p_s.shape[-1]))  # (N, V) zeros after the smaller vocabulary's last token
    p_t = F.pad(p_t, (0, width - p_t.shape[-1]))
    return (p_s - p_t).abs().sum(-1) * (temperature * temperature)


def bucket_log_probs(logits: torch.Tensor, bucket: torch.Tensor, buckets: int, temperature: float) -> torch.Tensor:
    """log P(bucket) at temperature τ for each row: (N, V), bucket (V,) in [0, buckets) -> (N, buckets) floored.

    A logsumexp per bucket, shifted by the bucket's own (constant) maximum so that a bucket of tiny probabilities
    keeps its exact log instead of underflowing; a bucket no id falls in is -inf, floored."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (N, V)
    index = bucket.unsqueeze(0).expand_as(lp)  # (N, V)
    with torch.no_grad():
        top = torch.full((lp.shape[0], buckets), float("-inf"), device=lp.device)
        top = top.scatter_reduce(1, index, lp, reduce="amax").clamp_min(LOG_PROB_FLOOR)  # (N, buckets)
    sums = torch.zeros((lp.shape[0], buckets), device=lp.device).index_add(1, bucket, (lp - top.gather(1, index)).exp())
    return (sums.log() + top).clamp_min(LOG_PROB_FLOOR)  # (N, buckets)


def aligned_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, buckets: BucketMap, objective: Objective
) -> torch.Tensor:
    """The objective's divergence between the two distributions coarse-grained to the shared buckets and a tail,
    times τ². (N, V_s), (N, V_t) -> (N,). Zero when the student gives every shared piece the teacher's probability
    and the same rest mass."""
    tau = objective.temperature
    s = bucket_log_probs(student_logits, buckets.student, buckets.shared + 1, tau)  # (N, shared + 1)
    with torch.no_grad():
        t = bucket_log_probs(teacher_logits, buckets.teacher, buckets.shared + 1, tau)  # (N, shared + 1)
    return divergence_from_log_probs(s, t, objective) * (tau * tau)


def cross_tokenizer_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    exact: torch.Tensor,
    objective: Objective,
    mode: str,
    buckets: BucketMap | None = None,
) -> torch.Tensor:
    """Per-anchor divergence of `mode` (module docstring), times τ². (N, V_s), (N, V_t), exact (N,) -> (N,).

    `aligned` needs `buckets`; its 1:1 rows take `aligned_divergence`, the others ULD. The teacher is a constant."""
    if mode not in MODES:
        raise ValueError(f"unknown cross-tokenizer mode {mode!r}; choose one of {', '.join(MODES)}")
    teacher_logits = teacher_logits.detach()
    uld = uld_distance(student_logits, teacher_logits, objective.temperature)  # (N,)
    if mode == "uld":
        return uld
    if buckets is None:
        raise ValueError("the aligned mode needs the shared vocabulary (buckets)")
    # Both are computed on every row and one is kept: no host sync to split the rows by kind.
    aligned = aligned_divergence(student_logits, teacher_logits, buckets, objective)  # (N,)
    return torch.where(exact, aligned, uld)


# ---------------------------------------------------------------- a teacher known by its top-k (a cache)


def _log_sum_by_bucket(log_probs: torch.Tensor, index: torch.Tensor, buckets: int) -> torch.Tensor:
    """log Σ exp over the entries of each bucket, per row: (N, c), index (N, c) in [0, buckets) -> (N, buckets)
    floored; a bucket's own maximum is the shift (as in `bucket_log_probs`), so tiny buckets keep their log."""
    top = torch.full((log_probs.shape[0], buckets), float("-inf"), device=log_probs.device)
    top = top.scatter_reduce(1, index, log_probs, reduce="amax").clamp_min(LOG_PROB_FLOOR)  # (N, buckets)
    sums = torch.zeros_like(top).scatter_add(1, index, (log_probs - top.gather(1, index)).exp())
    return (sums.log() + top).clamp_min(LOG_PROB_FLOOR)  # (N, buckets)


def top_k_uld_distance(student_logits: torch.Tensor, teacher_classes: torch.Tensor, temperature: float) -> torch.Tensor:
    """ULD against a teacher known by its top-k, times τ²: Σ_{i<k} |p_s↓(i) − p_t↓(i)| + |rest_s − rest_t|, the
    rest being each side's mass outside its k most probable tokens. (N, V_s), teacher_classes (N, k + 1)
    log-probs at τ (the top-k in decreasing order, then the rest) -> (N,).

    A lower bound of the exact ULD: the rest term is |Σ_{i≥k} (p_s↓(i) − p_t↓(i))| ≤ Σ_{i≥k} |p_s↓(i) − p_t↓(i)|;
    equal to it when k covers the teacher's vocabulary (its rest is then empty and the exact sum is rest_s)."""
    k = teacher_classes.shape[-1] - 1
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1)  # (N, V_s)
    head = p_s.topk(min(k, p_s.shape[-1]), dim=-1).values  # (N, k') sorted, differentiable
    rest_s = p_s.sum(-1) - head.sum(-1)  # (N,) through the softmax, no per-token gather of the rest
    head = F.pad(head, (0, k - head.shape[-1]))  # (N, k) a student vocabulary smaller than k: zeros
    p_t = teacher_classes.exp()  # (N, k + 1)
    distance = (head - p_t[:, :k]).abs().sum(-1) + (rest_s - p_t[:, k]).abs()
    return distance * (temperature * temperature)


def top_k_aligned_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_classes: torch.Tensor,
    buckets: BucketMap,
    objective: Objective,
) -> torch.Tensor:
    """`aligned_divergence` against a teacher known by its top-k, times τ². (N, V_s), teacher_ids (N, k),
    teacher_classes (N, k + 1) as in `top_k_uld_distance` -> (N,).

    Per row, the shared buckets that one of the teacher's top-k ids falls in are kept; every other bucket joins the
    tail on both sides (the teacher's mass there is not known apart from the rest, so the student's is pooled the
    same way). A bucket with teacher ids inside and outside the top-k gets the teacher's top-k share only."""
    tau, shared = objective.temperature, buckets.shared
    s = bucket_log_probs(student_logits, buckets.student, shared + 1, tau)  # (N, shared + 1)
    with torch.no_grad():
        tail = torch.full_like(teacher_ids[:, :1], shared)  # (N, 1) the rest's bucket
        index = torch.cat([buckets.teacher[teacher_ids], tail], dim=-1)  # (N, k + 1)
        t = _log_sum_by_bucket(teacher_classes.float(), index, shared + 1)  # (N, shared + 1)
        kept = torch.zeros_like(t, dtype=torch.bool).scatter_(1, index, True)  # (N, shared + 1)
        kept[:, shared] = False  # the tail is pooled below, never kept as it is
    pooled = torch.where(kept, LOG_PROB_FLOOR, s).logsumexp(-1, keepdim=True)  # (N, 1) the student's other mass
    s = torch.cat([torch.where(kept[:, :shared], s[:, :shared], LOG_PROB_FLOOR), pooled], dim=-1)
    return divergence_from_log_probs(s.clamp_min(LOG_PROB_FLOOR), t, objective) * (tau * tau)


def top_k_cross_divergence(
    student_logits: torch.Tensor,
    teacher: tuple[torch.Tensor, ...],
    exact: torch.Tensor,
    objective: Objective,
    mode: str,
    buckets: BucketMap | None,
    teacher_vocab: int,
) -> torch.Tensor:
    """`cross_tokenizer_divergence` for a teacher known by its top-k: `teacher` = (ids (N, k), log-probs (N, k),
    log rest (N,), log Σ √p of the rest (N,)) at τ = 1, as `TopKCrossTargets` holds them. (N, V_s) -> (N,)."""
    ids, lp, rest, half = teacher
    tempered = SparseTargets(ids.long(), lp.float(), rest.float(), distinct=True, log_rest_half=half.float())
    # The teacher's top-k and rest at τ, normalized; the rest's tempered mass as the one-tokenizer cache gets it.
    classes, _, _ = _teacher_buckets(tempered, objective.temperature, teacher_vocab)  # (N, k + 1)
    uld = top_k_uld_distance(student_logits, classes, objective.temperature)  # (N,)
    if mode == "uld":
        return uld
    if buckets is None:
        raise ValueError("the aligned mode needs the shared vocabulary (buckets)")
    aligned = top_k_aligned_divergence(student_logits, ids.long(), classes, buckets, objective)  # (N,)
    return torch.where(exact, aligned, uld)


def cross_tokenizer_sum(
    student: torch.Tensor,
    targets: CrossTargets | TopKCrossTargets,
    objective: Objective,
    mode: str,
    vocab_sizes: tuple[int, int],
    buckets: BucketMap | None = None,
    student_head: OutputHead | None = None,
    teacher_head: OutputHead | None = None,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """Σ over the anchors of `cross_tokenizer_divergence` (differentiable in `student`), a chunk of rows at a time.

    `student` holds the anchors' logits (N, V_s') or, with `student_head`, their hidden states (N, H); likewise
    `targets.teacher` with `teacher_head` (`TopKCrossTargets`: the teacher's top-k from a cache, no head).
    `vocab_sizes` = (V_s, V_t): logit columns beyond (embedding padding) are dropped. With gradients on, each chunk
    is recomputed in backward (activation checkpointing), so the loss
    keeps no (N, V) buffers between forward and backward: memory is one chunk's, whatever N is.
    """
    v_s, v_t = vocab_sizes

    top_k = isinstance(targets, TopKCrossTargets)

    def chunk(s_rows: torch.Tensor, exact: torch.Tensor, *t_rows: torch.Tensor) -> torch.Tensor:
        s_logits = (student_head.logits(s_rows) if student_head is not None else s_rows)[:, :v_s]  # (n, V_s)
        if top_k:
            return top_k_cross_divergence(s_logits, t_rows, exact, objective, mode, buckets, v_t).sum()
        (t_rows,) = t_rows
        with torch.no_grad():
            t_logits = (teacher_head.logits(t_rows) if teacher_head is not None else t_rows)[:, :v_t]  # (n, V_t)
        return cross_tokenizer_divergence(s_logits, t_logits, exact, objective, mode, buckets).sum()

    total = student.sum().float() * 0.0  # in the graph even without anchors: a loss that backward accepts
    grad = torch.is_grad_enabled() and student.requires_grad
    for first in range(0, student.shape[0], chunk_rows):
        rows = slice(first, first + chunk_rows)
        parts = (student[rows], targets.exact[rows], *(t[rows] for t in targets.teacher_rows))
        total = total + (checkpoint(chunk, *parts, use_reentrant=False) if grad else chunk(*parts))
    return total
